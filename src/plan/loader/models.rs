//! Models, identity resolutions and data tests of a pipeline, checked and resolved.

use super::*;

impl Loader {
    pub(super) fn models(&mut self, r: &RawPipeline) -> Vec<Model> {
        let mut out = Vec::new();
        // A file named on its own (usually with options) is not taken again from a glob.
        let named = named_model_files(r);
        for entry in &r.spec.models {
            let spec = model_spec(&entry.value);
            let here = |msg: String| {
                Problem::new(&r.file, msg).at(yaml_pos(&entry.referenced, &r.text), &r.text)
            };
            let Some(files) = self.model_files(r, &entry.referenced, &spec, &named) else {
                continue;
            };
            let write = match model_write(&spec) {
                Ok(w) => w,
                Err(msg) => {
                    self.problems.push(here(msg));
                    continue;
                }
            };
            if files.len() > 1 && !write.keys().is_empty() {
                self.problems.push(here(format!(
                    "'{}' matches {} files; `mode: merge` with `keys:` needs one model per entry",
                    spec.path,
                    files.len()
                )));
                continue;
            }
            for rel in files {
                if let Some(model) = self.model_file(r, &entry.referenced, &spec, &write, rel) {
                    out.push(model);
                }
            }
        }
        // Positions of references are only needed for the graph check; keep them alongside.
        self.model_refs
            .extend(out.iter().map(|(m, refs)| (m.name.clone(), refs.clone())));
        out.into_iter().map(|(m, _)| m).collect()
    }

    /// The SQL files of a model entry; a glob's leave out the files named on their own.
    fn model_files(
        &mut self,
        r: &RawPipeline,
        at: &serde_saphyr::Location,
        spec: &ModelSpec,
        named: &[PathBuf],
    ) -> Option<Vec<PathBuf>> {
        let here = |msg: String| Problem::new(&r.file, msg).at(yaml_pos(at, &r.text), &r.text);
        match expand_model_path(&self.root, &spec.path) {
            Ok(f) if f.is_empty() => {
                self.problems
                    .push(here(format!("no SQL file matches '{}'", spec.path)));
                None
            }
            Ok(f) if spec.path.contains(['*', '?', '[', '{']) => {
                Some(f.into_iter().filter(|p| !named.contains(p)).collect())
            }
            Ok(f) => Some(f),
            Err(msg) => {
                self.problems.push(here(msg));
                None
            }
        }
    }

    /// The model one SQL file of an entry builds, with the tables it reads.
    fn model_file(
        &mut self,
        r: &RawPipeline,
        at: &serde_saphyr::Location,
        spec: &ModelSpec,
        write: &ModelWrite,
        rel: PathBuf,
    ) -> Option<(Model, Vec<dag::TableRef>)> {
        let here = |msg: String| Problem::new(&r.file, msg).at(yaml_pos(at, &r.text), &r.text);
        let name = rel
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !valid_identifier(&name) {
            self.problems.push(Problem::new(
                &rel,
                format!(
                    "model file name '{name}' is the table it builds and must be \
                             lowercase letters, digits and '_'"
                ),
            ));
            return None;
        }
        let sql = self.read(&rel)?;
        if spec.rollup && (sql.contains("kbcrm_as_of") || sql.contains("kbcrm_var")) {
            self.problems.push(Problem::new(
                &rel,
                "a rollup must not read run parameters (kbcrm_as_of, kbcrm_var): queries \
                         are answered from it as if from its tables"
                    .to_string(),
            ));
            return None;
        }
        match dag::parse_model_sql(&rel, &sql) {
            Ok(refs) => {
                if spec.slices.as_ref().is_some_and(|s| s.rows == 0) {
                    self.problems.push(here(format!(
                        "model '{name}': `slices: rows:` must be at least 1 (the most \
                                 rows of the largest sliced table in one slice)"
                    )));
                }
                let drivers = spec.incremental.iter().flat_map(|i| &i.tables);
                for t in drivers.filter(|t| !refs.iter().any(|r| &r.name == *t)) {
                    self.problems.push(here(format!(
                        "model '{name}': `incremental:` names table '{t}', which its SQL \
                                 does not read"
                    )));
                }
                Some((
                    Model {
                        pipeline: r.name.clone(),
                        name,
                        file: rel,
                        sql,
                        write: write.clone(),
                        depends_on: refs.iter().map(|t| t.name.clone()).collect(),
                        incremental: spec.incremental.as_ref().map(|i| ModelIncremental {
                            tables: i.tables.clone(),
                            key: i.key.clone(),
                        }),
                        rollup: spec.rollup,
                        cluster_by: spec.cluster_by.clone(),
                        files_by: spec.files_by.clone(),
                        slices: spec.slices.as_ref().map(|s| Slices {
                            by: s.by.clone(),
                            rows: s.rows,
                        }),
                    },
                    refs,
                ))
            }
            Err(p) => {
                self.problems.push(p);
                None
            }
        }
    }

    pub(super) fn identity(
        &mut self,
        r: &RawPipeline,
        entity: &str,
        spec: &IdentitySpec,
        at: &serde_saphyr::Location,
    ) -> Option<Identity> {
        let before = self.problems.len();
        let mut problem = |msg: String| {
            self.problems.push(
                Problem::new(&r.file, format!("identity '{entity}': {msg}"))
                    .at(yaml_pos(at, &r.text), &r.text),
            );
        };
        if !valid_identifier(entity) {
            problem("the entity name must be lowercase letters, digits and '_'".into());
        }
        let map_table = spec
            .map
            .clone()
            .unwrap_or_else(|| format!("map_{entity}_identity"));
        let golden_table = spec
            .golden
            .clone()
            .unwrap_or_else(|| format!("int_{entity}_golden"));
        for t in [&map_table, &golden_table] {
            if !valid_identifier(t) {
                problem(format!(
                    "table name '{t}' must be lowercase letters, digits and '_'"
                ));
            }
        }
        let sources = record_sources(spec);
        if sources.is_empty() {
            problem("`records:` names no source of records".into());
        }
        if spec.rules.is_empty() {
            problem(
                "`rules:` is empty; add at least one rule such as { name: email, on: [email] }"
                    .into(),
            );
        }
        check_identity_fields(spec, &sources, &mut problem);
        if self.problems.len() > before {
            return None;
        }
        Some(identity_of(
            r,
            entity,
            spec,
            map_table,
            golden_table,
            sources,
        ))
    }

    pub(super) fn tests(&mut self, r: &RawPipeline) -> Vec<DataTest> {
        r.spec
            .tests
            .iter()
            .map(|t| {
                let mut test = data_test(&t.value);
                test.name = format!(
                    "{} [{}:{}]",
                    test.name,
                    r.file.display(),
                    t.referenced.line()
                );
                self.test_positions.push((
                    test.table.clone(),
                    r.file.clone(),
                    yaml_pos(&t.referenced, &r.text),
                    r.text.clone(),
                ));
                test
            })
            .collect()
    }
}
/// The full spec of a model entry; a bare path gets the defaults.
fn model_spec(entry: &ModelEntry) -> ModelSpec {
    match entry {
        ModelEntry::Path(p) => ModelSpec {
            path: p.clone(),
            mode: WriteMode::Overwrite,
            keys: Vec::new(),
            incremental: None,
            scd2: None,
            rollup: false,
            cluster_by: Vec::new(),
            files_by: None,
            slices: None,
        },
        ModelEntry::Full(m) => m.as_ref().clone(),
    }
}

/// The model files a pipeline names on their own, not by a glob.
fn named_model_files(r: &RawPipeline) -> Vec<PathBuf> {
    r.spec
        .models
        .iter()
        .map(|e| match &e.value {
            ModelEntry::Path(p) => p.as_str(),
            ModelEntry::Full(m) => m.path.as_str(),
        })
        .filter(|p| !p.contains(['*', '?', '[', '{']))
        .map(PathBuf::from)
        .collect()
}

/// The record sources of an identity resolution, from `records:`.
fn record_sources(spec: &IdentitySpec) -> Vec<RecordSource> {
    spec.records
        .iter()
        .map(|(name, rec)| RecordSource {
            name: name.clone(),
            table: rec.table.clone(),
            id: rec.id.clone(),
            updated_at: rec.updated_at.clone(),
            fields: rec
                .fields
                .iter()
                .map(|(f, c)| (f.clone(), c.clone()))
                .collect(),
        })
        .collect()
}

/// Check that an identity's rules, survivorship and normalization name known fields.
fn check_identity_fields(
    spec: &IdentitySpec,
    sources: &[RecordSource],
    problem: &mut impl FnMut(String),
) {
    let known = |f: &str| sources.iter().any(|s| s.fields.iter().any(|(g, _)| g == f));
    for rule in &spec.rules {
        if rule.on.is_empty() {
            problem(format!("rule '{}' matches on no field", rule.name));
        }
        if let Some(f) = rule.on.iter().find(|f| !known(f)) {
            problem(format!(
                "rule '{}' uses field '{f}', which no record source lists under `fields:`",
                rule.name
            ));
        }
    }
    for (field, s) in &spec.survivorship {
        if !known(field) {
            problem(format!(
                "survivorship names field '{field}', which no record source lists"
            ));
        }
        if let Survivorship::Prefer(order) = s
            && let Some(x) = order.iter().find(|x| !spec.records.contains_key(*x))
        {
            problem(format!(
                "survivorship of '{field}' prefers '{x}', which is not a record source"
            ));
        }
        if *s == Survivorship::MostRecent && sources.iter().all(|s| s.updated_at.is_none()) {
            problem(format!(
                "survivorship of '{field}' is most_recent but no record source has `updated_at:`"
            ));
        }
    }
    for f in spec.normalize.keys() {
        if !known(f) {
            problem(format!(
                "`normalize:` names field '{f}', which no record source lists"
            ));
        }
    }
}

/// The identity resolution of `entity`, once its spec is checked.
fn identity_of(
    r: &RawPipeline,
    entity: &str,
    spec: &IdentitySpec,
    map_table: String,
    golden_table: String,
    sources: Vec<RecordSource>,
) -> Identity {
    Identity {
        pipeline: r.name.clone(),
        entity: entity.to_string(),
        map_table,
        golden_table,
        id_column: format!("{entity}_id"),
        id_prefix: spec.id_prefix.clone().unwrap_or_else(|| {
            entity
                .chars()
                .next()
                .map(|c| c.to_ascii_uppercase().to_string())
                .unwrap_or_default()
        }),
        rules: spec
            .rules
            .iter()
            .map(|r| (r.name.clone(), r.on.clone()))
            .collect(),
        normalize: spec
            .normalize
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        default_cc: spec
            .default_country_code
            .clone()
            .unwrap_or_else(|| "49".into())
            .trim_start_matches('+')
            .to_string(),
        survivorship: spec
            .survivorship
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        max_group: spec.max_group.unwrap_or(20),
        sources,
    }
}
