//! The one place that builds the DataFusion session: memory pool, spill folder, settings,
//! the warehouse's tables. The CLI, runs, cubes and the server all start here.
//!
//! Owns the session ([`session`], memory pools, spill), kbcrm's SQL functions ([`udf`]), the
//! optimizer rules ([`optimizer`]), rollup routing ([`rollup`]), roles' views of tables ([`roles`])
//! and Ballista clusters (`distributed`). May import `plan`, `config`, the leaves and
//! `cubes::models`; never a stage (sources, warehouse, identity, cubes) or anything above.

#[cfg(feature = "ballista")]
pub mod distributed;
pub mod optimizer;
pub mod roles;
pub mod rollup;
pub mod udf;

use std::num::NonZeroUsize;
use std::sync::Arc;

use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider,
};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
    TrackConsumersPool,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Error, Result};
use crate::plan::{EngineSettings, MemoryPoolKind};
use udf::RunParams;

/// Build a session with the project's engine settings and kbcrm's functions. Tables are
/// registered by the caller (see [`crate::warehouse::Warehouse::register_all`]).
pub fn session(settings: &EngineSettings, params: &RunParams) -> Result<SessionContext> {
    session_with_runtime(settings, params, runtime(settings)?)
}

/// The runtime of `kbcrm run`'s sessions, shared by the pipelines of a run: its memory pool is
/// `fair` unless the project says otherwise. A model's plan often holds several large sorts at
/// once (a `cluster_by` sort above sort-merge joins); with a greedy pool one of them takes the
/// memory the others need to merge their spills, and the model fails.
pub fn run_runtime(settings: &EngineSettings) -> Result<Arc<RuntimeEnv>> {
    runtime_with_pool(
        settings,
        settings.memory_pool.unwrap_or(MemoryPoolKind::Fair),
    )
}

/// A session on a runtime (memory pool, spill folder) shared with other sessions, as the
/// server's per-role sessions share one.
pub fn session_with_runtime(
    settings: &EngineSettings,
    params: &RunParams,
    runtime: Arc<RuntimeEnv>,
) -> Result<SessionContext> {
    let config = configure(SessionConfig::new(), settings)?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    udf::register(&ctx, params);
    crate::engine::optimizer::register(&ctx);
    Ok(ctx)
}

/// A session like [`session_with_runtime`]'s whose default catalog is named `catalog` (the
/// server names it after the database clients connect to).
pub fn session_in_catalog(
    settings: &EngineSettings,
    params: &RunParams,
    runtime: Arc<RuntimeEnv>,
    catalog: &str,
) -> Result<SessionContext> {
    let config = configure(SessionConfig::new(), settings)?
        .with_default_catalog_and_schema(catalog, "public");
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    udf::register(&ctx, params);
    crate::engine::optimizer::register(&ctx);
    Ok(ctx)
}

/// `config` with kbcrm's defaults and the project's engine and `datafusion:` settings.
pub fn configure(config: SessionConfig, settings: &EngineSettings) -> Result<SessionConfig> {
    let mut config = config
        .with_information_schema(true)
        .with_create_default_catalog_and_schema(true);
    // Join inputs ordered by estimated size through operators: without it, DataFusion knows the
    // row counts of scans but not of joins, and in a star join (fact, then dimension after
    // dimension) hashes the joined fact rows instead of the next small dimension.
    config.options_mut().optimizer.use_statistics_registry = true;
    // A partial aggregate that merges fewer than ~3 input rows into a group is skipped (its
    // rows go to the final aggregate as they are). DataFusion's 0.8 kept such partials, which
    // then held every group until their input ended and emitted them as slices of large arrays
    // that repartitioning accounts at the whole array's size: at scale 10, grouping 46 M order
    // lines by order filled a 4 GiB limit and spilled (15.5 s; 5.5 s skipped).
    config
        .options_mut()
        .execution
        .skip_partial_aggregation_probe_ratio_threshold = 0.3;
    if let Some(n) = settings.target_partitions {
        config = config.with_target_partitions(n.max(1));
    }
    if let Some(n) = settings.batch_size {
        config = config.with_batch_size(n.max(1));
    }
    let cluster = config
        .options()
        .extensions
        .iter()
        .any(|e| e.0 == "ballista");
    for (key, value) in &settings.datafusion {
        // `ballista.*` settings are for sessions on a cluster.
        if key.starts_with("ballista.") && !cluster {
            continue;
        }
        config.options_mut().set(key, value).map_err(|e| {
            Error::Usage(format!(
                "kbcrm.yaml: datafusion setting '{key}: {value}' is not accepted: {e}"
            ))
        })?;
    }
    Ok(config)
}

/// Run `work` on `ctx`; when a hash join in it runs out of the memory limit (DataFusion's hash
/// joins keep their build side in memory and cannot spill), run it once more with sort-merge
/// joins, which sort and spill instead. `what` names the work in the warning.
pub async fn spill_joins_on_retry<T, F, Fut>(ctx: &SessionContext, what: &str, work: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let hash_joins = ctx
        .state_ref()
        .read()
        .config()
        .options()
        .optimizer
        .prefer_hash_join;
    match work().await {
        // DataFusion names the operator that failed only in the message.
        Err(e) if hash_joins && e.is_out_of_memory() && e.to_string().contains("HashJoin") => {
            let error = e.to_string();
            tracing::warn!(
                what,
                error = error.lines().next().unwrap_or_default(),
                "out of the memory limit with hash joins; doing it again with sort-merge joins, which spill"
            );
            let prefer_hash_join = |on: bool| {
                ctx.state_ref()
                    .write()
                    .config_mut()
                    .options_mut()
                    .optimizer
                    .prefer_hash_join = on;
            };
            prefer_hash_join(false);
            let again = work().await;
            prefer_hash_join(true);
            again
        }
        other => other,
    }
}

/// A memory pool of `limit` bytes of the given kind; when it is full, the error names the five
/// operators holding the most, and each refusal is logged at debug level (`-v -v`), so a
/// query that spilled says which operators held the memory.
pub fn memory_pool(kind: MemoryPoolKind, limit: usize) -> Arc<dyn MemoryPool> {
    let top = NonZeroUsize::new(5).expect("non-zero");
    match kind {
        MemoryPoolKind::Greedy => Arc::new(RefusalLog(TrackConsumersPool::new(
            GreedyMemoryPool::new(limit),
            top,
        ))),
        MemoryPoolKind::Fair => Arc::new(RefusalLog(TrackConsumersPool::new(
            FairSpillPool::new(limit),
            top,
        ))),
    }
}

/// A memory pool that logs the requests it refuses (an operator that can spill spills then).
#[derive(Debug)]
struct RefusalLog<P>(P);

impl<P: std::fmt::Display> std::fmt::Display for RefusalLog<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<P: MemoryPool + std::fmt::Display> MemoryPool for RefusalLog<P> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.0.register(consumer)
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.0.unregister(consumer)
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.0.grow(reservation, additional)
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.0.shrink(reservation, shrink)
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::common::Result<()> {
        let result = self.0.try_grow(reservation, additional);
        if let Err(e) = &result {
            tracing::debug!(
                operator = reservation.consumer().name(),
                held = reservation.size(),
                additional,
                "memory limit reached: {e}"
            );
        }
        result
    }

    fn reserved(&self) -> usize {
        self.0.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.0.memory_limit()
    }
}

/// The memory pool and spill folder of the engine settings, for queries: the pool is `greedy`
/// unless the project says otherwise.
pub fn runtime(settings: &EngineSettings) -> Result<Arc<RuntimeEnv>> {
    runtime_with_pool(settings, settings.query_memory_pool())
}

fn runtime_with_pool(settings: &EngineSettings, pool: MemoryPoolKind) -> Result<Arc<RuntimeEnv>> {
    let mut runtime = RuntimeEnvBuilder::new()
        .with_object_store_registry(Arc::new(crate::storage::StoreRegistry::default()));
    if let Some(limit) = settings.memory_limit {
        runtime = runtime.with_memory_pool(memory_pool(pool, limit));
    }
    if let Some(dir) = &settings.spill_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        runtime = runtime.with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![dir.clone()])),
        );
    }
    Ok(runtime.build_arc()?)
}

/// Days since 1970-01-01 of a date: Arrow's `Date32`. Source decoding calls it per value.
#[inline]
pub fn epoch_days(d: chrono::NaiveDate) -> i32 {
    use chrono::Datelike;
    /// 1970-01-01 in days from the first of January of year 1.
    const EPOCH_DAYS_FROM_CE: i32 = 719_163;
    d.num_days_from_ce() - EPOCH_DAYS_FROM_CE
}

/// The date of an Arrow `Date32` value, if chrono can represent it.
pub fn date_of_epoch_day(days: i32) -> Option<chrono::NaiveDate> {
    arrow::datatypes::Date32Type::to_naive_date_opt(days)
}

/// Run parameters for a read-only session: as of today, no variables.
pub fn today_params() -> RunParams {
    RunParams {
        as_of_days: epoch_days(chrono::Utc::now().date_naive()),
        vars: Default::default(),
    }
}

/// A session like `root` (see [`with_empty_catalog`]) holding the tables of its default schema:
/// a step of a run works in one while other steps run, registering and replacing tables (its
/// inputs narrowed to what changed, a merge's temporary tables) without the others seeing them.
/// Both share the runtime, so the memory limit holds for all of them together.
pub async fn fork_session(root: &SessionContext) -> Result<SessionContext> {
    let fork = with_empty_catalog(root);
    let (catalog, schema) = {
        let state = root.state();
        let options = state.config().options();
        (
            options.catalog.default_catalog.clone(),
            options.catalog.default_schema.clone(),
        )
    };
    if let Some(schema) = root.catalog(&catalog).and_then(|c| c.schema(&schema)) {
        for name in schema.table_names() {
            if let Some(table) = schema.table(&name).await? {
                fork.register_table(datafusion::common::TableReference::bare(name), table)?;
            }
        }
    }
    Ok(fork)
}

/// Plan `ctx`'s queries to run on one partition each until the guard returned is dropped: for a
/// step whose inputs are a run's few added rows, while other steps of the run use the other
/// cores.
pub fn one_partition(ctx: &SessionContext) -> OnePartition<'_> {
    let before = set_target_partitions(ctx, 1);
    OnePartition { ctx, before }
}

/// Puts back a session's partitions when dropped (see [`one_partition`]).
pub struct OnePartition<'a> {
    ctx: &'a SessionContext,
    before: usize,
}

impl Drop for OnePartition<'_> {
    fn drop(&mut self) {
        set_target_partitions(self.ctx, self.before);
    }
}

/// Set the partitions `ctx` plans queries for, returning those it had (without copying the
/// session's state to read them).
fn set_target_partitions(ctx: &SessionContext, n: usize) -> usize {
    let state = ctx.state_ref();
    let mut state = state.write();
    let options = state.config_mut().options_mut();
    std::mem::replace(&mut options.execution.target_partitions, n)
}

/// A session like `root` (its planner, settings, functions and runtime: on a Ballista cluster,
/// the same scheduler) with a catalog of its own, still empty. The server holds one such
/// session per role on the cluster, each with only the role's tables.
pub fn with_empty_catalog(root: &SessionContext) -> SessionContext {
    let state = root.state();
    let options = state.config().options();
    let (catalog_name, schema_name) = (
        options.catalog.default_catalog.clone(),
        options.catalog.default_schema.clone(),
    );
    let catalog = MemoryCatalogProvider::new();
    catalog
        .register_schema(&schema_name, Arc::new(MemorySchemaProvider::new()))
        .expect("a new catalog takes a schema");
    let catalogs = MemoryCatalogProviderList::new();
    catalogs.register_catalog(catalog_name, Arc::new(catalog));
    SessionContext::new_with_state(
        SessionStateBuilder::new_from_existing(state)
            .with_catalog_list(Arc::new(catalogs))
            .build(),
    )
}

/// Tracing target whose `trace` level prints every plan a run executes through [`collect`]
/// or [`stream`], with the metrics of each operator once it has run
/// (`RUST_LOG=kbcrm=debug,kbcrm::plan=trace`): where a step's time went.
pub const PLAN_TARGET: &str = "kbcrm::plan";

fn plans_traced() -> bool {
    tracing::enabled!(target: PLAN_TARGET, tracing::Level::TRACE)
}

/// Print `plan`, run, with its metrics at [`PLAN_TARGET`]'s trace level.
pub fn trace_plan(plan: &dyn datafusion::physical_plan::ExecutionPlan, what: &str) {
    let shown = datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan)
        .indent(true)
        .to_string();
    tracing::trace!(target: PLAN_TARGET, what, "plan run:\n{shown}");
}

/// `df.collect()`, its plan traced (see [`PLAN_TARGET`]) as `what`.
pub async fn collect(
    df: datafusion::dataframe::DataFrame,
    what: &str,
) -> Result<Vec<arrow::record_batch::RecordBatch>> {
    if !plans_traced() {
        return Ok(df.collect().await?);
    }
    let task = Arc::new(df.task_ctx());
    let plan = df.create_physical_plan().await?;
    let batches = datafusion::physical_plan::collect(plan.clone(), task).await?;
    trace_plan(plan.as_ref(), what);
    Ok(batches)
}

/// `df.execute_stream()`, and the plan to pass to [`trace_plan`] once the stream has ended
/// when plans are traced.
pub async fn stream(
    df: datafusion::dataframe::DataFrame,
) -> Result<(
    datafusion::execution::SendableRecordBatchStream,
    Option<Arc<dyn datafusion::physical_plan::ExecutionPlan>>,
)> {
    if !plans_traced() {
        return Ok((df.execute_stream().await?, None));
    }
    let task = Arc::new(df.task_ctx());
    let plan = df.create_physical_plan().await?;
    let stream = datafusion::physical_plan::execute_stream(plan.clone(), task)?;
    Ok((stream, Some(plan)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_lasts_as_long_as_its_guard() {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(4));
        {
            let _one = one_partition(&ctx);
            assert_eq!(ctx.state().config().target_partitions(), 1);
        }
        assert_eq!(ctx.state().config().target_partitions(), 4);
    }
}
