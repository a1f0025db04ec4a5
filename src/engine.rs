//! The one place that builds the DataFusion session: memory pool, spill folder, settings,
//! the warehouse's tables. The CLI, runs, cubes and the server all start here.

use std::num::NonZeroUsize;
use std::sync::Arc;

use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider,
};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Error, Result};
use crate::plan::EngineSettings;
use crate::udf::{self, RunParams};

/// Build a session with the project's engine settings and kbcrm's functions. Tables are
/// registered by the caller (see [`crate::warehouse::Warehouse::register_all`]).
pub fn session(settings: &EngineSettings, params: &RunParams) -> Result<SessionContext> {
    session_with_runtime(settings, params, runtime(settings)?)
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
    crate::optimizer::register(&ctx);
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

/// The memory pool and spill folder of the engine settings.
pub fn runtime(settings: &EngineSettings) -> Result<Arc<RuntimeEnv>> {
    let mut runtime = RuntimeEnvBuilder::new()
        .with_object_store_registry(Arc::new(crate::sources::stores::StoreRegistry::default()));
    if let Some(limit) = settings.memory_limit {
        let pool = TrackConsumersPool::new(
            FairSpillPool::new(limit),
            NonZeroUsize::new(5).expect("non-zero"),
        );
        runtime = runtime.with_memory_pool(Arc::new(pool));
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

/// Days since the epoch of a date.
pub fn epoch_days(d: chrono::NaiveDate) -> i32 {
    (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date")).num_days() as i32
}

/// Run parameters for a read-only session: as of today, no variables.
pub fn today_params() -> RunParams {
    RunParams {
        as_of_days: epoch_days(chrono::Utc::now().date_naive()),
        vars: Default::default(),
    }
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
