//! Who may read what through `kbcrm serve`: the server settings, roles, PII columns and users
//! of kbcrm.yaml, checked when the project loads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::ProjectSpec;
use crate::config::project::{RoleSpec, ServeSpec, UserSpec};
use crate::error::Problem;

use super::PROJECT_FILE;
use super::loader::yaml_pos;

/// Address `kbcrm serve` listens on unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5433";

/// The SQL server's settings and access rules.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Server settings.
    pub serve: ServeSettings,
    /// Roles by name.
    pub roles: BTreeMap<String, Role>,
    /// PII columns per table.
    pub pii: BTreeMap<String, Vec<String>>,
    /// Users by name.
    pub users: BTreeMap<String, User>,
}

/// Settings of `kbcrm serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Listen address.
    pub listen: String,
    /// Most clients at once.
    pub max_connections: usize,
    /// Default statement timeout (`None`: no limit).
    pub statement_timeout: Option<Duration>,
    /// How often new table versions are looked for.
    pub refresh_interval: Duration,
    /// TLS certificate and key files (absolute).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Refuse plaintext clients.
    pub require_tls: bool,
    /// Time from connecting to being logged in.
    pub login_timeout: Duration,
    /// Connections logging in at once, besides the logged-in ones.
    pub max_pending_logins: usize,
    /// Largest message a logged-in client may send, in bytes.
    pub max_message_size: usize,
    /// The database clients connect to (`dbname=`).
    pub database: String,
    /// Bytes of decoded columns kept in memory between queries (0: none).
    pub cache: usize,
}

/// `serve.cache` when kbcrm.yaml does not set it: 1 GiB.
pub const DEFAULT_CACHE: usize = 1 << 30;

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            listen: DEFAULT_LISTEN.into(),
            max_connections: 64,
            statement_timeout: Some(Duration::from_secs(300)),
            refresh_interval: Duration::from_secs(2),
            tls: None,
            require_tls: false,
            login_timeout: Duration::from_secs(5),
            max_pending_logins: 32,
            max_message_size: 64 << 20,
            database: "kbcrm".into(),
            cache: DEFAULT_CACHE,
        }
    }
}

/// What one role may read.
#[derive(Debug, Clone)]
pub struct Role {
    /// The table patterns as written.
    pub tables: Vec<String>,
    matcher: Arc<GlobSet>,
    /// Sees PII unmasked.
    pub pii: bool,
    /// Row conditions per table.
    pub row_filter: BTreeMap<String, String>,
    /// The role's own statement timeout, when it has one (else the server's).
    pub statement_timeout: Option<Option<Duration>>,
}

impl Role {
    /// A role reading every table without row filters; PII unmasked only when `pii`.
    pub fn every_table(pii: bool) -> Role {
        let mut b = GlobSetBuilder::new();
        b.add(Glob::new("*").expect("a valid glob"));
        Role {
            tables: vec!["*".into()],
            matcher: Arc::new(b.build().unwrap_or_else(|_| GlobSet::empty())),
            pii,
            row_filter: BTreeMap::new(),
            statement_timeout: None,
        }
    }

    /// Whether the role may read `table`.
    pub fn may_read(&self, table: &str) -> bool {
        self.matcher.is_match(table)
    }
}

/// A user and the SCRAM verifier of their password.
#[derive(Debug, Clone)]
pub struct User {
    /// Role name (a key of [`Access::roles`]).
    pub role: String,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub scram: String,
}

/// Parse "30s", "500ms", "5min", "1h 30m"; "0" means none.
pub fn parse_duration(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(None);
    }
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(Some(Duration::from_millis(ms)));
    }
    humantime::parse_duration(t)
        .map(|d| (!d.is_zero()).then_some(d))
        .map_err(|e| format!("'{s}' is not a duration ({e}); write e.g. 30s, 500ms or 5min"))
}

/// A well-formed SCRAM-SHA-256 verifier, or what is wrong with it.
pub fn check_verifier(v: &str) -> Result<(), String> {
    Verifier::parse(v).map(|_| ())
}

/// A parsed SCRAM-SHA-256 verifier in PostgreSQL's form (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`);
/// the server's side of the exchange is in `serve::scram`.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// PBKDF2 iterations the client must use.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: Vec<u8>,
}

impl Verifier {
    /// Parse PostgreSQL's form, or say what is wrong with it (the project loader reports this
    /// with the line of kbcrm.yaml).
    pub fn parse(v: &str) -> Result<Verifier, String> {
        let bad = || {
            "not a SCRAM-SHA-256 verifier; expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> \
             (write it with `kbcrm user add NAME --role ROLE`, never a password)"
                .to_string()
        };
        let rest = v.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or_else(bad)?;
        let (iter, salt) = iter_salt.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        let verifier = Verifier {
            iterations: iter.parse().map_err(|_| bad())?,
            salt: base64::engine::general_purpose::STANDARD
                .decode(salt)
                .map_err(|_| bad())?,
            stored_key: base64::engine::general_purpose::STANDARD
                .decode(stored)
                .map_err(|_| bad())?,
            server_key: base64::engine::general_purpose::STANDARD
                .decode(server)
                .map_err(|_| bad())?,
        };
        if verifier.iterations < 4096 {
            return Err(format!(
                "the verifier uses {} iterations; at least 4096 are required",
                verifier.iterations
            ));
        }
        if verifier.salt.is_empty()
            || verifier.stored_key.len() != 32
            || verifier.server_key.len() != 32
        {
            return Err(bad());
        }
        Ok(verifier)
    }
}

/// Problems found in kbcrm.yaml, placed at their YAML position or at the key path the message
/// starts with.
struct Reporter<'a> {
    text: &'a Arc<String>,
    problems: &'a mut Vec<Problem>,
}

impl Reporter<'_> {
    /// Records a problem in kbcrm.yaml, at `loc` when given.
    fn at(&mut self, msg: String, loc: Option<&serde_saphyr::Location>) {
        let text = self.text;
        // Without a span, the key path the message starts with (`serve.listen: ...`).
        let pos = match loc {
            Some(l) => Some(yaml_pos(l, text)),
            None => {
                let path = msg
                    .split([' ', ':'])
                    .next()
                    .unwrap_or_default()
                    .split('.')
                    .collect::<Vec<_>>();
                // The whole path, or the deepest part of it written as a block (`roles.a`
                // of `a: { tables: [...] }`).
                (1..=path.len())
                    .rev()
                    .find_map(|n| super::loader::path_pos(text, &path[..n]))
            }
        };
        let mut p = Problem::new(PROJECT_FILE, msg);
        if let Some(pos) = pos {
            p = p.at(pos, text);
        }
        self.problems.push(p);
    }
}

pub(super) fn build(
    spec: &ProjectSpec,
    text: &Arc<String>,
    root: &std::path::Path,
    problems: &mut Vec<Problem>,
) -> Access {
    let mut at = Reporter { text, problems };
    let serve = serve_settings(&spec.serve, root, &mut at);

    let mut roles = BTreeMap::new();
    for (name, r) in &spec.roles {
        roles.insert(name.clone(), role(name, r, &mut at));
    }
    let mut users = BTreeMap::new();
    for (name, u) in &spec.users {
        users.insert(name.clone(), user(name, u, &roles, &mut at));
    }
    Access {
        serve,
        roles,
        pii: spec.pii.clone().into_iter().collect(),
        users,
    }
}

/// The server settings of `serve:`, each checked; defaults where one is missing or wrong.
fn serve_settings(s: &ServeSpec, root: &std::path::Path, at: &mut Reporter<'_>) -> ServeSettings {
    let mut serve = ServeSettings::default();
    if let Some(l) = &s.listen {
        if l.parse::<std::net::SocketAddr>().is_err() {
            at.at(
                format!("serve.listen: '{l}' is not an address; write e.g. 127.0.0.1:5433"),
                None,
            );
        }
        serve.listen = l.clone();
    }
    if let Some(n) = s.max_connections {
        if n == 0 {
            at.at("serve.max_connections must be at least 1".into(), None);
        }
        serve.max_connections = n.max(1);
    }
    if let Some(t) = &s.statement_timeout {
        match parse_duration(&t.value) {
            Ok(d) => serve.statement_timeout = d,
            Err(m) => at.at(format!("serve.statement_timeout: {m}"), Some(&t.referenced)),
        }
    }
    if let Some(t) = &s.refresh_interval {
        match parse_duration(&t.value) {
            Ok(Some(d)) => serve.refresh_interval = d,
            Ok(None) => at.at(
                "serve.refresh_interval must be more than 0".into(),
                Some(&t.referenced),
            ),
            Err(m) => at.at(format!("serve.refresh_interval: {m}"), Some(&t.referenced)),
        }
    }
    if let Some(t) = &s.login_timeout {
        match parse_duration(&t.value) {
            Ok(Some(d)) => serve.login_timeout = d,
            Ok(None) => at.at(
                "serve.login_timeout must be more than 0".into(),
                Some(&t.referenced),
            ),
            Err(m) => at.at(format!("serve.login_timeout: {m}"), Some(&t.referenced)),
        }
    }
    if let Some(n) = s.max_pending_logins {
        if n == 0 {
            at.at("serve.max_pending_logins must be at least 1".into(), None);
        }
        serve.max_pending_logins = n.max(1);
    }
    if let Some(m) = &s.max_message_size {
        match crate::config::project::parse_byte_size(&m.value) {
            Ok(n) if ((64 << 10)..=(1 << 30)).contains(&n) => serve.max_message_size = n,
            Ok(_) => at.at(
                "serve.max_message_size must be between 64KiB and 1GiB".into(),
                Some(&m.referenced),
            ),
            Err(msg) => at.at(
                format!("serve.max_message_size: {msg}"),
                Some(&m.referenced),
            ),
        }
    }
    if let Some(c) = &s.cache {
        match crate::config::project::parse_byte_size(&c.value) {
            Ok(n) => serve.cache = n,
            Err(msg) => at.at(format!("serve.cache: {msg}"), Some(&c.referenced)),
        }
    }
    if let Some(d) = &s.database {
        if d.is_empty() || d.len() > 63 || d.chars().any(|c| c.is_control() || c == '"') {
            at.at(
                format!(
                    "serve.database: '{d}' is not a database name (1 to 63 characters, no quotes)"
                ),
                None,
            );
        } else {
            serve.database = d.clone();
        }
    }
    serve.tls = s
        .tls
        .as_ref()
        .map(|t| (root.join(&t.cert), root.join(&t.key)));
    serve.require_tls = s.require_tls;
    if serve.require_tls && serve.tls.is_none() {
        at.at(
            "serve.require_tls is true but serve.tls names no certificate and key".into(),
            None,
        );
    }
    serve
}

/// One role of `roles:`, its table patterns and statement timeout checked.
fn role(name: &str, r: &RoleSpec, at: &mut Reporter<'_>) -> Role {
    let mut b = GlobSetBuilder::new();
    for pat in &r.tables {
        match Glob::new(pat) {
            Ok(g) => {
                b.add(g);
            }
            Err(e) => at.at(format!("roles.{name}.tables: '{pat}': {e}"), None),
        }
    }
    let matcher = b.build().unwrap_or_else(|_| GlobSet::empty());
    let statement_timeout =
        r.statement_timeout
            .as_ref()
            .and_then(|t| match parse_duration(&t.value) {
                Ok(d) => Some(d),
                Err(m) => {
                    at.at(
                        format!("roles.{name}.statement_timeout: {m}"),
                        Some(&t.referenced),
                    );
                    None
                }
            });
    Role {
        tables: r.tables.clone(),
        matcher: Arc::new(matcher),
        pii: r.pii,
        row_filter: r.row_filter.clone().into_iter().collect(),
        statement_timeout,
    }
}

/// One user of `users:`, its role and SCRAM verifier checked.
fn user(name: &str, u: &UserSpec, roles: &BTreeMap<String, Role>, at: &mut Reporter<'_>) -> User {
    if !roles.contains_key(&u.role.value) {
        let known: Vec<&str> = roles.keys().map(String::as_str).collect();
        at.at(
            format!(
                "users.{name}.role: no role '{}' under roles: (declared: {})",
                u.role.value,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
            Some(&u.role.referenced),
        );
    }
    if let Err(m) = check_verifier(&u.scram.value) {
        at.at(
            format!("users.{name}.scram: {m}"),
            Some(&u.scram.referenced),
        );
    }
    User {
        role: u.role.value.clone(),
        scram: u.scram.value.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_verifiers() {
        assert_eq!(parse_duration("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_duration("250"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(parse_duration("5min"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse_duration("0"), Ok(None));
        assert!(parse_duration("soon").is_err());
        let v = postgres_protocol::password::scram_sha_256(b"secret");
        assert_eq!(check_verifier(&v), Ok(()));
        assert!(check_verifier("secret").is_err());
        assert!(check_verifier("SCRAM-SHA-256$100:c2FsdA==$AA==:AA==").is_err());
    }
}
