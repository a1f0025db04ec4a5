//! One run at a time per warehouse: `_kbcrm/run.lock`, created exclusively, removed when the
//! run ends. A lock whose process no longer runs on this machine (a crashed or killed run) is
//! taken over, so a crash never blocks the next run.
//!
//! Local warehouses only for now; on object storage runs are not yet serialised (a second
//! run's commit then fails on the Delta version conflict instead).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{Error, Result};

/// The lock, released on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    started_at: String,
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether a process of this machine is gone; `false` when that cannot be told.
fn gone(pid: u32) -> bool {
    Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
}

impl RunLock {
    /// Take the warehouse's run lock, or say who holds it.
    pub fn acquire(warehouse: &Url) -> Result<Option<RunLock>> {
        if warehouse.scheme() != "file" {
            return Ok(None);
        }
        let Ok(root) = warehouse.to_file_path() else {
            return Ok(None);
        };
        let dir = root.join("_kbcrm");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("run.lock");
        let me = Holder {
            pid: std::process::id(),
            host: host(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        for _ in 0..3 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let text = serde_json::to_string(&me).unwrap_or_default();
                    f.write_all(text.as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(Some(RunLock { path }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    match serde_json::from_str::<Holder>(&text) {
                        Ok(h) if h.host == me.host && gone(h.pid) => {
                            tracing::warn!(
                                pid = h.pid,
                                "taking over the run lock of a run that no longer runs"
                            );
                            let _ = std::fs::remove_file(&path);
                        }
                        Ok(h) => {
                            return Err(Error::Busy(format!(
                                "another kbcrm run (process {} on {}, started {}) is writing \
                                 this warehouse; try again when it has finished",
                                h.pid, h.host, h.started_at
                            )));
                        }
                        // Being written this instant, or unreadable: let the next attempt tell.
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                    }
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::Busy(format!(
            "the run lock {} is held and unreadable; remove it if no kbcrm run is going on",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
