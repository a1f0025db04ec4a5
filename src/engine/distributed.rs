//! Queries on an Apache DataFusion Ballista cluster, and the cluster's own processes.
//!
//! Every process of a cluster is this binary, so every one knows kbcrm's SQL functions and
//! opens the object stores the way kbcrm does ([`crate::storage::StoreRegistry`]):
//! - the client ([`session`]): plans the SQL with kbcrm's functions and sends it to the
//!   scheduler at `df://host:port`, or to a scheduler and executor started inside the process;
//! - `kbcrm ballista scheduler` ([`scheduler`]): turns a query into stages; its sessions know
//!   kbcrm's functions, so plans that call them can be read;
//! - `kbcrm ballista executor` ([`executor`]): runs the stages' tasks; it reads the
//!   warehouse's Parquet files through the same stores.
//!
//! Functions travel by name. The Delta tables are sent as plain Parquet listings of their
//! current files ([`crate::warehouse::Warehouse::register_for_cluster`]): Ballista has no codec
//! for Delta's table provider.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ballista::prelude::{SessionConfigExt, SessionContextExt};
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::engine;
use crate::engine::udf::{self, RunParams};
use crate::error::{Error, Result};
use crate::plan::{Cluster, EngineSettings};
use crate::storage::StoreRegistry;

/// A client session on the cluster, with kbcrm's functions; tables are registered by the
/// caller, as Parquet listings.
pub async fn session(
    settings: &EngineSettings,
    params: &RunParams,
    cluster: &Cluster,
) -> Result<SessionContext> {
    let config = engine::configure(cluster_config(), settings)?;
    let local = SessionContext::new_with_config_rt(config, engine::runtime(settings)?);
    udf::register(&local, params);
    crate::engine::optimizer::register(&local);
    let state = local.state();
    if let Cluster::Scheduler(url) = cluster {
        reachable(url).await?;
    }
    let ctx = match cluster {
        Cluster::Standalone => SessionContext::standalone_with_state(state).await,
        Cluster::Scheduler(url) => SessionContext::remote_with_state(url, state).await,
    }
    .map_err(|e| Error::Usage(format!("cannot use the Ballista cluster: {e}")))?;
    // The Ballista session keeps only its own function list: kbcrm's are registered again.
    udf::register(&ctx, params);
    Ok(ctx)
}

/// Fail with a clear message when nothing answers at the scheduler's address (Ballista itself
/// reports a bare transport error at the first query).
async fn reachable(url: &str) -> Result<()> {
    let attempt = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(scheduler_address(url)?),
    )
    .await;
    match attempt {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Error::Usage(format!(
            "cannot reach the Ballista scheduler at {url}: {e}; start `kbcrm ballista scheduler` \
             there, or check --engine / engine.scheduler"
        ))),
        Err(_) => Err(Error::Usage(format!(
            "the Ballista scheduler at {url} did not answer within 10 s; check --engine / \
             engine.scheduler and the network"
        ))),
    }
}

/// Host and port of a scheduler written `host:port` or `df://host:port` (port 50050 when
/// left out).
fn scheduler_address(written: &str) -> Result<(String, u16)> {
    let target = written.trim_start_matches("df://").trim_end_matches('/');
    match target.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.to_string(),
            port.parse().map_err(|_| {
                Error::Usage(format!(
                    "scheduler '{written}': the port is not a number; write host:port"
                ))
            })?,
        )),
        None => Ok((target.to_string(), 50050)),
    }
}

/// The session settings of every process of the cluster: Ballista's, with its static
/// planner. Ballista 55's adaptive planner plans each stage again once its input shuffle is
/// done and then checks the plan: a shuffle reader does not report the order its sorted input
/// keeps, so a sort-preserving merge over a sorted UNION ALL (one customer's history) fails the
/// check, and the failed job is left waiting for ever. The static planner runs such plans;
/// `ballista.planner.adaptive.enabled: true` under `datafusion:` turns the adaptive one on.
fn cluster_config() -> SessionConfig {
    let mut config = SessionConfig::new_with_ballista();
    config
        .options_mut()
        .set("ballista.planner.adaptive.enabled", "false")
        .expect("a Ballista setting");
    config
}

/// The functions every process of the cluster knows: Ballista's and kbcrm's.
fn functions() -> SessionContext {
    let ctx = SessionContext::new_with_state(
        SessionStateBuilder::new()
            .with_default_features()
            .with_scalar_functions(ballista_core::extension::ballista_scalar_functions())
            .with_aggregate_functions(ballista_core::extension::ballista_aggregate_functions())
            .with_window_functions(ballista_core::extension::ballista_window_functions())
            .build(),
    );
    udf::register(&ctx, &RunParams::default());
    ctx
}

/// Where the scheduler listens and how executors and clients reach it.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Host name others reach it by.
    pub external_host: String,
}

/// Run a scheduler until the process is stopped.
pub async fn scheduler(options: SchedulerOptions) -> Result<()> {
    let functions = functions().state();
    let builder: ballista_scheduler::scheduler_server::SessionBuilder =
        Arc::new(move |config: SessionConfig| {
            let runtime = RuntimeEnvBuilder::new()
                .with_object_store_registry(Arc::new(StoreRegistry::default()))
                .build_arc()?;
            let state = SessionStateBuilder::new()
                .with_default_features()
                .with_config(config)
                .with_runtime_env(runtime)
                .with_optimizer_rules(ballista_core::optimizer::ballista_default_optimizer_rules())
                .with_scalar_functions(functions.scalar_functions().values().cloned().collect())
                .with_aggregate_functions(
                    functions.aggregate_functions().values().cloned().collect(),
                )
                .with_window_functions(functions.window_functions().values().cloned().collect())
                .build();
            Ok(state)
        });
    let config = SchedulerConfig {
        bind_host: options.bind.ip().to_string(),
        bind_port: options.bind.port(),
        external_host: options.external_host.clone(),
        ..Default::default()
    }
    .with_override_session_builder(builder)
    .with_override_config_producer(Arc::new(cluster_config));
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| Error::Usage(format!("cannot start the Ballista scheduler: {e}")))?;
    start_server(cluster, options.bind, Arc::new(config))
        .await
        .map_err(|e| Error::Usage(format!("the Ballista scheduler stopped: {e}")))
}

/// Where an executor listens, which scheduler it joins, and what it may use.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler, `host:port` (a `df://` prefix is accepted).
    pub scheduler: String,
    /// Host to listen on.
    pub bind_host: String,
    /// Arrow Flight port (results and shuffle data).
    pub port: u16,
    /// gRPC port (the scheduler hands it tasks).
    pub grpc_port: u16,
    /// Host name the scheduler, other executors and clients reach it by.
    pub external_host: Option<String>,
    /// Folder for shuffle files.
    pub work_dir: Option<PathBuf>,
    /// Tasks run at once; default the number of cores.
    pub vcores: Option<usize>,
    /// Memory for its tasks, bytes; default Ballista's (a share of the machine's).
    pub memory_limit: Option<usize>,
}

/// Run an executor until the process is stopped (SIGTERM or Ctrl-C: running tasks finish
/// first).
pub async fn executor(options: ExecutorOptions) -> Result<()> {
    let (host, port) = scheduler_address(&options.scheduler)?;
    let functions = Arc::new(BallistaFunctionRegistry::from(&functions().state()));
    let mut config = ExecutorProcessConfig {
        bind_host: options.bind_host.clone(),
        external_host: options.external_host.clone(),
        port: options.port,
        grpc_port: options.grpc_port,
        scheduler_host: host,
        scheduler_port: port,
        scheduler_connect_timeout_seconds: 30,
        work_dir: options
            .work_dir
            .as_ref()
            .map(|d| d.to_string_lossy().into_owned()),
        override_function_registry: Some(functions),
        override_runtime_producer: Some(Arc::new(|_config: &SessionConfig| {
            RuntimeEnvBuilder::new()
                .with_object_store_registry(Arc::new(StoreRegistry::default()))
                .build_arc()
        })),
        override_config_producer: Some(Arc::new(cluster_config)),
        ..Default::default()
    };
    if let Some(n) = options.vcores {
        config.vcores = n;
    }
    if let Some(bytes) = options.memory_limit {
        config.memory_pool_size = Some(bytes as u64);
    }
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| Error::Usage(format!("the Ballista executor stopped: {e}")))
}
