//! One run at a time per warehouse.
//!
//! On a local disk the lock is an operating-system lock (`flock`) on `_kbcrm/run.lock`, held
//! for the run's life: the kernel releases it when the process ends, however it ends, so a
//! killed run never blocks the next one and a process that merely reuses a dead run's number
//! holds nothing. Of any number of processes starting at once exactly one gets it. The file
//! holds the holder's description for the others' messages; the holder removes it before
//! letting go, and a process that locked a file just removed tries again.
//!
//! On object storage the lock is an object created by a conditional write (put if absent) and
//! deleted when the run ends. A lock left by a killed run of this machine (its process gone, or
//! its number now another process's, or the machine rebooted) is taken over by a conditional
//! replace of exactly the object that was read, so of several processes finding it only one
//! succeeds; a lock of another machine is reported with its holder.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};
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
    /// The lock file, and the open file whose OS lock is held (released when it closes).
    File { path: PathBuf, _open: File },
    Store {
        store: Arc<dyn ObjectStore>,
        path: StorePath,
    },
}

/// Who holds a lock: more than a process number, which the system reuses.
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    started_at: String,
    /// The machine's boot: a holder of an earlier boot is gone.
    #[serde(default)]
    boot_id: Option<String>,
    /// When the process started (clock ticks since boot): another process with the same number
    /// started at another time.
    #[serde(default)]
    pid_start: Option<u64>,
    /// Random, per acquisition.
    #[serde(default)]
    token: Option<String>,
}

impl Holder {
    fn me() -> Holder {
        let pid = std::process::id();
        Holder {
            pid,
            host: host(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            boot_id: boot_id(),
            pid_start: process_start(pid),
            token: Some(uuid::Uuid::new_v4().to_string()),
        }
    }

    /// Whether the holder's process is certainly gone (a holder of this machine only).
    fn gone(&self, me: &Holder) -> bool {
        if self.host != me.host {
            return false;
        }
        if let (Some(theirs), Some(ours)) = (&self.boot_id, &me.boot_id)
            && theirs != ours
        {
            return true;
        }
        match (process_start(self.pid), self.pid_start) {
            // No such process now.
            (None, _) => Path::new("/proc/self").exists(),
            // The number is another process's now.
            (Some(now), Some(then)) => now != then,
            // A holder written by an older kbcrm: only the number to go by.
            (Some(_), None) => false,
        }
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|b| b.trim().to_string())
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
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
        let me = Holder::me();
        let text = serde_json::to_string(&me).unwrap_or_default();
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        for _ in 0..5 {
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
                    let got = match store.get(&path).await {
                        Ok(got) => got,
                        // Released in between: try again.
                        Err(object_store::Error::NotFound { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    let version = UpdateVersion {
                        e_tag: got.meta.e_tag.clone(),
                        version: got.meta.version.clone(),
                    };
                    let holder = got
                        .bytes()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Holder>(&b).ok());
                    match holder {
                        Some(h) if h.gone(&me) => {
                            tracing::warn!(
                                pid = h.pid,
                                "taking over the run lock of a run that no longer runs"
                            );
                            // Replace exactly the lock that was read: of several processes
                            // doing this at once, one succeeds and the others see it held.
                            let replace = PutOptions {
                                mode: PutMode::Update(version),
                                ..Default::default()
                            };
                            match store.put_opts(&path, text.clone().into(), replace).await {
                                Ok(_) => {
                                    return Ok(RunLock {
                                        held: Held::Store { store, path },
                                    });
                                }
                                Err(
                                    object_store::Error::Precondition { .. }
                                    | object_store::Error::NotFound { .. },
                                ) => continue,
                                // A store without conditional replaces: delete it and create
                                // ours (two processes may both delete it; only one creates).
                                Err(object_store::Error::NotImplemented { .. }) => {
                                    store.delete(&path).await?;
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        Some(h) => return Err(busy(&h)),
                        None => {
                            return Err(Error::Busy(format!(
                                "the run lock {}/{path} is held and unreadable; delete it if \
                                 no kbcrm run is going on",
                                crate::storage::redact(wh.url()).trim_end_matches('/')
                            )));
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Busy(
            "the run lock changed hands five times while this run waited; try again".into(),
        ))
    }

    /// The lock as an operating-system lock on the lock file.
    fn acquire_local(warehouse: &Url) -> Result<Option<RunLock>> {
        let Ok(root) = warehouse.to_file_path() else {
            return Ok(None);
        };
        let dir = root.join(META_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("run.lock");
        // Holder drafts an older kbcrm left.
        remove_old_drafts(&dir);
        let me = Holder::me();
        for _ in 0..10 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {
                    // The holder before may have removed the file between our open and lock.
                    if !same_file(&file, &path) {
                        continue;
                    }
                    let text = serde_json::to_string(&me).unwrap_or_default();
                    file.set_len(0)
                        .and_then(|()| file.rewind())
                        .and_then(|()| file.write_all(text.as_bytes()))
                        .and_then(|()| file.sync_all())
                        .map_err(|e| Error::io(&path, e))?;
                    return Ok(Some(RunLock {
                        held: Held::File { path, _open: file },
                    }));
                }
                Err(TryLockError::WouldBlock) => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    return Err(match serde_json::from_str::<Holder>(&text) {
                        Ok(h) => busy(&h),
                        // The holder is writing its description this instant.
                        Err(_) => Error::Busy(
                            "another kbcrm run is starting on this warehouse; try again when \
                             it has finished"
                                .into(),
                        ),
                    });
                }
                Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::Busy(
            "the run lock changed hands ten times while this run waited; try again".into(),
        ))
    }
}

/// Whether the open `file` is the file at `path` now.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
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

/// Remove the holder drafts (`run.lock.HOST.PID`) an older kbcrm wrote before linking its lock
/// in, when their process is gone.
fn remove_old_drafts(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("run.lock."))
            .and_then(|rest| rest.rsplit('.').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| process_start(p).is_none()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        match &self.held {
            // Removed while still locked; the lock goes with the file handle right after.
            Held::File { path, .. } => {
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
            boot_id: boot_id(),
            pid_start: Some(1),
            token: None,
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

    fn local() -> (tempfile::TempDir, Url, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = Url::from_directory_path(dir.path()).expect("url");
        let meta = dir.path().join("_kbcrm");
        std::fs::create_dir_all(&meta).expect("mkdir");
        (dir, url, meta)
    }

    #[test]
    fn a_lock_file_without_a_live_holder_is_taken_over_and_removed_after() {
        let (_dir, url, meta) = local();
        // Left by a killed run: a holder that is gone, and an older kbcrm's draft.
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
        assert!(!draft.exists(), "the old draft is removed");
        // While held, a second acquisition is refused with the holder named.
        assert_names_this_process(&RunLock::acquire_local(&url).expect_err("held"));
        drop(lock);
        let left: Vec<_> = std::fs::read_dir(&meta).expect("list").flatten().collect();
        assert!(left.is_empty(), "nothing left behind: {left:?}");
    }

    #[test]
    fn a_live_process_of_the_recorded_number_holds_nothing() {
        let (_dir, url, meta) = local();
        // The file names this very process, which holds no lock on it: a number reused.
        let mut reused = Holder::me();
        reused.pid_start = Some(1);
        std::fs::write(
            meta.join("run.lock"),
            serde_json::to_string(&reused).expect("json"),
        )
        .expect("lock");
        let lock = RunLock::acquire_local(&url).expect("not blocked by a reused number");
        assert!(lock.is_some());
        assert!(
            reused.gone(&Holder::me()),
            "a number started at another time"
        );
        assert!(!Holder::me().gone(&Holder::me()));
    }

    #[test]
    fn of_many_starting_at_once_exactly_one_holds_the_lock() {
        for _ in 0..20 {
            let (_dir, url, meta) = local();
            std::fs::write(
                meta.join("run.lock"),
                serde_json::to_string(&dead_holder()).expect("json"),
            )
            .expect("a stale lock");
            let start = std::sync::Barrier::new(8);
            let tried = std::sync::Barrier::new(8);
            let results: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            let lock = RunLock::acquire_local(&url);
                            let held = matches!(lock, Ok(Some(_)));
                            // The holder keeps it until every one has tried, as a run would.
                            tried.wait();
                            drop(lock);
                            held
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("thread"))
                    .collect()
            });
            // The OS lock is per open file: threads of one process compete as processes do.
            assert_eq!(
                results.iter().filter(|h| **h).count(),
                1,
                "holders at once: {results:?}"
            );
        }
    }

    #[test]
    fn a_lock_in_an_object_store_is_exclusive_released_and_taken_over_once() {
        let url = Url::parse("memory:///wh/").expect("url");
        let wh = Warehouse::open(&url).expect("open");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let lock = RunLock::acquire_in_store(&wh).await.expect("first");
            assert_names_this_process(&RunLock::acquire_in_store(&wh).await.expect_err("held"));
            drop(lock);
            let lock = RunLock::acquire_in_store(&wh).await.expect("released");
            // A lock left by a gone process of this machine is taken over, by one of several.
            std::mem::forget(lock);
            let path = wh.path(&format!("{META_DIR}/run.lock"));
            let text = serde_json::to_string(&dead_holder()).expect("json");
            wh.store().put(&path, text.into()).await.expect("plant");
            let (a, b) = futures::join!(
                RunLock::acquire_in_store(&wh),
                RunLock::acquire_in_store(&wh)
            );
            assert_eq!(
                usize::from(a.is_ok()) + usize::from(b.is_ok()),
                1,
                "{a:?} {b:?}"
            );
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
            drop((a, b));
            assert!(wh.store().head(&path).await.is_err(), "released");
        });
    }
}
