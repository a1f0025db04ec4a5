//! Sending a written extract on: to a folder, under an object-store URL, or by e-mail over
//! SMTP. Each delivery is tried up to the extract's `attempts`, waiting 1s, 2s, 4s ... between
//! tries; the files in the extract's folder stay whatever happens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use object_store::{ObjectStoreExt, PutPayload};

use super::pack::Pack;
use crate::plan::SmtpTls;
use crate::plan::extracts::{Delivery, Email, Extract};

/// One delivery's outcome.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    /// Where to, in words (no credentials).
    pub target: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's error, when every attempt failed.
    pub error: Option<String>,
}

/// A failed attempt, and whether trying again may help.
struct Failure {
    message: String,
    retry: bool,
}

impl Failure {
    fn retry(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            retry: true,
        }
    }

    fn fatal(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            retry: false,
        }
    }
}

/// Run every delivery of `x` for the files in `dir`.
pub async fn deliver_all(
    x: &Extract,
    pack: &Pack,
    dir: &Path,
    files: &[PathBuf],
) -> Vec<DeliveryReport> {
    let mut reports = Vec::new();
    for d in &x.deliver {
        let target = describe(d);
        let mut attempts = 0;
        let error = loop {
            attempts += 1;
            match once(d, x, pack, dir, files).await {
                Ok(()) => break None,
                Err(f) if !f.retry || attempts >= x.attempts => break Some(f.message),
                Err(f) => {
                    let wait = Duration::from_secs(1 << (attempts - 1).min(5));
                    tracing::warn!(
                        "extract '{}': delivery to {target} failed (attempt {attempts} of {}): \
                         {}; trying again in {}s",
                        x.name,
                        x.attempts,
                        f.message,
                        wait.as_secs()
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        };
        reports.push(DeliveryReport {
            target,
            attempts,
            error,
        });
    }
    reports
}

fn describe(d: &Delivery) -> String {
    match d {
        Delivery::Folder(p) => format!("folder {}", p.display()),
        Delivery::Url(u) => crate::storage::redact(u),
        Delivery::Email(m) => format!("e-mail to {} via {}:{}", m.to.join(", "), m.host, m.port),
    }
}

async fn once(
    d: &Delivery,
    x: &Extract,
    pack: &Pack,
    dir: &Path,
    files: &[PathBuf],
) -> Result<(), Failure> {
    match d {
        Delivery::Folder(folder) => to_folder(folder, &x.name, dir, files),
        Delivery::Url(url) => to_store(url, &x.name, dir, files).await,
        Delivery::Email(m) => by_email(m, pack, dir, files).await,
    }
}

fn to_folder(folder: &Path, name: &str, dir: &Path, files: &[PathBuf]) -> Result<(), Failure> {
    let fail = |what: &str, p: &Path, e: std::io::Error| {
        Failure::retry(format!("{what} {}: {e}", p.display()))
    };
    let staging = super::Staging::new(folder, name).map_err(|e| Failure::retry(e.to_string()))?;
    for f in files {
        let to = staging.path().join(f);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail("cannot create", parent, e))?;
        }
        if let Err(e) = std::fs::copy(dir.join(f), &to) {
            let _ = std::fs::remove_dir_all(staging.path());
            return Err(fail("cannot write", &to, e));
        }
    }
    super::replace_dir(staging.path(), &folder.join(name))
        .map_err(|e| Failure::retry(e.to_string()))
}

async fn to_store(
    url: &url::Url,
    name: &str,
    dir: &Path,
    files: &[PathBuf],
) -> Result<(), Failure> {
    let store = crate::storage::store_for(url).map_err(|e| Failure::fatal(e.to_string()))?;
    let base = object_store::path::Path::from_url_path(url.path())
        .map_err(|e| Failure::fatal(format!("{url}: {e}")))?;
    for f in files {
        let bytes = std::fs::read(dir.join(f))
            .map_err(|e| Failure::fatal(format!("{}: {e}", dir.join(f).display())))?;
        let mut path = base.clone().join(name);
        for part in f.iter() {
            path = path.join(part.to_string_lossy().as_ref());
        }
        store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| Failure::retry(format!("cannot upload {path}: {e}")))?;
    }
    Ok(())
}

fn env_var(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| {
        Failure::fatal(format!(
            "the environment variable {name} (named in kbcrm.yaml) is not set"
        ))
    })
}

/// The message body: the headline figures in words.
fn body(pack: &Pack) -> String {
    let mut s = format!("{}, as of {}.\n\n", pack.title, pack.as_of);
    for f in &pack.headline {
        s.push_str(&format!("{}: {}", f.label, f.show(f.value)));
        if let (Some(c), Some(p)) = (f.show_change(), pack.previous) {
            s.push_str(&format!(" ({c} since {p})"));
        }
        s.push('\n');
    }
    for (section, why) in &pack.omitted {
        s.push_str(&format!("Left out: {section}: {why}\n"));
    }
    s.push_str("\nThe workbook and the dashboard are attached.\n");
    s
}

async fn by_email(m: &Email, pack: &Pack, dir: &Path, files: &[PathBuf]) -> Result<(), Failure> {
    let bad = |what: &str, e: &dyn std::fmt::Display| Failure::fatal(format!("{what}: {e}"));
    let from: Mailbox = m.from.parse().map_err(|e| bad(&m.from, &e))?;
    let subject = m
        .subject
        .clone()
        .unwrap_or_else(|| format!("{}, as of {}", pack.title, pack.as_of));
    let mut builder = Message::builder().from(from).subject(subject);
    for t in &m.to {
        builder = builder.to(t.parse::<Mailbox>().map_err(|e| bad(t, &e))?);
    }
    let mut parts = MultiPart::mixed().singlepart(SinglePart::plain(body(pack)));
    for f in files {
        let mime = match f.extension().and_then(|e| e.to_str()) {
            Some("xlsx") => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            Some("html") if f.parent() == Some(Path::new("")) => "text/html; charset=utf-8",
            _ => continue,
        };
        let bytes = std::fs::read(dir.join(f))
            .map_err(|e| Failure::fatal(format!("{}: {e}", dir.join(f).display())))?;
        let name = f.to_string_lossy().into_owned();
        let content_type = ContentType::parse(mime).map_err(|e| bad(mime, &e))?;
        parts = parts.singlepart(Attachment::new(name).body(bytes, content_type));
    }
    let message = builder
        .multipart(parts)
        .map_err(|e| bad("cannot build the message", &e))?;

    let tls = || -> Result<TlsParameters, Failure> {
        let mut b = TlsParameters::builder(m.host.clone());
        if let Some(ca) = &m.ca_file {
            let pem = std::fs::read(ca).map_err(|e| bad(&ca.display().to_string(), &e))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| bad(&format!("{} is not a PEM certificate", ca.display()), &e))?;
            b = b.add_root_certificate(cert);
        }
        b.build().map_err(|e| bad("TLS settings", &e))
    };
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(m.host.clone())
        .port(m.port)
        .timeout(Some(Duration::from_secs(30)));
    transport = match m.tls {
        SmtpTls::Starttls => transport.tls(Tls::Required(tls()?)),
        SmtpTls::Tls => transport.tls(Tls::Wrapper(tls()?)),
        SmtpTls::None => transport.tls(Tls::None),
    };
    match (&m.username_env, &m.password_env) {
        (Some(u), Some(p)) => {
            transport = transport.credentials(Credentials::new(env_var(u)?, env_var(p)?));
        }
        (None, None) => {}
        _ => {
            return Err(Failure::fatal(
                "set both username_env and password_env, or neither",
            ));
        }
    }
    let mailer = transport.build();
    match mailer.send(message).await {
        Ok(_) => Ok(()),
        // A permanent SMTP refusal (5xx: bad credentials, unknown recipient) will not change.
        Err(e) if e.is_permanent() => Err(Failure::fatal(format!("the SMTP server refused: {e}"))),
        Err(e) => Err(Failure::retry(format!("SMTP: {e}"))),
    }
}
