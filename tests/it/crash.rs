//! The crash matrix: `kbcrm run` killed with SIGKILL at seeded random moments. After each kill
//! every table opens and is as it was before the run or as a complete run leaves it, and the
//! next run ends with exactly what a never-killed run gives. `KBCRM_CRASH_POINTS=N` runs N kill
//! points instead of 20 (the long mode, by hand).

use std::time::{Duration, Instant};

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
