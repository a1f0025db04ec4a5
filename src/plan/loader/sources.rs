//! Sources: each kind's settings checked and resolved (files, CSV options, databases, keys).

use super::*;

impl Loader {
    pub(super) fn source(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> Option<Source> {
        let before = self.problems.len();
        if !valid_identifier(name) {
            self.problems.push(r.here(
                format!("source name '{name}' must be lowercase letters, digits and '_'"),
                at,
            ));
        }
        let table = self.source_table(r, name, s);
        let location = self.source_location(r, name, s, at);
        let columns = self.source_columns(r, name, s);
        let write = self.source_write(r, name, s, at);
        let csv = self.source_csv(r, name, s, at);
        let incremental = self.source_incremental(r, name, s, at);
        let database = self.database_source(r, name, s, at, &columns, incremental.as_ref());
        let input = source_input(s.format, location, csv, database);
        self.check_incremental_fits(r, name, s, at, incremental.as_ref());
        let max_reject_ratio = s.rejects.as_ref().map_or(0.05, |r| r.max_ratio);
        if !(0.0..=1.0).contains(&max_reject_ratio) {
            self.problems.push(r.here(
                format!("source '{name}': rejects.max_ratio must be between 0 and 1"),
                at,
            ));
        }
        let freshness = self.source_freshness(r, name, s);
        if self.problems.len() > before {
            return None;
        }
        Some(Source {
            pipeline: r.name.clone(),
            name: name.to_string(),
            table,
            input: input?,
            write: write?,
            columns,
            max_reject_ratio,
            incremental,
            freshness,
        })
    }

    /// The table a source loads into: `table:` (its name checked) or `raw_<pipeline>_<source>`.
    fn source_table(&mut self, r: &RawPipeline, name: &str, s: &SourceSpec) -> String {
        match &s.table {
            Some(t) if !valid_identifier(&t.value) => {
                self.problems.push(r.here(
                    format!(
                        "table name '{}' must be lowercase letters, digits and '_'",
                        t.value
                    ),
                    &t.referenced,
                ));
                t.value.clone()
            }
            Some(t) => t.value.clone(),
            None => format!("raw_{}_{}", r.name, name),
        }
    }

    /// Where a file source's files are, from `location:`; `None` for a database source.
    fn source_location(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> Option<Location> {
        match (&s.location, s.format.is_database()) {
            (Some(l), false) => match Location::resolve(&l.value, &self.root) {
                Ok(l) => Some(l),
                Err(msg) => {
                    self.problems.push(r.here(msg, &l.referenced));
                    None
                }
            },
            (None, false) => {
                self.problems.push(r.here(
                    format!(
                        "source '{name}' has no `location:`; give the path, folder, glob or URL \
                         of its files"
                    ),
                    at,
                ));
                None
            }
            (_, true) => None,
        }
    }

    /// The columns of a source's `schema:`, each checked, in order.
    fn source_columns(&mut self, r: &RawPipeline, name: &str, s: &SourceSpec) -> Vec<Column> {
        let mut columns = Vec::new();
        let at_column = |msg: String, col: &str| {
            Problem::new(&r.file, msg).at(key_pos(&s.schema.referenced, &r.text, col), &r.text)
        };
        for (col, c) in &s.schema.value {
            if !valid_identifier(col) {
                self.problems.push(at_column(
                    format!("column name '{col}' must be lowercase letters, digits and '_'"),
                    col,
                ));
            }
            let c = c.clone().into_full();
            if c.format.is_some() && !matches!(c.ty, ColumnType::Date | ColumnType::Timestamp) {
                self.problems.push(at_column(
                    format!("column '{col}': `format:` applies to date and timestamp columns only"),
                    col,
                ));
            }
            columns.push(Column {
                name: col.clone(),
                source_name: c.source.clone().unwrap_or_else(|| col.clone()),
                ty: c.ty,
                required: c.required,
                format: c.format,
            });
        }
        if columns.is_empty() {
            self.problems.push(r.here(
                format!("source '{name}' declares no columns under `schema:`"),
                &s.schema.referenced,
            ));
        }
        columns
    }

    /// A source's CSV settings from its `csv:` options (checked), or the defaults.
    fn source_csv(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> CsvSettings {
        if s.csv.is_some() && s.format != SourceFormat::Csv {
            self.problems.push(r.here(
                format!("source '{name}': `csv:` options need `format: csv`"),
                at,
            ));
        }
        s.csv.as_ref().map_or_else(CsvSettings::default, |o| {
            let mut c = CsvSettings::default();
            let mut problems = Vec::new();
            let ascii = |opt: &str, ch: char, problems: &mut Vec<String>| -> Option<u8> {
                let ok = ch.is_ascii() && ch != '\n' && ch != '\r';
                if !ok {
                    problems.push(format!(
                        "source '{name}': csv {opt} must be one ASCII character other than a line \
                         break"
                    ));
                }
                ok.then_some(ch as u8)
            };
            // A bad delimiter is pointed at where it is written.
            let mut at_delimiter = None;
            match o.delimiter.as_ref().map(|d| d.value.as_str()) {
                None => {}
                Some("whitespace") => c.delimiter = Delimiter::Whitespace,
                Some(d) => {
                    at_delimiter = o.delimiter.as_ref().map(|d| d.referenced);
                    let mut chars = d.chars();
                    match (chars.next(), chars.next()) {
                        (Some(ch), None) => {
                            if let Some(b) = ascii("delimiter", ch, &mut problems) {
                                c.delimiter = Delimiter::Byte(b);
                            }
                        }
                        _ => problems.push(format!(
                            "source '{name}': csv delimiter '{d}' is not one character; write one \
                             ASCII character (`\"|\"`, `\"\\t\"` for a tab) or `whitespace` for \
                             runs of blanks"
                        )),
                    }
                }
            }
            let of_delimiter = problems.len();
            if let Some(q) = o.quote {
                c.quote = ascii("quote", q, &mut problems).unwrap_or(c.quote);
            }
            if let Some(ch) = o.comment {
                c.comment = ascii("comment", ch, &mut problems);
            }
            let delimiter = match c.delimiter {
                Delimiter::Byte(d) => Some(d),
                Delimiter::Whitespace => None,
            };
            if delimiter == Some(c.quote)
                || (c.comment.is_some() && (c.comment == delimiter || c.comment == Some(c.quote)))
            {
                problems.push(format!(
                    "source '{name}': csv delimiter, quote and comment must be different characters"
                ));
            }
            for (i, msg) in problems.into_iter().enumerate() {
                let loc = match at_delimiter {
                    Some(d) if i < of_delimiter => d,
                    _ => *at,
                };
                self.problems.push(r.here(msg, &loc));
            }
            c.header = o.header.unwrap_or(true);
            if let Some(n) = &o.null_values {
                c.null_values = n.clone();
            }
            c.trailing_delimiter = o.trailing_delimiter;
            c.skip_rows = o.skip_rows.unwrap_or(0);
            c.encoding = o.encoding.unwrap_or_default();
            c
        })
    }

    /// What is new since the last run for an incremental source, from `incremental:`.
    fn source_incremental(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> Option<Incremental> {
        match &s.incremental {
            None => None,
            Some(IncrementalSpec {
                files: Some(_),
                cursor: None,
                ..
            }) => Some(Incremental::NewFiles),
            Some(IncrementalSpec {
                files: None,
                cursor: Some(c),
                ..
            }) => {
                if !s.schema.value.contains_key(c) {
                    self.problems.push(r.here(
                        format!(
                            "source '{name}': incremental cursor '{c}' is not among its columns"
                        ),
                        at,
                    ));
                }
                Some(Incremental::Cursor(c.clone()))
            }
            Some(_) => {
                self.problems.push(r.here(
                    format!(
                        "source '{name}': `incremental:` takes one of `files: new` and \
                         `cursor: COLUMN`"
                    ),
                    at,
                ));
                None
            }
        }
    }

    /// Check that an incremental source's mode and format suit the way it finds what is new.
    fn check_incremental_fits(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
        incremental: Option<&Incremental>,
    ) {
        if incremental.is_some() && s.mode == WriteMode::Overwrite {
            self.problems.push(r.here(
                format!(
                    "source '{name}': an incremental source adds to its table; use `mode: append` \
                     or `mode: merge` (with `keys:`)"
                ),
                at,
            ));
        }
        if incremental == Some(&Incremental::NewFiles)
            && (s.format == SourceFormat::Delta || s.format.is_database())
        {
            self.problems.push(r.here(
                format!(
                    "source '{name}': `files: new` needs a file format; use `cursor:` for a \
                     Delta table or a database"
                ),
                at,
            ));
        }
    }

    /// A source's freshness thresholds (warn after, error after), from `freshness:`.
    fn source_freshness(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
    ) -> Option<(Option<std::time::Duration>, Option<std::time::Duration>)> {
        s.freshness.as_ref().map(|f| {
            let mut parse = |what: &str, v: &Option<serde_saphyr::Spanned<String>>| {
                let v = v.as_ref()?;
                match super::super::access::parse_duration(&v.value) {
                    Ok(d) => d,
                    Err(msg) => {
                        self.problems.push(r.here(
                            format!("source '{name}': freshness.{what}: {msg}"),
                            &v.referenced,
                        ));
                        None
                    }
                }
            };
            (
                parse("warn_after", &f.warn_after),
                parse("error_after", &f.error_after),
            )
        })
    }

    /// The database settings of a source, checked; `None` for a file source (after checking
    /// it uses no database setting).
    pub(super) fn database_source(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
        columns: &[Column],
        incremental: Option<&Incremental>,
    ) -> Option<Database> {
        let overlap = s.incremental.as_ref().and_then(|i| i.overlap.as_deref());
        if !s.format.is_database() {
            let used = [
                ("connection", s.connection.is_some()),
                ("query", s.query.is_some()),
                ("partition", s.partition.is_some()),
                ("deletes", s.deletes.is_some()),
                ("incremental.overlap", overlap.is_some()),
            ];
            for (what, _) in used.iter().filter(|(_, u)| *u) {
                self.problems.push(r.here(
                    format!("source '{name}': `{what}:` applies to database sources (`format: postgres` or `mysql`)"),
                    at,
                ));
            }
            return None;
        }
        if s.freshness.is_some() {
            self.problems.push(r.here(
                format!(
                    "source '{name}': `freshness:` judges the age of files; a database source has \
                     none (check the age of its cursor column in a data test instead)"
                ),
                at,
            ));
        }
        let connection = self.database_connection(r, name, s, at);
        let relation = self.database_relation(r, name, s, at);
        let partition = self.database_partition(r, name, s, at, columns);
        let overlap = self.database_overlap(r, name, at, overlap, columns, incremental);
        let deletes = self.database_deletes(r, name, s, at, columns);
        Some(Database {
            kind: match s.format {
                SourceFormat::Mysql => DatabaseKind::Mysql,
                _ => DatabaseKind::Postgres,
            },
            connection: connection?,
            relation: relation?,
            partition,
            overlap,
            deletes,
        })
    }

    /// Where a database source's connection URL comes from, from `connection:` (never a URL).
    fn database_connection(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> Option<ConnectionRef> {
        match &s.connection {
            None => {
                self.problems.push(r.here(
                    format!(
                        "source '{name}' needs `connection:`, the name of an environment variable \
                         holding the database URL (e.g. `connection: ERP_DATABASE_URL`) or \
                         `{{ file: PATH }}`; the URL itself never goes into a YAML file"
                    ),
                    at,
                ));
                None
            }
            Some(c) => match &c.value {
                ConnectionSpec::Name(v) | ConnectionSpec::From(ConnectionFrom::Env(v)) => {
                    if v.contains("://") {
                        self.problems.push(r.here(
                            format!(
                                "source '{name}': `connection:` looks like a URL; put the URL in \
                                 an environment variable (or a file) and name that here, so no \
                                 password is written in a YAML file"
                            ),
                            &c.referenced,
                        ));
                        None
                    } else if v.is_empty()
                        || !v.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
                    {
                        self.problems.push(r.here(
                            format!(
                                "source '{name}': `connection: {v}` is not an environment \
                                 variable name (letters, digits and '_')"
                            ),
                            &c.referenced,
                        ));
                        None
                    } else {
                        Some(ConnectionRef::Env(v.clone()))
                    }
                }
                ConnectionSpec::From(ConnectionFrom::File(f)) => {
                    Some(ConnectionRef::File(self.root.join(f)))
                }
            },
        }
    }

    /// What a database source reads: the table of `location:` or the SELECT of `query:`.
    fn database_relation(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> Option<Relation> {
        match (&s.location, &s.query) {
            (Some(t), None) => {
                let ok = {
                    let parts: Vec<&str> = t.value.split('.').collect();
                    parts.len() <= 3
                        && parts.iter().all(|p| {
                            let mut ch = p.chars();
                            ch.next().is_some_and(|c| c.is_alphabetic() || c == '_')
                                && ch.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
                        })
                };
                if !ok {
                    self.problems.push(r.here(
                        format!(
                            "source '{name}': `location: {}` is not a table name; write \
                             `schema.table`, or use `query:` for anything else",
                            t.value
                        ),
                        &t.referenced,
                    ));
                }
                Some(Relation::Table(t.value.clone()))
            }
            (None, Some(q)) => {
                let text = q.value.trim().trim_end_matches(';').trim().to_string();
                let lower = text.to_ascii_lowercase();
                if !(lower.starts_with("select") || lower.starts_with("with")) {
                    self.problems.push(r.here(
                        format!("source '{name}': `query:` must be one SELECT"),
                        &q.referenced,
                    ));
                }
                Some(Relation::Query(text))
            }
            (None, None) => {
                self.problems.push(r.here(
                    format!(
                        "source '{name}' reads a database: give the table as `location: \
                         schema.table`, or a SELECT as `query:`"
                    ),
                    at,
                ));
                None
            }
            (Some(_), Some(q)) => {
                self.problems.push(r.here(
                    format!("source '{name}': give `location:` (a table) or `query:`, not both"),
                    &q.referenced,
                ));
                None
            }
        }
    }

    /// A database source's parallel reads (column, number of ranges), from `partition:`.
    fn database_partition(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
        columns: &[Column],
    ) -> Option<(String, u32)> {
        let column = |c: &str| columns.iter().find(|x| x.name == c);
        s.partition.as_ref().and_then(|p| {
            let ok_type = column(&p.column)
                .is_some_and(|c| matches!(c.ty, ColumnType::Int | ColumnType::BigInt));
            if !ok_type {
                self.problems.push(r.here(
                    format!(
                        "source '{name}': partition column '{}' must be an int or bigint column \
                         of its schema",
                        p.column
                    ),
                    at,
                ));
                None
            } else if !(1..=64).contains(&p.parts) {
                self.problems.push(r.here(
                    format!("source '{name}': partition parts must be 1 to 64"),
                    at,
                ));
                None
            } else {
                Some((p.column.clone(), p.parts))
            }
        })
    }

    /// How far below the watermark an incremental database read starts again (`overlap:`).
    fn database_overlap(
        &mut self,
        r: &RawPipeline,
        name: &str,
        at: &serde_saphyr::Location,
        overlap: Option<&str>,
        columns: &[Column],
        incremental: Option<&Incremental>,
    ) -> Option<std::time::Duration> {
        let column = |c: &str| columns.iter().find(|x| x.name == c);
        match overlap {
            None => None,
            Some(o) => {
                let cursor_ok = match incremental {
                    Some(Incremental::Cursor(c)) => column(c)
                        .is_some_and(|c| matches!(c.ty, ColumnType::Timestamp | ColumnType::Date)),
                    _ => false,
                };
                if !cursor_ok {
                    self.problems.push(r.here(
                        format!(
                            "source '{name}': `overlap:` needs a `cursor:` column of type \
                             timestamp or date"
                        ),
                        at,
                    ));
                }
                match super::super::access::parse_duration(o) {
                    Ok(d) => d,
                    Err(msg) => {
                        self.problems
                            .push(r.here(format!("source '{name}': overlap: {msg}"), at));
                        None
                    }
                }
            }
        }
    }

    /// How deletes at a database source are found, from `deletes:`.
    fn database_deletes(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
        columns: &[Column],
    ) -> Option<Deletes> {
        let column = |c: &str| columns.iter().find(|x| x.name == c);
        match &s.deletes {
            None => None,
            Some(d) => {
                if s.mode != WriteMode::Merge {
                    self.problems.push(r.here(
                        format!(
                            "source '{name}': `deletes:` marks rows by key; it needs `mode: \
                             merge` with `keys:`"
                        ),
                        at,
                    ));
                }
                if columns.iter().any(|c| c.name == DELETED_AT) {
                    self.problems.push(r.here(
                        format!(
                            "source '{name}': with `deletes:` kbcrm adds the column \
                             '{DELETED_AT}'; the schema may not declare it"
                        ),
                        at,
                    ));
                }
                match d {
                    DeletesSpec::SoftColumn(c) => {
                        let ok = column(c).is_some_and(|c| {
                            matches!(
                                c.ty,
                                ColumnType::Timestamp | ColumnType::Date | ColumnType::Bool
                            )
                        });
                        if !ok {
                            self.problems.push(r.here(
                                format!(
                                    "source '{name}': soft_column '{c}' must be a timestamp, \
                                     date or bool column of its schema"
                                ),
                                at,
                            ));
                        }
                        Some(Deletes::SoftColumn(c.clone()))
                    }
                    DeletesSpec::CompareKeys(every) => {
                        if every == "always" {
                            Some(Deletes::CompareKeys(None))
                        } else {
                            match super::super::access::parse_duration(every) {
                                Ok(d) => Some(Deletes::CompareKeys(d)),
                                Err(msg) => {
                                    self.problems.push(r.here(
                                        format!(
                                            "source '{name}': compare_keys: {msg} (or `always`)"
                                        ),
                                        at,
                                    ));
                                    None
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// How a source's rows meet its table, from `mode:` and `keys:`; `None` (with the problem
    /// reported) when they do not fit together.
    fn source_write(
        &mut self,
        r: &RawPipeline,
        name: &str,
        s: &SourceSpec,
        at: &serde_saphyr::Location,
    ) -> Option<Write> {
        let what = format!("source '{name}'");
        let problem = if s.mode == WriteMode::Scd2 {
            Some(format!(
                "{what}: `mode: scd2` builds a model's history; load the source with `mode: \
                 append` or `mode: merge` and keep its history in an SQL model with `mode: scd2`"
            ))
        } else if s.mode == WriteMode::Merge && s.keys.is_empty() {
            Some(format!(
                "{what}: `mode: merge` needs `keys:` (the columns that identify a row)"
            ))
        } else if s.mode != WriteMode::Merge && !s.keys.is_empty() {
            Some(format!("{what}: `keys:` is only used with `mode: merge`"))
        } else {
            s.keys
                .iter()
                .find(|k| !s.schema.value.contains_key(*k))
                .map(|k| format!("{what}: key column '{k}' is not among its columns"))
        };
        if let Some(msg) = problem {
            self.problems
                .push(Problem::new(&r.file, msg).at(yaml_pos(at, &r.text), &r.text));
            return None;
        }
        Some(match s.mode {
            WriteMode::Append => Write::Append,
            WriteMode::Merge => Write::Merge {
                keys: s.keys.clone(),
            },
            _ => Write::Overwrite,
        })
    }
}

/// What a source reads, from its format and the location or database settings that suit it.
fn source_input(
    format: SourceFormat,
    location: Option<Location>,
    csv: CsvSettings,
    database: Option<Database>,
) -> Option<Input> {
    match (format, location, database) {
        (SourceFormat::Csv, Some(location), _) => Some(Input::Files {
            format: FileFormat::Csv(csv),
            location,
        }),
        (SourceFormat::Json, Some(location), _) => Some(Input::Files {
            format: FileFormat::Json,
            location,
        }),
        (SourceFormat::Parquet, Some(location), _) => Some(Input::Files {
            format: FileFormat::Parquet,
            location,
        }),
        (SourceFormat::Delta, Some(location), _) => Some(Input::Files {
            format: FileFormat::Delta,
            location,
        }),
        (SourceFormat::Postgres | SourceFormat::Mysql, _, Some(db)) => Some(Input::Database(db)),
        // The problem is already reported.
        _ => None,
    }
}
