//! `kbcrm serve`: the warehouse over the PostgreSQL wire protocol, for BI tools and analysts.
//!
//! datafusion-postgres (pgwire) speaks the protocol and emulates `pg_catalog`; kbcrm supplies
//! what a shared server needs around it: SCRAM-SHA-256 logins against verifiers in
//! kbcrm.yaml ([`auth`], [`scram`]), TLS that is either working or refused at start, one
//! session per role holding only its tables with PII masked and rows filtered ([`catalog`]),
//! a read-only statement policy ([`policy`]), statement timeouts and cancel requests that
//! reach streaming results, and a connection limit ([`queries`]).
//!
//! A face: may import `run` and everything below it; only `cli` imports it.

pub mod auth;
pub mod cache;
pub mod catalog;
pub mod cluster;
pub mod complexity;
pub mod copy;
pub mod execute;
pub mod pgcompat;
pub mod policy;
pub mod pool;
pub mod queries;
pub mod scram;
pub mod stop;
pub mod users;
pub mod wire;

use std::fs::File;
use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use pgwire::api::auth::DefaultServerParameterProvider;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::engine;
use crate::error::{Error, Result};
use crate::plan::access::{ServeSettings, User};
use crate::plan::{Overrides, Project};
use crate::warehouse::Warehouse;

use auth::{Login, Registry};
use catalog::{Catalog, RoleSession};
use queries::Queries;

/// The PostgreSQL version the server answers as. Clients choose their catalog queries by it,
/// and pg_dump dumps only servers of its own major version or older: 15 lets pg_dump 15 and
/// later dump the warehouse's schema.
pub const SERVER_VERSION: &str = "15.6";

/// What every connection shares.
pub struct Shared {
    project: RwLock<Arc<Project>>,
    overrides: Overrides,
    /// When kbcrm.yaml was last read.
    project_file_changed: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// kbcrm.yaml was re-read and the role sessions are not rebuilt from it yet.
    roles_changed: std::sync::atomic::AtomicBool,
    serve: ServeSettings,
    catalog: RwLock<Arc<Catalog>>,
    runtime: Arc<RuntimeEnv>,
    /// Decoded columns of the tables served (`serve.cache`).
    cache: Arc<cache::ColumnCache>,
    /// A session on the project's Ballista cluster, whose scheduler and settings the roles'
    /// cluster sessions share.
    cluster: Option<datafusion::prelude::SessionContext>,
    /// Keys the decoy verifiers of unknown users; random per server start.
    secret: [u8; 32],
    registry: Arc<Registry>,
    /// One permit per logged-in connection, `max_connections` in all.
    slots: Arc<Semaphore>,
    parameters: DefaultServerParameterProvider,
    parser: PostgresCompatibilityParser,
    /// Where statements are parsed, planned and run.
    pool: Arc<pool::QueryPool>,
}

impl Shared {
    /// The role sessions as of the last refresh.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("catalog lock").clone()
    }

    fn any_role(&self) -> Option<Arc<RoleSession>> {
        self.catalog().roles.values().next().cloned()
    }

    /// The project as last read (users, roles, PII columns).
    pub fn project(&self) -> Arc<Project> {
        self.project.read().expect("project lock").clone()
    }

    /// The longest a statement of `role` may run: the role's own limit, else the server's.
    pub fn timeout_ceiling(&self, role: &str) -> Option<std::time::Duration> {
        self.project()
            .access
            .roles
            .get(role)
            .and_then(|r| r.statement_timeout)
            .unwrap_or(self.serve.statement_timeout)
    }

    /// A user's account, if declared.
    fn user(&self, name: &str) -> Option<User> {
        self.project().access.users.get(name).cloned()
    }

    /// Re-read kbcrm.yaml when it changed (users, roles, PII columns take effect without a
    /// restart); a file with problems leaves the previous settings in force.
    fn reload_project(&self) -> bool {
        let file = self.project().root.join(crate::plan::PROJECT_FILE);
        let modified = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
        {
            let mut seen = self.project_file_changed.lock().expect("mtime lock");
            if *seen == modified {
                return false;
            }
            *seen = modified;
        }
        match Project::load(&self.project().root, &self.overrides) {
            Ok(p) => {
                *self.project.write().expect("project lock") = Arc::new(p);
                tracing::info!("kbcrm.yaml re-read: users, roles and PII columns updated");
                true
            }
            Err(e) => {
                tracing::warn!(
                    "kbcrm.yaml has problems, keeping the previous users and roles: {e}"
                );
                false
            }
        }
    }

    /// Rebuild the role sessions when a run has committed new table versions or the roles
    /// changed.
    async fn refresh(&self) -> Result<bool> {
        if self.reload_project() {
            self.roles_changed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let project = self.project();
        let wh = Warehouse::open(&project.warehouse)?;
        // Mid-commit, tables of one run stand at different versions: keep serving the
        // previous set until the run has committed all of them.
        if wh.commit_in_progress().await? {
            return Ok(false);
        }
        let latest = wh.latest_versions().await?;
        let roles_changed = self.roles_changed.load(std::sync::atomic::Ordering::SeqCst);
        if !roles_changed && latest == self.catalog().versions {
            return Ok(false);
        }
        let fresh =
            catalog::build(&project, &self.runtime, self.cluster.as_ref(), &self.cache).await?;
        *self.catalog.write().expect("catalog lock") = Arc::new(fresh);
        self.roles_changed
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(true)
    }
}

/// Value a reported client setting returns to on `RESET` / `SET ... DEFAULT`.
pub(crate) fn default_setting(name: &str) -> &'static str {
    match name {
        "datestyle" => "ISO, MDY",
        "intervalstyle" => "postgres",
        "timezone" => "UTC",
        "client_encoding" => "UTF8",
        "standard_conforming_strings" => "on",
        _ => "",
    }
}

/// Handlers of one connection.
pub struct Connection {
    shared: Arc<Shared>,
    login: Arc<Login>,
    queries: Arc<Queries>,
}

fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fail = |what: &std::path::Path, msg: String| {
        Error::Usage(format!(
            "kbcrm.yaml serve.tls: cannot use '{}': {msg}; the server does not start without \
             the TLS it is configured for",
            what.display()
        ))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(
        File::open(cert).map_err(|e| fail(cert, e.to_string()))?,
    ))
    .collect::<std::result::Result<_, _>>()
    .map_err(|e| fail(cert, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(fail(cert, "no certificate in the file".into()));
    }
    let key_der = rustls_pemfile::private_key(&mut BufReader::new(
        File::open(key).map_err(|e| fail(key, e.to_string()))?,
    ))
    .map_err(|e| fail(key, format!("not a PEM private key: {e}")))?
    .ok_or_else(|| fail(key, "no private key in the file".into()))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| fail(cert, format!("certificate and key do not fit: {e}")))?;
    // Clients negotiating TLS directly (PostgreSQL 17's sslnegotiation=direct) must name it.
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A session on the project's Ballista cluster, when the engine setting names one.
#[cfg(feature = "ballista")]
async fn cluster_session(project: &Project) -> Result<Option<datafusion::prelude::SessionContext>> {
    match &project.engine.cluster {
        Some(cluster) => {
            let ctx = crate::engine::distributed::session(
                &project.engine,
                &engine::today_params(),
                cluster,
            )
            .await?;
            tracing::info!(
                "queries over warehouse tables run on the Ballista cluster; catalog queries, \
                 the run history and PostgreSQL functions in this process"
            );
            Ok(Some(ctx))
        }
        None => Ok(None),
    }
}

#[cfg(not(feature = "ballista"))]
async fn cluster_session(_: &Project) -> Result<Option<datafusion::prelude::SessionContext>> {
    Ok(None)
}

/// A server bound to its address, not yet serving.
pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
}

impl Server {
    /// Check the settings, load TLS, build the role sessions and bind the address.
    pub async fn bind(
        project: Project,
        overrides: Overrides,
        listen: Option<&str>,
    ) -> Result<Server> {
        let access = &project.access;
        if access.users.is_empty() {
            return Err(Error::Usage(
                "kbcrm.yaml declares no users, and the server admits nobody without a password; \
                 add one with `kbcrm user add NAME --role ROLE`"
                    .into(),
            ));
        }
        let mut serve = access.serve.clone();
        if let Some(l) = listen {
            serve.listen = l.to_string();
        }
        let addr: SocketAddr = serve.listen.parse().map_err(|_| {
            Error::Usage(format!(
                "listen address '{}' is not HOST:PORT, e.g. 127.0.0.1:5433",
                serve.listen
            ))
        })?;
        let tls = match &serve.tls {
            Some((cert, key)) => Some(load_tls(cert, key)?),
            None => None,
        };
        let runtime = engine::runtime(&project.engine)?;
        let cluster = cluster_session(&project).await?;
        let cache = Arc::new(cache::ColumnCache::new(serve.cache));
        let catalog = catalog::build(&project, &runtime, cluster.as_ref(), &cache).await?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Usage(format!("cannot listen on {addr}: {e}")))?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let pool = pool::QueryPool::new(threads)
            .map_err(|e| Error::Usage(format!("cannot start the query threads: {e}")))?;
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = SERVER_VERSION.into();
        parameters.is_superuser = false;
        parameters.default_transaction_read_only = true;
        let modified = std::fs::metadata(project.root.join(crate::plan::PROJECT_FILE))
            .and_then(|m| m.modified())
            .ok();
        let shared = Arc::new(Shared {
            project: RwLock::new(Arc::new(project)),
            overrides,
            project_file_changed: std::sync::Mutex::new(modified),
            roles_changed: std::sync::atomic::AtomicBool::new(false),
            catalog: RwLock::new(Arc::new(catalog)),
            runtime,
            cache,
            cluster,
            secret,
            registry: Arc::new(Registry::default()),
            slots: Arc::new(Semaphore::new(serve.max_connections)),
            parameters,
            parser: PostgresCompatibilityParser::new(),
            pool: Arc::new(pool),
            serve,
        });
        Ok(Server {
            listener,
            tls,
            shared,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::Usage(format!("the server has no address: {e}")))
    }

    /// Serve until the process is stopped.
    pub async fn run(self) -> Result<()> {
        let Server {
            listener,
            tls,
            shared,
        } = self;
        // A panic in a connection's task (a client's malformed message reaching a decoder that
        // panics) ends that connection with an error; it is logged as one, not printed raw.
        std::panic::set_hook(Box::new(|info| {
            tracing::error!("panic in the server (the connection involved is closed): {info}");
        }));
        let refresher = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresher.serve.refresh_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match refresher.refresh().await {
                    Ok(true) => tracing::info!("serving new table versions"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("keeping the current table versions: {e}"),
                }
            }
        });
        let pending = Arc::new(wire::Pending::new(shared.serve.max_pending_logins));
        loop {
            let (socket, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    // Out of file descriptors, say: give connections time to close.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let waiting = pending.enter();
            let deadline = tokio::time::Instant::now() + shared.serve.login_timeout;
            let limits = Arc::new(wire::Limits {
                logged_in: std::sync::atomic::AtomicBool::new(false),
                after_login: shared.serve.max_message_size,
            });
            let handlers = Connection {
                login: Arc::new(Login::new(shared.clone(), limits.clone())),
                queries: Arc::new(Queries::new(shared.clone())),
                shared: shared.clone(),
            };
            tokio::spawn(wire::serve(
                socket,
                tls.clone(),
                handlers,
                limits,
                deadline,
                waiting,
            ));
        }
    }
}
