//! Building models and identity resolutions, skipping those whose inputs did not change.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, JoinType};
use datafusion::datasource::MemTable;
use datafusion::prelude::{DataFrame, Expr, SessionContext, cast, col, ident, lit};
use deltalake::kernel::Action;
use sha2::{Digest, Sha256};
use tracing::{Instrument, info, instrument};
use url::Url;

use super::{RunState, Runner, StepFigures};
use crate::config::pipeline::WriteMode;
use crate::config::pipeline::{ModelIncrementalSpec, SlicesSpec};
use crate::error::{Error, Result};
use crate::identity::{LastFigures, RecordIds, Regrouped, Resolution, Since};
use crate::plan::Identity;
use crate::plan::Model;
use crate::warehouse::scd2::stage_scd2;
use crate::warehouse::state::{StateKey, stage_batch_as};
use crate::warehouse::write::{
    NewData, add_record_count, delete_files, file_url, merge_sorted_files, new_rows, stage,
    stage_merge_removing, step_done, unchanged_since, write_frame,
};
use crate::warehouse::{DataFile, table_files_provider};

/// What a step was built from: a hash of its definition and the version of each input.
pub(super) fn fingerprint(definition: &str, inputs: &[String], state: &RunState) -> String {
    let hash = definition_hash(definition);
    let versions: BTreeMap<&str, Option<u64>> = inputs
        .iter()
        .map(|t| (t.as_str(), state.version_after(t)))
        .collect();
    serde_json::json!({ "definition": hash, "inputs": versions }).to_string()
}

/// The hash of a definition a fingerprint records.
pub(super) fn definition_hash(definition: &str) -> String {
    hex::encode(Sha256::digest(definition.as_bytes()))
}

/// A driving table of an incremental model: its name, its full provider, its added rows.
type Driver<'a> = (&'a String, Arc<dyn TableProvider>, Arc<dyn TableProvider>);

/// The column of the key set an incremental model with a key rebuilds.
const KEYS_COLUMN: &str = "__kbcrm_key";

/// What an incremental model's inputs were narrowed to: the full providers of the driving
/// tables, to register again after the build, and the keys rebuilt (with `incremental: { key }`).
#[derive(Default)]
struct Narrowed {
    restore: Vec<(String, Arc<dyn TableProvider>)>,
    keys: Option<DataFrame>,
}

/// What to do when a model needs more memory than the engine may use.
fn out_of_memory_help(limit: Option<usize>) -> String {
    let limit = limit.map_or("the memory limit".to_string(), |b| {
        format!("the memory limit ({} MiB)", b / (1024 * 1024))
    });
    format!(
        "the model needs more than {limit} at once, in an operator that cannot spill to disk \
         (a hash join's build side, a window function over all rows): raise `engine.memory_limit` \
         in kbcrm.yaml (or --memory-limit), or rewrite the SQL to hold less at once (window \
         functions over fewer columns, GROUP BY forms). Nothing was committed"
    )
}

/// The type of `key` in a driving table, or an error naming the model and table without it.
fn key_type(
    model: &Model,
    table: &str,
    key: &str,
    full: &Arc<dyn TableProvider>,
) -> Result<DataType> {
    match full.schema().field_with_name(key) {
        Ok(f) => Ok(f.data_type().clone()),
        Err(_) => Err(Error::Model {
            model: model.name.clone(),
            file: model.file.clone(),
            message: format!(
                "`incremental:` key '{key}' is not a column of table '{table}'; every table listed \
                 under `tables:` needs it"
            ),
            help: None,
        }),
    }
}

/// How many slices a model with `slices:` is built in: enough that no slice holds more than
/// `rows` rows of its largest input table with the sliced column.
async fn slice_count(ctx: &SessionContext, model: &Model, spec: &SlicesSpec) -> Result<u64> {
    let mut largest = 0u64;
    for table in &model.depends_on {
        let provider = ctx.table_provider(table.as_str()).await?;
        if provider.schema().column_with_name(&spec.by).is_some() {
            let rows = ctx.read_table(provider)?.count().await? as u64;
            largest = largest.max(rows);
        }
    }
    let slices = largest.div_ceil(spec.rows.max(1)).max(1);
    if slices > 1 {
        info!(largest, slices, by = %spec.by, "the model is built in slices");
    }
    Ok(slices)
}

fn inputs_key(pipeline: &str, name: &str) -> StateKey {
    (pipeline.to_string(), name.to_string(), "inputs".to_string())
}

/// The input version recorded in a fingerprint.
fn recorded_version(fingerprint: &str, table: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(fingerprint).ok()?;
    v.get("inputs")?.get(table)?.as_u64()
}

impl Runner {
    /// Whether `outputs` exist and were built from exactly this definition and these inputs.
    fn up_to_date(&self, state: &RunState, key: &StateKey, print: &str, outputs: &[&str]) -> bool {
        !self.options.full_refresh
            && state.state_before.get(key).is_some_and(|p| p == print)
            && outputs.iter().all(|t| state.version_after(t).is_some())
    }

    #[instrument(skip_all, fields(model = %model.name))]
    pub(super) async fn build_model(
        &self,
        model: &Model,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let key = inputs_key(&model.pipeline, &model.name);
        let print = fingerprint(
            &crate::engine::udf::model_definition(model, &state.params),
            &model.depends_on,
            state,
        );
        if self.up_to_date(state, &key, &print, &[&model.name]) {
            self.skip(state, &model.name, "model", "up to date");
            return Ok(());
        }
        if model.rollup {
            // Refused before it is built: SQL that queries could not be answered from.
            crate::engine::rollup::definition(ctx, model).await?;
        }
        let bar = self.progress.step(&format!("build {}", model.name));
        let memory_limit = self.project.engine.memory_limit;
        let model_err = |e: &Error| Error::Model {
            model: model.name.clone(),
            file: model.file.clone(),
            message: e.to_string(),
            help: e
                .is_out_of_memory()
                .then(|| out_of_memory_help(memory_limit)),
        };
        // An incremental model reads only what its driving tables gained.
        let Narrowed {
            restore: narrowed,
            keys: rebuilt,
        } = match &model.incremental {
            Some(inc) if !self.options.full_refresh => {
                self.narrow_inputs(ctx, state, model, inc, &key).await?
            }
            _ => Narrowed::default(),
        };
        // A model reading only what changed runs on one partition, beside the run's other
        // steps (its session is its own): repartitioning a few rows cost more than it gave.
        let _one_partition = (!narrowed.is_empty() && self.threads(state) > 1)
            .then(|| crate::engine::one_partition(ctx));
        // On the project's cluster, unless inputs were narrowed to what changed (those are
        // views of this process's tables).
        let cluster = match &state.cluster {
            Some(cluster) if narrowed.is_empty() => {
                tracing::info!(model = %model.name, "SQL runs on the Ballista cluster");
                Some(cluster.clone())
            }
            _ => None,
        };
        // Built whole here: a slice of its key at a time when its inputs are large.
        let slices = match (&model.slices, narrowed.is_empty(), &cluster) {
            (Some(spec), true, None) => slice_count(ctx, model, spec).await?,
            _ => 1,
        };
        let mut result = match &model.slices {
            Some(spec) if slices > 1 => self.write_sliced(ctx, model, &spec.by, slices).await,
            _ => {
                self.write_model(cluster.as_ref().unwrap_or(ctx), model)
                    .await
            }
        };
        if let Err(e) = &result
            && cluster.is_some()
            && not_distributable(e)
        {
            tracing::warn!(
                model = %model.name,
                reason = %e.to_string().lines().next().unwrap_or_default(),
                "the cluster cannot be sent this model's plan (a table function or a table \
                 only this process has); it runs in this process"
            );
            result = self.write_model(ctx, model).await;
        }
        let result = result.map_err(|e| model_err(&e));
        for (table, provider) in narrowed {
            ctx.deregister_table(table.as_str())?;
            ctx.register_table(table.as_str(), provider)?;
        }
        let new = result?;
        step_done(&model.name, "model SQL written", started);
        let looked_up = Instant::now();
        let rows = new.rows;
        let mode = match (self.options.full_refresh, model.mode) {
            (true, WriteMode::Merge) => WriteMode::Overwrite,
            (_, m) => m,
        };
        // Rebuilt keys: rows of them the SQL no longer gives go, so that each key's rows are
        // what a whole build would hold.
        let vanished = match (
            &rebuilt,
            model.incremental.as_ref().and_then(|i| i.key.as_ref()),
        ) {
            (Some(keys), Some(key)) if mode == WriteMode::Merge => {
                self.vanished_rows(ctx, model, key, keys.clone(), &new)
                    .await?
            }
            _ => None,
        };
        step_done(&model.name, "vanished rows looked up", looked_up);
        let staged = match (mode, &model.scd2, vanished) {
            (WriteMode::Scd2, Some(opts), _) => {
                stage_scd2(&self.wh, ctx, new, &model.keys, opts, state.run_micros).await
            }
            (_, _, Some(gone)) => stage_merge_removing(&self.wh, ctx, new, &model.keys, gone).await,
            _ => stage(&self.wh, ctx, new, mode, &model.keys).await,
        }
        .map_err(|e| super::in_pipeline(e, &model.pipeline))?;
        bar.inc(rows, 0);
        bar.finish();
        self.record(
            ctx,
            state,
            staged,
            StepFigures {
                kind: "model",
                rows_in: rows,
                rows_rejected: 0,
                started,
            },
        )
        .await?;
        state.state_after.insert(key, print);
        Ok(())
    }

    /// Run `sql` into new, uncommitted files of `table` (with sort-merge joins when a hash join
    /// does not fit the memory limit).
    async fn write_sql(
        &self,
        ctx: &SessionContext,
        sql: &str,
        table: &str,
        cluster_by: &[String],
        files_by: Option<&str>,
    ) -> Result<NewData> {
        crate::engine::spill_joins_on_retry(ctx, table, || async {
            write_frame(&self.wh, table, ctx.sql(sql).await?, cluster_by, files_by).await
        })
        .await
    }

    /// Run the model's SQL into new, uncommitted files of its table, in its layout.
    async fn write_model(&self, ctx: &SessionContext, model: &Model) -> Result<NewData> {
        self.write_sql(
            ctx,
            &model.sql,
            &model.name,
            &model.cluster_by,
            model.files_by.as_deref(),
        )
        .await
    }

    /// Run the model's SQL once per slice of `by`, each time with every input table that has
    /// that column narrowed to the slice's rows, into one set of new files.
    async fn write_sliced(
        &self,
        ctx: &SessionContext,
        model: &Model,
        by: &str,
        slices: u64,
    ) -> Result<NewData> {
        let mut sliced = Vec::new();
        for table in &model.depends_on {
            let full = ctx.table_provider(table.as_str()).await?;
            if full.schema().column_with_name(by).is_some() {
                sliced.push((table.as_str(), full));
            }
        }
        let mut out: Option<NewData> = None;
        let built = async {
            for slice in 0..slices {
                for (table, full) in &sliced {
                    let rows = ctx
                        .read_table(full.clone())?
                        .filter(crate::engine::udf::slice_of(ident(by), slices).eq(lit(slice)))?
                        .into_view();
                    ctx.deregister_table(*table)?;
                    ctx.register_table(*table, rows)?;
                }
                info!(slice = slice + 1, slices, by, "building a slice");
                let part = self.write_model(ctx, model).await?;
                match &mut out {
                    Some(all) => {
                        all.adds.extend(part.adds);
                        all.rows += part.rows;
                    }
                    None => out = Some(part),
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        for (table, full) in sliced {
            ctx.deregister_table(table)?;
            ctx.register_table(table, full)?;
        }
        match (built, out) {
            // Each slice's files are sorted on their own; the table's order is one run.
            (Ok(()), Some(all)) => merge_sorted_files(&self.wh, ctx, all).await,
            (built, written) => {
                if let Some(written) = written {
                    let url = self.wh.table_url(&model.name);
                    delete_files(&self.wh, &url, &written.adds).await?;
                }
                Err(built
                    .err()
                    .unwrap_or_else(|| Error::Internal("no slice was built".into())))
            }
        }
    }

    /// Register, in place of each driving table, only the rows it gained since the model was
    /// last built, or (with a key) every row of the keys among those rows. Returns the tables'
    /// full providers to restore afterwards; none when the model must read everything (first
    /// build, or no record of what it read).
    async fn narrow_inputs(
        &self,
        ctx: &SessionContext,
        state: &RunState,
        model: &Model,
        inc: &ModelIncrementalSpec,
        key: &StateKey,
    ) -> Result<Narrowed> {
        if state.version_after(&model.name).is_none() {
            return Ok(Narrowed::default());
        }
        let Some(print) = state.state_before.get(key) else {
            return Ok(Narrowed::default());
        };
        let mut added = Vec::new();
        for table in &inc.tables {
            let Some(before) = recorded_version(print, table) else {
                return Ok(Narrowed::default());
            };
            let full = ctx.table_provider(table.as_str()).await?;
            let files = self.added_files(state, table, before).await?;
            info!(
                table = table.as_str(),
                files = files.len(),
                since_version = before,
                "reading only the rows added to a driving table"
            );
            let new_rows = table_files_provider(&files, full.schema()).await?;
            added.push((table, full, new_rows));
        }
        let mut restore = Vec::new();
        let keys = match &inc.key {
            Some(k) => Some(self.added_keys(ctx, model, k, &added).await?),
            None => None,
        };
        for (table, full, new_rows) in added {
            let narrowed = match (&inc.key, &keys) {
                (Some(k), Some(keys)) => {
                    let ty = key_type(model, table, k, &full)?;
                    let keys = keys
                        .clone()
                        .select(vec![cast(col(KEYS_COLUMN), ty).alias(KEYS_COLUMN)])?;
                    ctx.read_table(full.clone())?
                        .join_on(keys, JoinType::LeftSemi, [ident(k).eq(col(KEYS_COLUMN))])?
                        .into_view()
                }
                _ => new_rows,
            };
            ctx.deregister_table(table.as_str())?;
            ctx.register_table(table.as_str(), narrowed)?;
            restore.push((table.clone(), full));
        }
        Ok(Narrowed { restore, keys })
    }

    /// The keys (the model's `keys:` columns) of rows its table holds for the rebuilt values of
    /// `key` that the new rows no longer hold: an order whose line of some category was
    /// cancelled, say. None when the table has no `key` column or no such row.
    async fn vanished_rows(
        &self,
        ctx: &SessionContext,
        model: &Model,
        key: &str,
        rebuilt: DataFrame,
        new: &NewData,
    ) -> Result<Option<RecordBatch>> {
        let table = ctx.table_provider(model.name.as_str()).await?;
        let Ok(field) = table.schema().field_with_name(key).cloned() else {
            return Ok(None);
        };
        let rebuilt = rebuilt.select(vec![
            cast(col(KEYS_COLUMN), field.data_type().clone()).alias(KEYS_COLUMN),
        ])?;
        let columns = |qualifier: &str| -> Vec<Expr> {
            model
                .keys
                .iter()
                .map(|k| Expr::Column(Column::new(Some(qualifier), k)))
                .collect()
        };
        let before = ctx
            .read_table(table)?
            .join_on(
                rebuilt,
                JoinType::LeftSemi,
                [ident(key).eq(col(KEYS_COLUMN))],
            )?
            .alias("before")?
            .select(columns("before"))?;
        let now = ctx
            .read_table(new_rows(&self.wh, new).await?)?
            .alias("now")?
            .select(columns("now"))?;
        let on: Vec<Expr> = columns("before")
            .into_iter()
            .zip(columns("now"))
            .map(|(b, n)| b.eq(n))
            .collect();
        let gone = before.join_on(now, JoinType::LeftAnti, on)?;
        let schema = Arc::new(gone.schema().as_arrow().clone());
        let batches = gone.collect().await?;
        let gone = datafusion::arrow::compute::concat_batches(&schema, &batches)?;
        if gone.num_rows() > 0 {
            info!(
                model = %model.name,
                rows = gone.num_rows(),
                "removing rows of rebuilt keys that the model no longer gives"
            );
        }
        Ok((gone.num_rows() > 0).then_some(gone))
    }

    /// Files of `table` now that were not among its files at version `before`, less those a
    /// merge wrote with the rows it kept unchanged from version `before` (their rows are not
    /// new to a model that read that version). A file that merely lost rows to a deletion
    /// vector since is not among them.
    async fn added_files(
        &self,
        state: &RunState,
        table: &str,
        before: u64,
    ) -> Result<Vec<DataFile>> {
        let staged = state.staged(table).filter(|s| s.changes());
        let now: Vec<DataFile> = match staged {
            Some(s) => s.files.clone(),
            None => self.wh.files_at(table, None).await?,
        };
        let then: HashSet<Url> = self
            .wh
            .files_at(table, Some(before))
            .await?
            .into_iter()
            .map(|f| f.url)
            .collect();
        let mut unchanged = self.wh.files_unchanged_since(table).await?;
        if let Some(s) = staged {
            for a in &s.actions {
                if let Action::Add(add) = a
                    && let Some(v) = unchanged_since(add)
                {
                    unchanged.insert(file_url(&s.url, &add.path), v);
                }
            }
        }
        Ok(now
            .into_iter()
            .filter(|f| !then.contains(&f.url) && unchanged.get(&f.url) != Some(&before))
            .collect())
    }

    /// The distinct values of `key` among the added rows of every driving table, in memory,
    /// as a one-column frame typed as the first table's key.
    async fn added_keys(
        &self,
        ctx: &SessionContext,
        model: &Model,
        key: &str,
        added: &[Driver<'_>],
    ) -> Result<DataFrame> {
        let mut all: Option<DataFrame> = None;
        let mut ty = None;
        for (table, full, new_rows) in added {
            let t = ty.get_or_insert(key_type(model, table, key, full)?).clone();
            let df = ctx
                .read_table(new_rows.clone())?
                .select(vec![cast(ident(key), t).alias(KEYS_COLUMN)])?;
            all = Some(match all {
                Some(a) => a.union(df)?,
                None => df,
            });
        }
        let keys = all
            .ok_or_else(|| Error::Internal("an incremental model without tables".into()))?
            .distinct()?;
        // In one batch of buffers holding just the keys (string views are compacted: they
        // point into the pages they were read from), the size DataFusion reckons is theirs, so
        // up to some tens of thousands of keys are hashed once and each driving table streams
        // past them, rather than both sides being repartitioned by key.
        let schema = Arc::new(keys.schema().as_arrow().clone());
        let batches = keys.collect().await?;
        let batch = datafusion::arrow::compute::concat_batches(&schema, &batches)?;
        let columns = batch
            .columns()
            .iter()
            .map(|c| match c.as_string_view_opt() {
                Some(views) => Arc::new(views.gc()) as datafusion::arrow::array::ArrayRef,
                None => c.clone(),
            })
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), columns)?;
        info!(
            key,
            keys = batch.num_rows(),
            "rebuilding the rows of these keys"
        );
        let table = MemTable::try_new(schema, vec![vec![batch]])?;
        Ok(ctx.read_table(Arc::new(table))?)
    }
    /// The ids of records whose golden fields differ from the versions of their tables the last
    /// resolution read (new records included): the rows added to each table since, less those
    /// equal to a row of that version. Fails when that cannot be told (no record of those
    /// versions, or their files are gone), and the caller rebuilds everything.
    async fn edited_records(
        &self,
        ctx: &SessionContext,
        state: &RunState,
        identity: &Identity,
        key: &StateKey,
        record_ids: &RecordIds,
    ) -> Result<HashSet<String>> {
        let print = state
            .state_before
            .get(key)
            .ok_or_else(|| Error::Internal("no record of the last resolution".into()))?;
        let mut edited: Vec<HashSet<String>> = Vec::new();
        for s in &identity.sources {
            let before = recorded_version(print, &s.table)
                .ok_or_else(|| Error::Internal(format!("no version of '{}' recorded", s.table)))?;
            let now = ctx.table_provider(s.table.as_str()).await?;
            // A row not among those added since that version was in it, as it is.
            let added = self.added_files(state, &s.table, before).await?;
            let now = table_files_provider(&added, now.schema()).await?;
            let old_files = self.wh.files_at(&s.table, Some(before)).await?;
            let old = table_files_provider(&old_files, now.schema()).await?;
            let mut cols: Vec<&str> = vec![s.id.as_str()];
            cols.extend(s.fields.iter().map(|(_, c)| c.as_str()));
            cols.extend(s.updated_at.as_deref());
            cols.sort_unstable();
            cols.dedup();
            let pick =
                |df: DataFrame| df.select(cols.iter().map(|c| ident(*c)).collect::<Vec<_>>());
            let changed = pick(ctx.read_table(now)?)?
                .except(pick(ctx.read_table(old)?)?)?
                .select(vec![cast(ident(&s.id), DataType::Utf8).alias("id")])?
                .collect()
                .await?;
            let mut ids = HashSet::new();
            for b in &changed {
                let col = b.column(0).as_string::<i32>();
                ids.extend(col.iter().flatten().map(str::to_string));
            }
            edited.push(ids);
        }
        record_ids.ids_of(&edited).ok_or_else(|| {
            Error::Internal("an edited record is not among the records matched again".into())
        })
    }

    /// Rows of a table from the log's record counts, less the rows deletion vectors remove:
    /// at a committed version, or (`None`) as this run leaves it. `None` when a file's count is
    /// not recorded.
    async fn live_rows(
        &self,
        state: &RunState,
        table: &str,
        version: Option<u64>,
    ) -> Result<Option<u64>> {
        let staged = match version {
            Some(_) => None,
            None => state.staged(table).filter(|s| s.changes()),
        };
        // A committed version's count is in its log; a staged write's files are counted from
        // the log it read and the files it adds.
        let Some(s) = staged else {
            let version = version.or(state.committed.get(table).copied().flatten());
            return match version {
                Some(v) => self.wh.live_rows(table, Some(v)).await,
                None => Ok(None),
            };
        };
        let mut counts = match s.read_version {
            Some(v) => self.wh.record_counts(table, Some(v)).await?,
            None => Default::default(),
        };
        for a in &s.actions {
            if let Action::Add(add) = a
                && let Some(n) = add_record_count(add)
            {
                counts.insert(file_url(&s.url, &add.path), n);
            }
        }
        let files = &s.files;
        let mut rows = 0u64;
        for f in files {
            let Some(n) = counts.get(&f.url) else {
                return Ok(None);
            };
            rows += n.saturating_sub(f.deleted.as_ref().map_or(0, |d| d.count()));
        }
        Ok(Some(rows))
    }

    /// What the record tables of `identity` gained since its last resolution, each added-rows
    /// table registered in `ctx` (for the caller to deregister), when the match-key table that
    /// resolution wrote is still the table's current version and the definition is the same.
    async fn match_since(
        &self,
        ctx: &SessionContext,
        state: &RunState,
        identity: &Identity,
        key: &StateKey,
        keys_state: &StateKey,
    ) -> Result<Option<Since>> {
        if self.options.full_refresh {
            return Ok(None);
        }
        let (Some(print), Some(written)) = (
            state.state_before.get(key),
            state.state_before.get(keys_state),
        ) else {
            return Ok(None);
        };
        let same_definition = serde_json::from_str::<serde_json::Value>(print)
            .ok()
            .and_then(|p| p.get("definition")?.as_str().map(str::to_string))
            == Some(definition_hash(&identity.definition()));
        let written: serde_json::Value = serde_json::from_str(written).unwrap_or_default();
        let current = |table: &str, field: &str| {
            written.get(field).and_then(|v| v.as_u64()).is_some()
                && written.get(field).and_then(|v| v.as_u64()) == state.version_after(table)
        };
        if !same_definition
            || !current(&identity.map_table, "map")
            || !current(&identity.keys_table(), "keys")
        {
            return Ok(None);
        }
        let mut since = Since {
            added: Vec::new(),
            rows_then: Vec::new(),
            rows_now: Vec::new(),
            last: written
                .get("figures")
                .and_then(|f| <LastFigures as serde::Deserialize>::deserialize(f).ok()),
        };
        let mut providers = Vec::new();
        for s in &identity.sources {
            let Some(before) = recorded_version(print, &s.table) else {
                return Ok(None);
            };
            let (Some(then), Some(now)) = (
                self.live_rows(state, &s.table, Some(before)).await?,
                self.live_rows(state, &s.table, None).await?,
            ) else {
                return Ok(None);
            };
            let files = self.added_files(state, &s.table, before).await?;
            let full = ctx.table_provider(s.table.as_str()).await?;
            providers.push(table_files_provider(&files, full.schema()).await?);
            since.rows_then.push(then);
            since.rows_now.push(now);
        }
        for (i, provider) in providers.into_iter().enumerate() {
            let name = format!("__kbcrm_added_{}_{i}", identity.entity);
            ctx.deregister_table(name.as_str())?;
            ctx.register_table(name.as_str(), provider)?;
            since.added.push(name);
        }
        Ok(Some(since))
    }

    #[instrument(skip_all, fields(entity = %identity.entity))]
    pub(super) async fn resolve_identity(
        &self,
        identity: &Identity,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let step = format!("identity:{}", identity.entity);
        let key = inputs_key(&identity.pipeline, &step);
        let keys_state: StateKey = (
            identity.pipeline.clone(),
            step.clone(),
            "match keys".to_string(),
        );
        let keys_table = identity.keys_table();
        let inputs: Vec<String> = identity.sources.iter().map(|s| s.table.clone()).collect();
        let golden_sql = identity.golden_sql();
        let print = fingerprint(&identity.definition(), &inputs, state);
        if self.up_to_date(
            state,
            &key,
            &print,
            &[&identity.map_table, &identity.golden_table, &keys_table],
        ) {
            for table in [&identity.map_table, &identity.golden_table, &keys_table] {
                self.skip(state, table, "identity", "up to date");
            }
            return Ok(());
        }
        let bar = self.progress.step(&format!("match {}", identity.entity));
        let since = self
            .match_since(ctx, state, identity, &key, &keys_state)
            .await?;
        // Matching only the records added since the last resolution runs on one partition,
        // beside the run's other steps, as a narrowed model does.
        let one_partition =
            (since.is_some() && self.threads(state) > 1).then(|| crate::engine::one_partition(ctx));
        let resolution = identity
            .resolve(ctx, state.run_micros, since.as_ref())
            .await;
        for name in since.iter().flat_map(|s| &s.added) {
            ctx.deregister_table(name.as_str())?;
        }
        let Resolution {
            map,
            keys,
            whole,
            stats,
            regrouped,
            record_ids,
        } = resolution?;
        info!(%stats, "identity resolved");
        // A whole resolution replaces both tables; one from the added rows merges the records
        // whose id or rule changed (and, into the key table, the added ones).
        let (mode, on) = match whole {
            true => (WriteMode::Overwrite, Vec::new()),
            false => (
                WriteMode::Merge,
                vec!["source".to_string(), "source_id".to_string()],
            ),
        };
        // The key table is staged on a task of its own (only the next run reads it) while
        // the map is staged and the records edited since the last run are found here.
        let edited_wanted = regrouped.is_some()
            && !self.options.full_refresh
            && state.version_after(&identity.golden_table).is_some();
        let stage_keys =
            match !whole && keys.num_rows() == 0 {
                true => None,
                false => {
                    let (wh, keys_ctx) = (self.wh.clone(), crate::engine::fork_session(ctx).await?);
                    let (table, on) = (keys_table.clone(), on.clone());
                    Some(tokio::spawn(
                        async move {
                            stage_batch_as(&wh, &keys_ctx, &table, keys, mode, &on, !whole).await
                        }
                        .in_current_span(),
                    ))
                }
            };
        let stage_map = async {
            match !whole && map.num_rows() == 0 {
                true => Ok(None),
                false => stage_batch_as(&self.wh, ctx, &identity.map_table, map, mode, &on, !whole)
                    .await
                    .map(Some),
            }
        };
        let edited = async {
            match edited_wanted {
                true => Some(
                    self.edited_records(ctx, state, identity, &key, &record_ids)
                        .await,
                ),
                false => None,
            }
        };
        let (map_staged, edited) = futures::join!(stage_map, edited);
        let keys_staged = match stage_keys {
            Some(task) => task
                .await
                .map_err(|e| Error::Internal(format!("staging the match keys failed: {e}")))
                .and_then(|staged| staged.map(Some)),
            None => Ok(None),
        };
        // What was staged is recorded (and so removed if the run fails), or removed now once
        // one of them failed.
        let mut failed = None;
        for (table, staged) in [
            (&identity.map_table, map_staged),
            (&keys_table, keys_staged),
        ] {
            match staged {
                Ok(Some(staged)) if failed.is_none() => {
                    let rows = stats.records as u64;
                    let recorded = self
                        .record(
                            ctx,
                            state,
                            staged,
                            StepFigures {
                                kind: "identity",
                                rows_in: rows,
                                rows_rejected: 0,
                                started,
                            },
                        )
                        .await;
                    failed = recorded.err();
                }
                Ok(Some(staged)) => self.discard(std::slice::from_ref(&staged)).await,
                Ok(None) => self.skip(state, table, "identity", "unchanged"),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let written = serde_json::json!({
            "map": state.version_after(&identity.map_table),
            "keys": state.version_after(&keys_table),
            "figures": stats.last(),
        });
        state.state_after.insert(keys_state, written.to_string());
        let started = Instant::now();
        // Golden records change only for ids whose records changed: rebuild just those when
        // that is known (the table exists, no id or record disappeared, and the record tables'
        // previous versions can be compared with the current ones).
        let only = match (regrouped, edited) {
            (Some(mut regrouped), Some(edited)) => match edited {
                Ok(edited) => {
                    regrouped.changed.extend(edited);
                    Some(regrouped)
                }
                Err(e) => {
                    info!(reason = %e, "rebuilding every golden record");
                    None
                }
            },
            _ => None,
        };
        // Rebuilding only the golden records of changed ids is on one partition too; all of
        // them, on the session's.
        drop(one_partition);
        let _one_partition =
            (only.is_some() && self.threads(state) > 1).then(|| crate::engine::one_partition(ctx));
        let full_map = match &only {
            Some(Regrouped { changed: ids, gone }) => {
                info!(
                    ids = ids.len(),
                    gone = gone.len(),
                    "rebuilding the golden records of changed ids, removing those of merged ids"
                );
                let full = ctx.table_provider(identity.map_table.as_str()).await?;
                // The map's rows of those ids, from the resolution (which matched every record
                // of them), in memory with their count known: the golden SQL hashes these few
                // rows and streams the record tables past them.
                let rows = record_ids.map_rows(identity, ids)?;
                let narrowed = MemTable::try_new(rows.schema(), vec![vec![rows]])?;
                ctx.deregister_table(identity.map_table.as_str())?;
                ctx.register_table(identity.map_table.as_str(), Arc::new(narrowed))?;
                Some(full)
            }
            None => None,
        };
        // The records of changed ids are few: gathered first, in one partition, the golden
        // fields are then picked in one aggregation instead of a partial and a final one.
        const RECORDS: &str = "__kbcrm_golden_records";
        let written = async {
            match full_map {
                Some(_) => {
                    let records = ctx
                        .sql(&identity.records_sql())
                        .await?
                        .create_physical_plan()
                        .await?;
                    let schema = records.schema();
                    let rows = datafusion::physical_plan::collect(records, ctx.task_ctx()).await?;
                    tracing::debug!(
                        records = rows.iter().map(RecordBatch::num_rows).sum::<usize>(),
                        seconds = started.elapsed().as_secs_f64(),
                        "golden: records of changed ids gathered"
                    );
                    ctx.deregister_table(RECORDS)?;
                    ctx.register_table(RECORDS, Arc::new(MemTable::try_new(schema, vec![rows])?))?;
                    // Typed as the whole query types the golden fields (the table's columns;
                    // its union types a date beside a timestamp as the first).
                    let typed = ctx.sql(&golden_sql).await?.schema().clone();
                    let picked = ctx.sql(&identity.golden_select(RECORDS)).await?.select(
                        typed
                            .fields()
                            .iter()
                            .map(|f| match f.data_type() {
                                // A field only some sources have is left as it comes.
                                DataType::Null => ident(f.name()),
                                t => cast(ident(f.name()), t.clone()).alias(f.name()),
                            })
                            .collect::<Vec<_>>(),
                    )?;
                    write_frame(&self.wh, &identity.golden_table, picked, &[], None).await
                }
                None => {
                    self.write_sql(ctx, &golden_sql, &identity.golden_table, &[], None)
                        .await
                }
            }
        }
        .await
        .map_err(|e| {
            Error::Internal(format!(
                "the golden-record SQL of identity '{}' failed: {e}\n{golden_sql}",
                identity.entity
            ))
        });
        if let Some(full) = full_map {
            ctx.deregister_table(RECORDS)?;
            ctx.deregister_table(identity.map_table.as_str())?;
            ctx.register_table(identity.map_table.as_str(), full)?;
        }
        let new = written?;
        let rows = new.rows;
        let staged = match only {
            Some(Regrouped { gone, .. }) => {
                let keys = [identity.id_column.clone()];
                let schema = Arc::new(Schema::new(vec![Field::new(
                    identity.id_column.as_str(),
                    DataType::Utf8,
                    false,
                )]));
                let gone = StringArray::from_iter_values(gone.iter());
                let gone = RecordBatch::try_new(schema, vec![Arc::new(gone)])?;
                stage_merge_removing(&self.wh, ctx, new, &keys, gone).await?
            }
            None => stage(&self.wh, ctx, new, WriteMode::Overwrite, &[]).await?,
        };
        bar.finish();
        self.record(
            ctx,
            state,
            staged,
            StepFigures {
                kind: "identity",
                rows_in: rows,
                rows_rejected: 0,
                started,
            },
        )
        .await?;
        state.identities.push(stats);
        state.state_after.insert(key, print);
        Ok(())
    }
}

/// Whether `e` says the plan could not be sent to the cluster (Ballista serialises plans with
/// DataFusion's codec, which has no form for table functions such as `generate_series` or for
/// custom tables): nothing ran, so the model can run here instead.
fn not_distributable(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("failed to serialize logical plan")
        || text.contains("LogicalExtensionCodec is not provided")
}
