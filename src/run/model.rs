//! Building models and identity resolutions, skipping those whose inputs did not change.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::JoinType;
use datafusion::prelude::{DataFrame, SessionContext, cast, col, ident};
use sha2::{Digest, Sha256};
use tracing::{info, instrument};
use url::Url;

use super::{RunState, Runner};
use crate::config::pipeline::ModelIncrementalSpec;
use crate::config::pipeline::WriteMode;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::plan::Model;
use crate::warehouse::scd2::stage_scd2;
use crate::warehouse::state::{StateKey, stage_batch};
use crate::warehouse::write::{NewData, TableWriter, stage};
use crate::warehouse::{delta_compatible, files_provider};

/// What a step was built from: a hash of its definition and the version of each input.
fn fingerprint(definition: &str, inputs: &[String], state: &RunState) -> String {
    let hash = hex::encode(Sha256::digest(definition.as_bytes()));
    let versions: BTreeMap<&str, Option<u64>> = inputs
        .iter()
        .map(|t| (t.as_str(), state.version_after(t)))
        .collect();
    serde_json::json!({ "definition": hash, "inputs": versions }).to_string()
}

/// What a model's result depends on besides its inputs: its SQL and the run parameters it reads.
fn definition(sql: &str, params: &crate::udf::RunParams) -> String {
    let mut d = sql.to_string();
    if sql.contains("kbcrm_as_of") {
        d.push_str(&format!("\n-- as of {}", params.as_of_days));
    }
    if sql.contains("kbcrm_var") {
        d.push_str(&format!("\n-- vars {:?}", params.vars));
    }
    d
}

/// The column of the key set an incremental model with a key rebuilds.
const KEYS_COLUMN: &str = "__kbcrm_key";

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
        }),
    }
}

fn inputs_key(pipeline: &str, name: &str) -> StateKey {
    (pipeline.to_string(), name.to_string(), "inputs".to_string())
}

/// The input version recorded in a fingerprint.
fn recorded_version(fingerprint: &str, table: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(fingerprint).ok()?;
    v.get("inputs")?.get(table)?.as_u64()
}

impl Runner<'_> {
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
            &definition(&model.sql, &state.params),
            &model.depends_on,
            state,
        );
        if self.up_to_date(state, &key, &print, &[&model.name]) {
            self.skip(state, &model.name, "model", "up to date");
            return Ok(());
        }
        let bar = self.progress.step(&format!("build {}", model.name));
        let model_err = |e: &dyn std::fmt::Display| Error::Model {
            model: model.name.clone(),
            file: model.file.clone(),
            message: e.to_string(),
        };
        // An incremental model reads only what its driving tables gained.
        let narrowed = match &model.incremental {
            Some(inc) if !self.options.full_refresh => {
                self.narrow_inputs(ctx, state, model, inc, &key).await?
            }
            _ => Vec::new(),
        };
        let result = async {
            let df = ctx.sql(&model.sql).await.map_err(|e| model_err(&e))?;
            let schema = delta_compatible(df.schema().as_arrow());
            let stream = df.execute_stream().await.map_err(|e| model_err(&e))?;
            let url = self.wh.table_url(&model.name);
            let mut writer = TableWriter::new(&url, schema.clone())?;
            writer
                .write_stream(stream)
                .await
                .map_err(|e| model_err(&e))?;
            let (adds, rows) = writer.finish().await?;
            Ok::<_, Error>(NewData {
                table: model.name.clone(),
                schema,
                adds,
                rows,
            })
        }
        .await;
        for (table, provider) in narrowed {
            ctx.deregister_table(table.as_str())?;
            ctx.register_table(table.as_str(), provider)?;
        }
        let new = result?;
        let rows = new.rows;
        let mode = match (self.options.full_refresh, model.mode) {
            (true, WriteMode::Merge) => WriteMode::Overwrite,
            (_, m) => m,
        };
        let staged = match (mode, &model.scd2) {
            (WriteMode::Scd2, Some(opts)) => {
                stage_scd2(&self.wh, ctx, new, &model.keys, opts, state.run_micros).await
            }
            _ => stage(&self.wh, ctx, new, mode, &model.keys).await,
        }
        .map_err(|e| match e {
            Error::DataQuality { message, .. } => Error::DataQuality {
                pipeline: model.pipeline.clone(),
                message,
            },
            other => other,
        })?;
        bar.inc(rows, 0);
        bar.finish();
        self.record(ctx, state, staged, "model", rows, 0, started)
            .await?;
        state.state_after.insert(key, print);
        Ok(())
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
    ) -> Result<Vec<(String, Arc<dyn TableProvider>)>> {
        if state.version_after(&model.name).is_none() {
            return Ok(Vec::new());
        }
        let Some(print) = state.state_before.get(key) else {
            return Ok(Vec::new());
        };
        let mut added = Vec::new();
        for table in &inc.tables {
            let Some(before) = recorded_version(print, table) else {
                return Ok(Vec::new());
            };
            let full = ctx.table_provider(table.as_str()).await?;
            let files = self.added_files(state, table, before).await?;
            info!(
                table = table.as_str(),
                files = files.len(),
                since_version = before,
                "reading only the rows added to a driving table"
            );
            let new_rows = files_provider(&files, full.schema()).await?;
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
        Ok(restore)
    }

    /// Files of `table` now that were not among its files at version `before`.
    async fn added_files(&self, state: &RunState, table: &str, before: u64) -> Result<Vec<Url>> {
        let now: Vec<Url> = match state.staged(table) {
            Some(s) if s.changes() => s.files.clone(),
            _ => self.wh.files_at(table, None).await?,
        };
        let then: HashSet<Url> = self
            .wh
            .files_at(table, Some(before))
            .await?
            .into_iter()
            .collect();
        Ok(now.into_iter().filter(|u| !then.contains(u)).collect())
    }

    /// The distinct values of `key` among the added rows of every driving table, in memory,
    /// as a one-column frame typed as the first table's key.
    async fn added_keys(
        &self,
        ctx: &SessionContext,
        model: &Model,
        key: &str,
        added: &[(&String, Arc<dyn TableProvider>, Arc<dyn TableProvider>)],
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
            .distinct()?
            .cache()
            .await?;
        info!(
            key,
            keys = keys.clone().count().await?,
            "rebuilding the rows of these keys"
        );
        Ok(keys)
    }
    #[instrument(skip_all, fields(entity = %identity.entity))]
    pub(super) async fn resolve_identity(
        &self,
        identity: &Identity,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let key = inputs_key(&identity.pipeline, &format!("identity:{}", identity.entity));
        let inputs: Vec<String> = identity.sources.iter().map(|s| s.table.clone()).collect();
        let golden_sql = identity.golden_sql();
        let definition = format!("{:?}{golden_sql}", identity.rules);
        let print = fingerprint(&definition, &inputs, state);
        if self.up_to_date(
            state,
            &key,
            &print,
            &[&identity.map_table, &identity.golden_table],
        ) {
            self.skip(state, &identity.map_table, "identity", "up to date");
            self.skip(state, &identity.golden_table, "identity", "up to date");
            return Ok(());
        }
        let bar = self.progress.step(&format!("match {}", identity.entity));
        let (map, stats) = identity.resolve(ctx, state.run_micros).await?;
        info!(%stats, "identity resolved");
        let rows = map.num_rows() as u64;
        let staged = stage_batch(
            &self.wh,
            ctx,
            &identity.map_table,
            map,
            WriteMode::Overwrite,
            &[],
        )
        .await?;
        self.record(ctx, state, staged, "identity", rows, 0, started)
            .await?;
        let started = Instant::now();
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "identity: map staged"
        );
        let started = Instant::now();
        let df = ctx.sql(&golden_sql).await.map_err(|e| {
            Error::Internal(format!(
                "the golden-record SQL of identity '{}' failed: {e}\n{golden_sql}",
                identity.entity
            ))
        })?;
        let schema = delta_compatible(df.schema().as_arrow());
        let url = self.wh.table_url(&identity.golden_table);
        let mut writer = TableWriter::new(&url, schema.clone())?;
        writer.write_stream(df.execute_stream().await?).await?;
        let (adds, rows) = writer.finish().await?;
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "identity: golden records written"
        );
        let new = NewData {
            table: identity.golden_table.clone(),
            schema,
            adds,
            rows,
        };
        let staged = stage(&self.wh, ctx, new, WriteMode::Overwrite, &[]).await?;
        bar.finish();
        self.record(ctx, state, staged, "identity", rows, 0, started)
            .await?;
        state.identities.push(stats);
        state.state_after.insert(key, print);
        Ok(())
    }
}
