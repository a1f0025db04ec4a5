//! The connection's start: TLS policy, SCRAM-SHA-256 login against the users of kbcrm.yaml,
//! the connection limit, and the per-connection state that cancel requests reach.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::{ClientInfo, METADATA_USER, PgWireConnectionState};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::{Authentication, PasswordMessageFamily, SecretKey, Startup};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage, ProtocolVersion};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::scram::{self, ScramError, Verifier};
use super::wire::Limits;

/// Metadata key holding the session's statement timeout in milliseconds (the key
/// datafusion-postgres reads too).
pub const TIMEOUT_KEY: &str = "statement_timeout_ms";

/// An error the client sees, with its SQLSTATE.
pub fn pg_error(severity: &str, code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        severity.into(),
        code.into(),
        message.into(),
    )))
}

/// A logged-in connection.
pub struct ConnSession {
    /// User name.
    pub user: String,
    /// Role name.
    pub role: String,
    /// Backend process id (`pg_backend_pid()`, the key of cancel requests).
    pub pid: i32,
    secret: SecretKey,
    current: Mutex<Option<CancellationToken>>,
    registry: Arc<Registry>,
    /// This connection's session with its own memory pool, for the role session it was made
    /// from (a connection runs one statement at a time, so the pool is per statement).
    pub(super) own: Mutex<Option<OwnSession>>,
    /// The connection's place under `max_connections`, given back when it closes.
    _slot: OwnedSemaphorePermit,
}

/// A connection's own session and the role session it copies.
pub(super) type OwnSession = (Arc<super::catalog::RoleSession>, super::queries::Service);

impl ConnSession {
    /// A token for the statement about to run; a cancel request for this connection fires it.
    pub fn start_statement(&self) -> CancellationToken {
        let token = CancellationToken::new();
        *self.current.lock().expect("cancel lock") = Some(token.clone());
        token
    }
}

impl Drop for ConnSession {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .expect("registry lock")
            .remove(&self.pid);
    }
}

/// Logged-in connections by process id, for cancel requests.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<i32, Weak<ConnSession>>>,
}

impl Registry {
    /// A process id no live connection has, with a random secret key of the length the
    /// client's protocol version uses; the id is held until the connection's session drops.
    fn allocate(&self, protocol: ProtocolVersion) -> (i32, SecretKey) {
        use rand::Rng;
        let mut rng = rand::rng();
        let mut sessions = self.sessions.lock().expect("registry lock");
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !sessions.contains_key(&pid) {
                break pid;
            }
        };
        sessions.insert(pid, Weak::new());
        let secret = match protocol {
            ProtocolVersion::PROTOCOL3_0 => SecretKey::I32(rng.random()),
            _ => {
                let mut bytes = vec![0u8; 32];
                rng.fill(&mut bytes[..]);
                SecretKey::Bytes(bytes.into())
            }
        };
        (pid, secret)
    }

    /// Logged-in connections.
    pub fn len(&self) -> usize {
        self.sessions.lock().expect("registry lock").len()
    }

    /// Whether nobody is logged in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Answers cancel requests: the key must match the connection's secret.
pub struct Cancel {
    pub(super) registry: Arc<Registry>,
}

#[async_trait]
impl CancelHandler for Cancel {
    async fn on_cancel_request(&self, req: CancelRequest) {
        let session = self
            .registry
            .sessions
            .lock()
            .expect("registry lock")
            .get(&req.pid)
            .and_then(Weak::upgrade);
        if let Some(s) = session
            && s.secret.eq_value(&req.secret_key)
            && let Some(t) = s.current.lock().expect("cancel lock").take()
        {
            tracing::info!(user = %s.user, pid = s.pid, "statement cancelled by the client");
            t.cancel();
        }
    }
}

enum AuthState {
    Start,
    Challenged(Box<scram::Pending>, String),
    Done,
}

/// SCRAM-SHA-256 login, one per connection.
pub struct Login {
    shared: Arc<Shared>,
    state: tokio::sync::Mutex<AuthState>,
    limits: Arc<Limits>,
}

impl Login {
    pub(super) fn new(shared: Arc<Shared>, limits: Arc<Limits>) -> Self {
        Login {
            shared,
            state: tokio::sync::Mutex::new(AuthState::Start),
            limits,
        }
    }
}

/// The mechanism and data of a SASLInitialResponse, read without trusting its lengths: a
/// client answering with a plain or md5 password gets an error, not a crash.
fn sasl_initial(msg: PasswordMessageFamily) -> PgWireResult<(String, Bytes)> {
    let body = match msg {
        PasswordMessageFamily::SASLInitialResponse(m) => {
            return Ok((m.auth_method, m.data.unwrap_or_default()));
        }
        PasswordMessageFamily::Raw(body) => body.freeze(),
        _ => return Err(not_scram()),
    };
    let end = body.iter().position(|b| *b == 0).ok_or_else(not_scram)?;
    let mechanism = std::str::from_utf8(&body[..end])
        .map_err(|_| not_scram())?
        .to_string();
    let rest = &body[end + 1..];
    if rest.len() < 4 {
        return Err(not_scram());
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = if len == -1 {
        Bytes::new()
    } else if len >= 0 && rest.len() - 4 == len as usize {
        body.slice(end + 5..)
    } else {
        return Err(not_scram());
    };
    Ok((mechanism, data))
}

/// The data of a SASLResponse.
fn sasl_continue(msg: PasswordMessageFamily) -> PgWireResult<Bytes> {
    match msg {
        PasswordMessageFamily::Raw(body) => Ok(body.freeze()),
        PasswordMessageFamily::SASLResponse(m) => Ok(m.data),
        _ => Err(not_scram()),
    }
}

fn not_scram() -> PgWireError {
    pg_error(
        "FATAL",
        "08P01",
        "expected a SCRAM-SHA-256 authentication message; the server accepts no plain or md5 \
         passwords",
    )
}

fn auth_failed(user: &str) -> PgWireError {
    pg_error(
        "FATAL",
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

#[async_trait]
impl StartupHandler for Login {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                self.start(client, startup).await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(msg) => {
                self.password(client, msg).await?;
            }
            _ => {
                return Err(pg_error(
                    "FATAL",
                    "08P01",
                    "unexpected message before login",
                ));
            }
        }
        Ok(())
    }
}

impl Login {
    /// Answers the startup message: TLS policy, user and database checked, SCRAM-SHA-256
    /// offered.
    async fn start<C>(&self, client: &mut C, startup: &Startup) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        protocol_negotiation(client, startup).await?;
        save_startup_parameters_to_metadata(client, startup);
        if self.shared.serve.require_tls && !client.is_secure() {
            return Err(pg_error(
                "FATAL",
                "28000",
                "this server accepts only TLS connections; connect with sslmode=require",
            ));
        }
        if client
            .metadata()
            .get(METADATA_USER)
            .is_none_or(|u| u.is_empty())
        {
            return Err(pg_error("FATAL", "28000", "no user name given"));
        }
        // Like PostgreSQL, a client naming no database asks for its user's.
        let database = &self.shared.serve.database;
        let asked = client
            .metadata()
            .get(pgwire::api::METADATA_DATABASE)
            .or_else(|| client.metadata().get(METADATA_USER))
            .cloned()
            .unwrap_or_default();
        if &asked != database {
            return Err(pg_error(
                "FATAL",
                "3D000",
                format!(
                    "database \"{}\" does not exist; this server holds one database, \
                     \"{database}\" (connect with dbname={database})",
                    asked.chars().take(64).collect::<String>()
                ),
            ));
        }
        client.set_state(PgWireConnectionState::AuthenticationInProgress);
        client
            .send(PgWireBackendMessage::Authentication(Authentication::SASL(
                vec!["SCRAM-SHA-256".to_string()],
            )))
            .await?;
        Ok(())
    }

    /// Answers a password message: the first SCRAM message gets the challenge, the second
    /// logs the user in.
    async fn password<C>(&self, client: &mut C, msg: PasswordMessageFamily) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !matches!(
            client.state(),
            PgWireConnectionState::AuthenticationInProgress
        ) {
            return Err(pg_error(
                "FATAL",
                "08P01",
                "a password message before the startup message",
            ));
        }
        let user = client
            .metadata()
            .get(METADATA_USER)
            .cloned()
            .unwrap_or_default();
        let mut state = self.state.lock().await;
        match std::mem::replace(&mut *state, AuthState::Done) {
            AuthState::Start => {
                *state = self.challenge(client, msg, user).await?;
            }
            AuthState::Challenged(pending, user) => {
                self.log_in(client, msg, *pending, user).await?;
            }
            AuthState::Done => return Err(PgWireError::InvalidSASLState),
        }
        Ok(())
    }

    /// Sends the server-first SCRAM message for the client's first one; the state that awaits
    /// the client's proof.
    async fn challenge<C>(
        &self,
        client: &mut C,
        msg: PasswordMessageFamily,
        user: String,
    ) -> PgWireResult<AuthState>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (mechanism, data) = sasl_initial(msg)?;
        if mechanism != "SCRAM-SHA-256" {
            return Err(pg_error(
                "FATAL",
                "28000",
                format!(
                    "authentication method {} is not offered; use SCRAM-SHA-256",
                    mechanism.chars().take(64).collect::<String>()
                ),
            ));
        }
        let verifier = self
            .shared
            .user(&user)
            .and_then(|u| Verifier::parse(&u.scram).ok())
            .unwrap_or_else(|| Verifier::decoy(&self.shared.secret, &user));
        let (server_first, pending) = scram::server_first(&data, verifier, &scram::random_nonce())
            .map_err(|e| malformed(&e))?;
        client
            .send(PgWireBackendMessage::Authentication(
                Authentication::SASLContinue(Bytes::from(server_first)),
            ))
            .await?;
        Ok(AuthState::Challenged(Box::new(pending), user))
    }

    /// Checks the client's proof, takes a place under `max_connections` and opens the session.
    async fn log_in<C>(
        &self,
        client: &mut C,
        msg: PasswordMessageFamily,
        pending: scram::Pending,
        user: String,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let data = sasl_continue(msg)?;
        let server_final = match pending.finish(&data) {
            Ok(f) => f,
            Err(ScramError::WrongProof) => {
                tracing::warn!(%user, "failed login");
                return Err(auth_failed(&user));
            }
            Err(e) => return Err(malformed(&e)),
        };
        // A decoy verifier never matches, so a user passing here exists.
        let Some(account) = self.shared.user(&user) else {
            return Err(auth_failed(&user));
        };
        let Ok(slot) = self.shared.slots.clone().try_acquire_owned() else {
            tracing::warn!(%user, "connection limit reached");
            return Err(pg_error(
                "FATAL",
                "53300",
                "sorry, too many clients already",
            ));
        };
        client
            .send(PgWireBackendMessage::Authentication(
                Authentication::SASLFinal(Bytes::from(server_final)),
            ))
            .await?;
        self.open_session(client, &user, &account.role, slot);
        finish_authentication(client, &self.shared.parameters).await?;
        self.limits
            .logged_in
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(%user, role = %account.role, "login");
        Ok(())
    }
}

impl Login {
    fn open_session<C: ClientInfo>(
        &self,
        client: &mut C,
        user: &str,
        role: &str,
        slot: OwnedSemaphorePermit,
    ) {
        let (pid, secret) = self.shared.registry.allocate(client.protocol_version());
        client.set_pid_and_secret_key(pid, secret.clone());
        if let Some(t) = self.shared.timeout_ceiling(role) {
            client
                .metadata_mut()
                .insert(TIMEOUT_KEY.into(), t.as_millis().to_string());
        }
        client.session_extensions().insert(ConnSession {
            user: user.to_string(),
            role: role.to_string(),
            pid,
            secret,
            current: Mutex::new(None),
            registry: self.shared.registry.clone(),
            own: Mutex::new(None),
            _slot: slot,
        });
        if let Some(s) = client.session_extensions().get::<ConnSession>() {
            self.shared
                .registry
                .sessions
                .lock()
                .expect("registry lock")
                .insert(pid, Arc::downgrade(&s));
        }
    }
}

fn malformed(e: &ScramError) -> PgWireError {
    let what = match e {
        ScramError::Malformed(m) => m,
        ScramError::WrongProof => "wrong proof",
    };
    pg_error("FATAL", "08P01", format!("malformed SCRAM message: {what}"))
}
