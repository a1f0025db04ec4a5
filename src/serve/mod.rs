//! `kbcrm serve`: the warehouse over the PostgreSQL wire protocol, for BI tools and analysts.
//!
//! datafusion-postgres (pgwire) speaks the protocol and emulates `pg_catalog`; kbcrm supplies
//! what a shared server needs around it: SCRAM-SHA-256 logins against verifiers in
//! kbcrm.yaml ([`auth`], [`scram`]), TLS that is either working or refused at start, one
//! session per role holding only its tables with PII masked and rows filtered ([`catalog`]),
//! a read-only statement policy ([`policy`]), statement timeouts and cancel requests that
//! reach streaming results, and a connection limit ([`queries`]).

pub mod auth;
pub mod catalog;
pub mod cluster;
pub mod policy;
pub mod queries;
pub mod scram;
pub mod users;

use std::fs::File;
use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use pgwire::api::auth::DefaultServerParameterProvider;
use pgwire::api::{ClientInfo, ErrorHandler, PgWireServerHandlers};
use pgwire::error::PgWireError;
use pgwire::tokio::process_socket;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::engine;
use crate::error::{Error, Result};
use crate::plan::access::{ServeSettings, User};
use crate::plan::{Overrides, Project};
use crate::warehouse::Warehouse;

use auth::{Cancel, Login, Registry, TooMany};
use catalog::{Catalog, RoleSession};
use queries::Queries;

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
    /// A session on the project's Ballista cluster, whose scheduler and settings the roles'
    /// cluster sessions share.
    cluster: Option<datafusion::prelude::SessionContext>,
    /// Keys the decoy verifiers of unknown users; random per server start.
    secret: [u8; 32],
    registry: Arc<Registry>,
    parameters: DefaultServerParameterProvider,
    parser: PostgresCompatibilityParser,
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
        let fresh = catalog::build(&project, &self.runtime, self.cluster.as_ref()).await?;
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

/// Handlers of one logged-in connection.
struct Connection {
    shared: Arc<Shared>,
    login: Arc<Login>,
    queries: Arc<Queries>,
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl pgwire::api::query::SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl pgwire::api::query::ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.login.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors)
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        Arc::new(Cancel {
            registry: self.shared.registry.clone(),
        })
    }
}

/// Handlers of a connection beyond the limit: its login is refused with 53300.
struct Refused;

impl PgWireServerHandlers for Refused {
    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        Arc::new(TooMany)
    }
}

struct LogErrors;

impl ErrorHandler for LogErrors {
    fn on_error<C: ClientInfo>(&self, client: &C, error: &mut PgWireError) {
        tracing::debug!(peer = %client.socket_addr(), "{error}");
    }
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
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| fail(cert, format!("certificate and key do not fit: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A session on the project's Ballista cluster, when the engine setting names one.
#[cfg(feature = "ballista")]
async fn cluster_session(project: &Project) -> Result<Option<datafusion::prelude::SessionContext>> {
    match &project.engine.cluster {
        Some(cluster) => {
            let ctx =
                crate::distributed::session(&project.engine, &engine::today_params(), cluster)
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
        let catalog = catalog::build(&project, &runtime, cluster.as_ref()).await?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Usage(format!("cannot listen on {addr}: {e}")))?;
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = "16.6".into();
        parameters.is_superuser = false;
        parameters.default_transaction_read_only = true;
        let modified = std::fs::metadata(project.root.join(crate::plan::PROJECT_FILE))
            .and_then(|m| m.modified())
            .ok();
        let shared = Arc::new(Shared {
            serve,
            project: RwLock::new(Arc::new(project)),
            overrides,
            project_file_changed: std::sync::Mutex::new(modified),
            roles_changed: std::sync::atomic::AtomicBool::new(false),
            catalog: RwLock::new(Arc::new(catalog)),
            runtime,
            cluster,
            secret,
            registry: Arc::new(Registry::default()),
            parameters,
            parser: PostgresCompatibilityParser::new(),
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
        let slots = Arc::new(Semaphore::new(shared.serve.max_connections));
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            };
            let tls = tls.clone();
            let shared = shared.clone();
            let slots = slots.clone();
            tokio::spawn(async move {
                let result = match slots.try_acquire_owned() {
                    Ok(_permit) => {
                        let handlers = Connection {
                            login: Arc::new(Login::new(shared.clone())),
                            queries: Arc::new(Queries::new(shared.clone())),
                            shared,
                        };
                        process_socket(socket, tls, handlers).await
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "connection limit reached");
                        process_socket(socket, tls, Refused).await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            });
        }
    }
}
