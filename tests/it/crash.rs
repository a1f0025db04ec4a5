//! The crash matrix: `kbcrm run` killed with SIGKILL at seeded random moments, and runs whose
//! warehouse store fails one write. After each, every table opens and is as it was before the
//! run or as a complete run leaves it, and the next run ends with exactly what a never-killed
//! run gives. `KBCRM_CRASH_POINTS=N` runs N kill points instead of 20, `KBCRM_FAULT_POINTS=all`
//! fails every write of a run in turn instead of 16 of them (the long modes, by hand).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

use crate::support::{Project, stderr, stdout};

const PIPELINE: &str = "\
sources:
  orders:
    format: csv
    location: data/
    mode: merge
    keys: [id]
    incremental: { files: new }
    rejects: { max_ratio: 0.5 }
    schema:
      id: { type: int, required: true }
      customer: { type: int, required: true }
      amount: \"decimal(10,2)\"
models:
  - sql/per_customer.sql
  - sql/big_orders.sql
  - { path: sql/orders_clean.sql, mode: merge, keys: [id], incremental: raw_p_orders }
tests:
  - unique: { table: orders_clean, columns: [id] }
";

/// Per table: a query whose one row sums it up (count and sums of every column).
const FINGERPRINTS: &[(&str, &str)] = &[
    (
        "raw_p_orders",
        "select count(*), sum(id), sum(customer), sum(amount) from raw_p_orders",
    ),
    (
        "per_customer",
        "select count(*), sum(customer), sum(orders), sum(amount) from per_customer",
    ),
    (
        "big_orders",
        "select count(*), sum(id), sum(amount) from big_orders",
    ),
    (
        "orders_clean",
        "select count(*), sum(id), sum(amount) from orders_clean",
    ),
    (
        "kbcrm_loaded_files",
        "select count(*) from kbcrm_loaded_files",
    ),
    ("quarantine", "select count(*), sum(line) from quarantine"),
];

fn rows(n: usize, first: usize, bad_every: usize) -> String {
    let mut s = String::from("id,customer,amount\n");
    for i in first..first + n {
        if bad_every > 0 && i % bad_every == 0 {
            s.push_str(&format!("{i},x,1.00\n"));
        } else {
            s.push_str(&format!("{i},{},{}.{:02}\n", i % 997, i % 500, i % 100));
        }
    }
    s
}

/// Each table's fingerprint; `absent` for a table that does not exist (yet).
fn fingerprints(p: &Project) -> Vec<String> {
    FINGERPRINTS
        .iter()
        .map(|(table, q)| {
            let out = p.kbcrm(&["query", "--format", "csv", q]);
            let text = stdout(&out);
            if out.status.success() {
                text.lines().skip(1).collect::<Vec<_>>().join(";")
            } else {
                let err = stderr(&out);
                assert!(err.contains("not found"), "{table} does not open: {err}");
                "absent".to_string()
            }
        })
        .collect()
}

/// A small xorshift generator: the kill points are the same on every run of the test.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A project after its first run, with the next run's files in place: two new files, some rows
/// bad, some ids changed. (Each case builds its own: loaded files are recorded by path, so a
/// copied project would read its old files again.)
fn project() -> Project {
    let p = Project::empty();
    p.write("pipelines/p.yaml", PIPELINE);
    p.write(
        "sql/per_customer.sql",
        "select customer, count(*) as orders, sum(amount) as amount from raw_p_orders group by customer\n",
    );
    p.write(
        "sql/big_orders.sql",
        "select id, amount from raw_p_orders where amount > 400\n",
    );
    p.write(
        "sql/orders_clean.sql",
        "select id, customer, amount from raw_p_orders where amount is not null\n",
    );
    p.write("data/a.csv", rows(30_000, 1, 0));
    p.ok(&["run"]);
    p.write("data/b.csv", rows(30_000, 20_001, 1_000));
    p.write("data/c.csv", rows(20_000, 50_001, 0));
    p
}

#[test]
fn runs_killed_at_random_moments_lose_and_duplicate_nothing() {
    let reference = project();
    let before = fingerprints(&reference);
    let started = Instant::now();
    reference.ok(&["run"]);
    let run_time = started.elapsed();
    let after = fingerprints(&reference);
    assert_ne!(before, after, "the run changes the tables");

    let points: u64 = std::env::var("KBCRM_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut seed = 0x5eed_u64;
    let (mut killed, mut partial) = (0, 0);
    for point in 0..points {
        let p = project();
        let delay = Duration::from_micros(next(&mut seed) % (run_time.as_micros() as u64 * 6 / 5));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kbcrm"))
            .arg("run")
            .current_dir(p.path())
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kbcrm starts");
        std::thread::sleep(delay);
        let finished = child.try_wait().expect("wait").is_some();
        child.kill().ok(); // SIGKILL
        child.wait().expect("reaped");
        killed += u32::from(!finished);
        // Every table opens and is whole: as before the run, or as after it.
        let now = fingerprints(&p);
        for ((table, _), ((n, b), a)) in
            FINGERPRINTS.iter().zip(now.iter().zip(&before).zip(&after))
        {
            assert!(
                n == b || n == a,
                "point {point} ({delay:?}): {table} is {n}, neither before ({b}) nor after ({a})"
            );
        }
        partial += u32::from(now != before && now != after);
        // The next run ends exactly where a never-killed run does.
        p.ok(&["run"]);
        assert_eq!(
            fingerprints(&p),
            after,
            "point {point} ({delay:?}): after the next run"
        );
        assert!(
            std::fs::read_dir(p.path().join("warehouse/_kbcrm/pending"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0,
            "point {point}: a run manifest is left"
        );
    }
    eprintln!(
        "crash matrix: {points} kill points over {run_time:?}, {killed} runs killed, \
         {partial} left some tables committed and others not"
    );
    assert!(
        killed > 0,
        "no run was killed; the kill points miss the run"
    );
}

/// After a run is killed while holding the warehouse, four runs start at once, `tries` times
/// (`KBCRM_STRESS_TRIES`, default 30): one of them runs, the others are refused as
/// busy, none leaves a commit that jams the next, and the appended table holds every file's
/// rows exactly once.
#[test]
fn runs_started_together_after_a_kill_never_jam_or_duplicate() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/\n    mode: append\n    \
         incremental: { files: new }\n    schema: { id: int, v: int }\n",
    );
    let file = |i: usize| {
        let mut text = String::from("id,v\n");
        for r in 0..500 {
            text.push_str(&format!("{},{}\n", i * 1000 + r, r % 7));
        }
        p.write(&format!("data/f{i:03}.csv"), text);
    };
    file(0);
    p.ok(&["run"]);
    let tries: usize = std::env::var("KBCRM_STRESS_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let lock = p.path().join("warehouse/_kbcrm/run.lock");
    let (mut killed, mut refused) = (0, 0);
    for i in 1..=tries {
        file(i);
        let mut victim = std::process::Command::new(env!("CARGO_BIN_EXE_kbcrm"))
            .arg("run")
            .current_dir(p.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kbcrm starts");
        // Killed once it holds the warehouse (or at the latest after 5 s).
        let started = Instant::now();
        while !lock.exists() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(i as u64 * 7 % 40));
        killed += u32::from(victim.try_wait().expect("wait").is_none());
        victim.kill().ok();
        victim.wait().expect("reaped");
        let runs: Vec<_> = (0..4)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_kbcrm"))
                    .arg("run")
                    .current_dir(p.path())
                    .env("NO_COLOR", "1")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("kbcrm starts")
            })
            .collect();
        for run in runs {
            let out = run.wait_with_output().expect("run ends");
            if !out.status.success() {
                let err = stderr(&out);
                assert!(
                    err.contains("another kbcrm run") || err.contains("is starting on"),
                    "try {i}: a run failed otherwise: {err}"
                );
                refused += 1;
            }
        }
        // Never jammed: the next run works, and nothing is pending.
        p.ok(&["run"]);
        let pending = std::fs::read_dir(p.path().join("warehouse/_kbcrm/pending"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(pending, 0, "try {i}: a commit is left pending");
        assert_eq!(
            p.query("select count(*), count(distinct id) from raw_p_c"),
            vec![vec![
                ((i + 1) * 500).to_string(),
                ((i + 1) * 500).to_string()
            ]],
            "try {i}: rows lost or duplicated"
        );
    }
    eprintln!(
        "concurrent starts: {tries} tries, {killed} runs killed holding the warehouse, \
         {refused} of {} concurrent runs refused as busy",
        tries * 4
    );
}

/// The local file system failing the N-th write (a put, multipart upload, copy, rename or
/// delete) after it is armed; reads always work. The run lock's own file is left alone: a lock
/// that cannot be removed stays held until its process ends, and this process (the test) does
/// not end between runs.
#[derive(Debug, Default)]
struct Faulty {
    inner: LocalFileSystem,
    counter: Arc<Writes>,
}

/// Writes counted since the store was armed, and the one to fail.
#[derive(Debug, Default)]
struct Writes {
    done: AtomicU64,
    fail_at: AtomicU64,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

impl Faulty {
    /// Count writes from zero and fail the `n`-th (none when 0).
    fn arm(&self, n: u64) {
        self.counter.done.store(0, Ordering::SeqCst);
        self.counter.fail_at.store(n, Ordering::SeqCst);
    }

    fn writes(&self) -> u64 {
        self.counter.done.load(Ordering::SeqCst)
    }

    fn write(&self, what: &str, path: &StorePath) -> object_store::Result<()> {
        self.counter.write(what, path)
    }
}

impl Writes {
    fn write(&self, what: &str, path: &StorePath) -> object_store::Result<()> {
        if path.as_ref().ends_with("_kbcrm/run.lock") {
            return Ok(());
        }
        let n = self.done.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "Faulty",
                source: format!("injected fault: {what} of {path} (write {n})").into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &StorePath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.write("put", location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &StorePath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.write("multipart upload", location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &StorePath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<StorePath>>,
    ) -> BoxStream<'static, object_store::Result<StorePath>> {
        let counter = self.counter.clone();
        let judged =
            locations.map(move |l| l.and_then(|p| counter.write("delete", &p).map(|()| p)));
        self.inner.delete_stream(judged.boxed())
    }

    fn list(
        &self,
        prefix: Option<&StorePath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&StorePath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.write("copy", to)?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.write("rename", to)?;
        self.inner.rename_opts(from, to, options).await
    }
}

/// `kbcrm run` in this process with the warehouse opened through `faulty:///...`.
fn run_through_faulty_store(rt: &tokio::runtime::Runtime, p: &Project) -> kbcrm::Result<()> {
    let overrides = kbcrm::plan::Overrides {
        warehouse: Some(format!(
            "faulty://{}/",
            p.path().join("warehouse").display()
        )),
        ..Default::default()
    };
    let project = kbcrm::plan::Project::load(p.path(), &overrides)?;
    rt.block_on(async {
        let runner = kbcrm::run::Runner::new(
            &project,
            kbcrm::run::RunOptions::default(),
            kbcrm::run::Progress::hidden(),
        )
        .await?;
        runner.run(&[]).await.map(|_| ())
    })
}

#[test]
fn runs_whose_store_fails_a_write_lose_and_duplicate_nothing() {
    let faulty = Arc::new(Faulty::default());
    kbcrm::storage::register_store("faulty", faulty.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let reference = project();
    let before = fingerprints(&reference);
    faulty.arm(0);
    run_through_faulty_store(&rt, &reference).expect("a run through the store without faults");
    let writes = faulty.writes();
    let after = fingerprints(&reference);
    assert_ne!(before, after, "the run changes the tables");
    assert!(
        writes > 10,
        "the run wrote through the store: {writes} writes"
    );

    let mut points: Vec<u64> = match std::env::var("KBCRM_FAULT_POINTS").as_deref() {
        Ok("all") => (1..=writes).collect(),
        _ => {
            let mut seed = 0xfa017_u64;
            let mut chosen = vec![1, writes];
            chosen.extend((0..14).map(|_| 1 + next(&mut seed) % writes));
            chosen
        }
    };
    points.sort_unstable();
    points.dedup();
    let mut failed = 0;
    for &n in &points {
        let p = project();
        faulty.arm(n);
        match run_through_faulty_store(&rt, &p) {
            Ok(()) => {}
            Err(e) => {
                failed += 1;
                let text = format!("{e}");
                assert!(
                    text.contains("injected fault"),
                    "write {n}: the error does not say what failed: {text}"
                );
            }
        }
        let now = fingerprints(&p);
        for ((table, _), ((got, b), a)) in
            FINGERPRINTS.iter().zip(now.iter().zip(&before).zip(&after))
        {
            assert!(
                got == b || got == a,
                "write {n} failed: {table} is {got}, neither before ({b}) nor after ({a})"
            );
        }
        p.ok(&["run"]);
        assert_eq!(
            fingerprints(&p),
            after,
            "write {n} failed: after the next run"
        );
    }
    eprintln!(
        "fault matrix: a run writes {writes} times through the store; {} write points failed, \
         {failed} of those runs reported the fault",
        points.len()
    );
    assert!(failed > 0, "no injected fault reached a run");
}
