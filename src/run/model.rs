//! Building models and identity resolutions, skipping those whose inputs did not change.

mod identity;
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
use crate::error::{Error, Result};
use crate::identity::{LastFigures, RecordIds, Regrouped, Resolution, Since};
use crate::plan::Identity;
use crate::plan::{Model, ModelIncremental, ModelWrite, Slices, Write};
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
async fn slice_count(ctx: &SessionContext, model: &Model, spec: &Slices) -> Result<u64> {
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
        let result = self
            .write_model_on(ctx, model, cluster.as_ref(), slices)
            .await
            .map_err(|e| model_err(&e));
        for (table, provider) in narrowed {
            ctx.deregister_table(table.as_str())?;
            ctx.register_table(table.as_str(), provider)?;
        }
        let new = result?;
        step_done(&model.name, "model SQL written", started);
        let looked_up = Instant::now();
        let rows = new.rows;
        let write = match (self.options.full_refresh, &model.write) {
            (true, ModelWrite::Table(Write::Merge { .. })) => &ModelWrite::Table(Write::Overwrite),
            (_, w) => w,
        };
        // Rebuilt keys: rows of them the SQL no longer gives go, so that each key's rows are
        // what a whole build would hold.
        let vanished = match (
            &rebuilt,
            model.incremental.as_ref().and_then(|i| i.key.as_ref()),
        ) {
            (Some(keys), Some(key)) if write.is_merge() => {
                self.vanished_rows(ctx, model, key, keys.clone(), &new)
                    .await?
            }
            _ => None,
        };
        step_done(&model.name, "vanished rows looked up", looked_up);
        let staged = match (write, vanished) {
            (ModelWrite::Scd2(opts), _) => {
                stage_scd2(&self.wh, ctx, new, opts, state.run_micros).await
            }
            (ModelWrite::Table(_), Some(gone)) => {
                stage_merge_removing(&self.wh, ctx, new, write.keys(), gone).await
            }
            (ModelWrite::Table(w), None) => stage(&self.wh, ctx, new, w).await,
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

    /// Run the model's SQL into new, uncommitted files: on `cluster` when given (in this
    /// process when the cluster cannot be sent its plan), else here, in `slices` slices when
    /// there are more than one.
    async fn write_model_on(
        &self,
        ctx: &SessionContext,
        model: &Model,
        cluster: Option<&SessionContext>,
        slices: u64,
    ) -> Result<NewData> {
        let mut result = match &model.slices {
            Some(spec) if slices > 1 => self.write_sliced(ctx, model, &spec.by, slices).await,
            _ => self.write_model(cluster.unwrap_or(ctx), model).await,
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
        result
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
        inc: &ModelIncremental,
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
                .write
                .keys()
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
}

/// Whether `e` says the plan could not be sent to the cluster (Ballista serialises plans with
/// DataFusion's codec, which has no form for table functions such as `generate_series` or for
/// custom tables): nothing ran, so the model can run here instead.
fn not_distributable(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("failed to serialize logical plan")
        || text.contains("LogicalExtensionCodec is not provided")
}
