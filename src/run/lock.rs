//! One run at a time per warehouse: `_kbcrm/run.lock`, created exclusively (written whole,
//! then linked in), removed when the run ends. A lock whose process no longer runs on this
//! machine (a crashed or killed run) is taken over, so a crash never blocks the next run.
//!
//! On object storage the lock is the same file, created with a conditional write (put if
//! absent) and deleted when the run ends; a lock left by a killed run of this machine is taken
//! over the same way, one left by another machine is reported with its holder.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{Error, Result};
use crate::warehouse::{META_DIR, Warehouse};

/// The lock, released on drop.
#[derive(Debug)]
pub struct RunLock {
    held: Held,
}

#[derive(Debug)]
enum Held {
    File(PathBuf),
    Store {
        store: Arc<dyn ObjectStore>,
        path: StorePath,
    },
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
    pub async fn acquire(wh: &Warehouse) -> Result<Option<RunLock>> {
        match wh.url().scheme() {
            "file" => Self::acquire_local(wh.url()),
            "memory" => Ok(None),
            _ => Self::acquire_in_store(wh).await.map(Some),
        }
    }

    /// The lock as an object created by a conditional write.
    async fn acquire_in_store(wh: &Warehouse) -> Result<RunLock> {
        let store = wh.store().clone();
        let path = wh.path(&format!("{META_DIR}/run.lock"));
        let me = Holder {
            pid: std::process::id(),
            host: host(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let text = serde_json::to_string(&me).unwrap_or_default();
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        for _ in 0..3 {
            match store
                .put_opts(&path, text.clone().into(), create.clone())
                .await
            {
                Ok(_) => {
                    return Ok(RunLock {
                        held: Held::Store { store, path },
                    });
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let holder = match store.get(&path).await {
                        Ok(got) => got.bytes().await.ok(),
                        // Released in between: try again.
                        Err(object_store::Error::NotFound { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    match holder.and_then(|b| serde_json::from_slice::<Holder>(&b).ok()) {
                        Some(h) if h.host == me.host && gone(h.pid) => {
                            tracing::warn!(
                                pid = h.pid,
                                "taking over the run lock of a run that no longer runs"
                            );
                            store.delete(&path).await?;
                        }
                        Some(h) => return Err(busy(&h)),
                        None => {
                            return Err(Error::Busy(format!(
                                "the run lock {}/{path} is held and unreadable; delete it if \
                                 no kbcrm run is going on",
                                crate::sources::stores::redact(wh.url()).trim_end_matches('/')
                            )));
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Busy(
            "the run lock changed hands three times while this run waited; try again".into(),
        ))
    }

    /// The lock as a file linked in whole.
    fn acquire_local(warehouse: &Url) -> Result<Option<RunLock>> {
        let Ok(root) = warehouse.to_file_path() else {
            return Ok(None);
        };
        let dir = root.join(META_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("run.lock");
        let me = Holder {
            pid: std::process::id(),
            host: host(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        // The holder is written whole to a file of this process first and then linked in as
        // the lock in one step, so a run killed at any moment never leaves a lock that cannot
        // be read (and so taken over).
        remove_stale_drafts(&dir, &me.host);
        let draft = dir.join(format!("run.lock.{}.{}", me.host, me.pid));
        let text = serde_json::to_string(&me).unwrap_or_default();
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&draft)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
            .map_err(|e| Error::io(&draft, e))?;
        let taken = Self::link(&draft, &path, &me);
        let _ = std::fs::remove_file(&draft);
        taken
    }

    /// Link `draft` in as the lock at `path`, taking over the lock of a gone process.
    fn link(draft: &Path, path: &Path, me: &Holder) -> Result<Option<RunLock>> {
        for _ in 0..3 {
            match std::fs::hard_link(draft, path) {
                Ok(()) => {
                    return Ok(Some(RunLock {
                        held: Held::File(path.to_path_buf()),
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    match serde_json::from_str::<Holder>(&text) {
                        Ok(h) if h.host == me.host && gone(h.pid) => {
                            tracing::warn!(
                                pid = h.pid,
                                "taking over the run lock of a run that no longer runs"
                            );
                            let _ = std::fs::remove_file(path);
                        }
                        Ok(h) => return Err(busy(&h)),
                        // Written by an older kbcrm this instant, or unreadable: let the next
                        // attempt tell.
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                    }
                }
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Err(Error::Busy(format!(
            "the run lock {} is held and unreadable; remove it if no kbcrm run is going on",
            path.display()
        )))
    }
}

/// The error for a lock held by `h`.
fn busy(h: &Holder) -> Error {
    Error::Busy(format!(
        "another kbcrm run (process {} on {}, started {}) is writing this warehouse; try again \
         when it has finished",
        h.pid, h.host, h.started_at
    ))
}

/// Remove holder drafts (`run.lock.HOST.PID`) left by processes of this machine that are gone.
fn remove_stale_drafts(dir: &Path, host: &str) {
    let prefix = format!("run.lock.{host}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str()))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(gone) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        match &self.held {
            Held::File(path) => {
                let _ = std::fs::remove_file(path);
            }
            // Dropped inside or outside a runtime: delete from a thread of its own.
            Held::Store { store, path } => std::thread::scope(|s| {
                s.spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(rt) => {
                            if let Err(e) = rt.block_on(store.delete(path)) {
                                tracing::warn!(error = %e, "could not release the run lock");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "could not release the run lock"),
                    }
                });
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder on this machine whose process is gone: a process id above the kernel's
    /// largest is certainly not running.
    fn dead_holder() -> Holder {
        Holder {
            pid: 4_194_305,
            host: host(),
            started_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    /// A second acquisition is refused with this process named as the holder.
    fn assert_names_this_process(e: &Error) {
        assert!(
            e.to_string()
                .contains(&format!("process {}", std::process::id())),
            "{e}"
        );
    }

    #[test]
    fn a_killed_runs_lock_and_draft_are_taken_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = Url::from_directory_path(dir.path()).expect("url");
        let meta = dir.path().join("_kbcrm");
        std::fs::create_dir_all(&meta).expect("mkdir");
        let dead = dead_holder();
        let text = serde_json::to_string(&dead).expect("json");
        std::fs::write(meta.join("run.lock"), &text).expect("lock");
        let draft = meta.join(format!("run.lock.{}.{}", dead.host, dead.pid));
        std::fs::write(&draft, &text).expect("draft");

        let lock = RunLock::acquire_local(&url)
            .expect("acquire")
            .expect("a local lock");
        let now: Holder =
            serde_json::from_str(&std::fs::read_to_string(meta.join("run.lock")).expect("read"))
                .expect("a whole holder");
        assert_eq!(now.pid, std::process::id());
        assert!(!draft.exists(), "the dead run's draft is removed");
        // While held, a second acquisition is refused with the holder named.
        assert_names_this_process(&RunLock::acquire_local(&url).expect_err("held"));
        drop(lock);
        let left: Vec<_> = std::fs::read_dir(&meta).expect("list").flatten().collect();
        assert!(left.is_empty(), "nothing left behind: {left:?}");
    }

    #[test]
    fn a_lock_in_an_object_store_is_exclusive_and_released() {
        let url = Url::parse("memory:///wh/").expect("url");
        let wh = Warehouse::open(&url).expect("open");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let lock = RunLock::acquire_in_store(&wh).await.expect("first");
            assert_names_this_process(&RunLock::acquire_in_store(&wh).await.expect_err("held"));
            drop(lock);
            let lock = RunLock::acquire_in_store(&wh).await.expect("released");
            // A lock left by a gone process of this machine is taken over.
            std::mem::forget(lock);
            let path = wh.path(&format!("{META_DIR}/run.lock"));
            let dead = dead_holder();
            let text = serde_json::to_string(&dead).expect("json");
            wh.store().put(&path, text.into()).await.expect("plant");
            let taken = RunLock::acquire_in_store(&wh).await.expect("taken over");
            let now: Holder = serde_json::from_slice(
                &wh.store()
                    .get(&path)
                    .await
                    .expect("get")
                    .bytes()
                    .await
                    .expect("bytes"),
            )
            .expect("holder");
            assert_eq!(now.pid, std::process::id());
            drop(taken);
            assert!(wh.store().head(&path).await.is_err(), "released");
        });
    }
}
