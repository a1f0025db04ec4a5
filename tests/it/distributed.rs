//! Queries and cube builds on Apache DataFusion Ballista: a cluster inside the kbcrm process
//! (`--engine ballista`), and a scheduler with two executor processes on loopback
//! (`kbcrm ballista scheduler|executor`, `--engine df://host:port`); the results must be those
//! of the local engine.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::serve::{add_user_with_env, connect, rt, serve_with_env, texts};
use crate::support::{Project, repo, stderr};

/// The OLAP query set of the benchmarks, with one customer's id for the history query.
fn olap_queries(customer_id: &str) -> Vec<(String, String)> {
    let dir = repo().join("benches/olap");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("benches/olap")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "the OLAP query set: {files:?}");
    files
        .into_iter()
        .map(|f| {
            let sql = std::fs::read_to_string(&f)
                .expect("read")
                .replace(":customer_id", &format!("'{customer_id}'"));
            let name = f.file_stem().expect("name").to_string_lossy().into_owned();
            (name, sql)
        })
        .collect()
}

/// Relative agreement of sums of doubles: they differ in the last bits with the order they are
/// added in.
const SUMS: f64 = 1e-6;

/// Relative agreement of maximum-likelihood fits and what is computed from them. The optimiser
/// stops once the cost changes by under 1e-14 (src/stats/fit.rs); along a flat likelihood that
/// leaves the parameters free in about the sixth digit, and a cluster that sums the
/// log-likelihood in another order stops a little elsewhere (alpha 7.515444 against 7.515452).
const FITS: f64 = 1e-5;

/// The cubes whose values are, or are computed from, fitted parameters.
const FITTED: &[&str] = &[
    "model_params",
    "cube_churn_warning",
    "cube_purchasing_power",
    "cube_churn_rollup",
];

/// Whether two fields agree: numbers with a decimal point to `relative` or one unit in the
/// last place printed, whichever is larger (a model's `round(x, 6)` can land on either side of
/// a half), anything else exactly.
fn close(a: &str, b: &str, relative: f64) -> bool {
    let places = |s: &str| s.split_once('.').map_or(0, |(_, f)| f.len()) as i32;
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) if a.contains('.') || b.contains('.') => {
            // Values rounded to two or more decimals may differ by one unit in the last place
            // ("0.70775" is 0.707750 with its zero dropped); "35.0" against "35.1" is a real
            // difference.
            let last_place = match places(a).max(places(b)) {
                p if p >= 2 => 10f64.powi(-p) * 1.000_001,
                _ => 0.0,
            };
            (x - y).abs() <= (relative * x.abs().max(y.abs())).max(last_place) + 1e-12
        }
        _ => a == b,
    }
}

/// Rows sorted by their fields, numbers rounded for the sort only.
fn sorted(mut rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    let key = |r: &Vec<String>| -> Vec<String> {
        r.iter()
            .map(|f| match f.parse::<f64>() {
                Ok(x) if f.contains('.') => format!("{x:.3e}"),
                _ => f.clone(),
            })
            .collect()
    };
    rows.sort_by_key(key);
    rows
}

/// Assert that two results hold the same rows, in any order.
fn assert_same(got: Vec<Vec<String>>, want: Vec<Vec<String>>, relative: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row counts differ");
    let (got, want) = (sorted(got), sorted(want));
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| close(a, b, relative)),
            "{what}: {g:?} differs from {w:?}"
        );
    }
}

#[test]
fn fields_agree_to_the_last_place_printed() {
    assert!(close("0.707752", "0.707753", SUMS));
    assert!(close("0.70775", "0.707751", SUMS));
    assert!(!close("0.707752", "0.707754", SUMS));
    assert!(close("16068.88", "16068.89", SUMS));
    assert!(!close("35.0", "35.1", SUMS));
    assert!(close("1234567.0", "1234567.5", SUMS));
    assert!(!close("35", "36", SUMS));
    assert!(!close("West", "East", SUMS));
    assert!(!close("7.515444", "7.515452", SUMS));
    assert!(close("7.515444", "7.515452", FITS));
    assert!(!close("1.40872", "1.40875", FITS));
}

/// The cube tables a `kbcrm run cubes` builds.
const CUBES: &[&str] = &[
    "cube_customer_rfm",
    "model_params",
    "cube_loyalty",
    "cube_loyalty_structure",
    "cube_loyalty_pareto",
    "cube_purchasing_power",
    "cube_churn_warning",
    "int_knowledge_inputs",
    "cube_knowledge_source",
    "cube_churn_rollup",
    "cube_loyalty_rollup",
    "int_sales_order_category",
    "int_sales_order",
    "cube_sales_rollup",
];

/// `local` and `other` (built on `engine`) hold the same cube rows; and the OLAP queries on
/// `engine` answer as the local engine does over `local`.
fn same_results(local: &Project, other: &Project, engine: &str) {
    let env = [("KBCRM_ENGINE", engine)];
    for cube in CUBES {
        // The BG/NBD fit on this data lies on a ridge where a and b grow together: their
        // ratio is what the fit determines (and what P(alive) depends on).
        let sql = if *cube == "model_params" {
            "select * except (bg_a, bg_b), bg_a / (bg_a + bg_b) as bg_a_share from model_params"
                .to_string()
        } else {
            format!("select * from {cube}")
        };
        let want = local.query(&sql);
        assert!(!want.is_empty(), "{cube} is empty");
        let relative = if FITTED.contains(cube) { FITS } else { SUMS };
        assert_same(
            other.query(&sql),
            want,
            relative,
            &format!("{cube} built on {engine} and locally"),
        );
    }
    let customer = &local.query("select min(customer_id) from fact_sales")[0][0];
    for (name, sql) in olap_queries(customer) {
        let (got, want) = (local.query_with_env(&sql, &env), local.query(&sql));
        if name.contains("history") {
            // Ordered by day, kind and a unique reference: the order itself must agree.
            let keys = |rows: &[Vec<String>]| -> Vec<String> {
                rows.iter().map(|r| r[..3].join("|")).collect()
            };
            assert_eq!(keys(&got), keys(&want), "{name}: the order on {engine}");
        }
        assert_same(got, want, SUMS, &format!("{name} on {engine} and locally"));
    }
    let plan = local.query_with_env("explain select count(*) from fact_sales", &env);
    let plan = format!("{plan:?}");
    assert!(
        plan.contains("distributed_plan") || plan.contains("DistributedQueryExec"),
        "the query ran on the cluster: {plan}"
    );
}

/// The star schema built locally, and two copies: cubes built locally in the first, on
/// `engine` in the second.
fn built(engine: &str) -> (Project, Project) {
    let local = Project::demo();
    local.ok(&["run", "erp", "sales", "service", "star"]);
    let other = local.copied();
    local.ok(&["run", "cubes"]);
    let out = other.kbcrm_with_env(&["-v", "run", "cubes"], &[("KBCRM_ENGINE", engine)]);
    let log = stderr(&out);
    assert!(out.status.success(), "cubes on {engine}: {log}");
    assert!(
        log.contains("SQL runs on the Ballista cluster"),
        "the models ran on the cluster: {log}"
    );
    (local, other)
}

/// `kbcrm serve` on `engine` answers the OLAP queries as the local server does, runs them on
/// the cluster, and still answers the catalog queries BI tools send.
fn served_alike(p: &Project, engine: &str) {
    add_user_with_env(p, "ada", "admin", "ada long password", &[]);
    let local = serve_with_env(p, &[]);
    let cluster = serve_with_env(p, &[("KBCRM_ENGINE", engine)]);
    let customer = &p.query("select min(customer_id) from fact_sales")[0][0];
    rt().block_on(async {
        let l = connect(local.port, "ada", "ada long password")
            .await
            .expect("local");
        let c = connect(cluster.port, "ada", "ada long password")
            .await
            .expect("cluster");
        for (name, sql) in olap_queries(customer) {
            let (got, want) = (texts(&c, &sql).await, texts(&l, &sql).await);
            assert!(!want.is_empty(), "{name}: no rows");
            let plan = format!("{:?}", texts(&c, &format!("explain {sql}")).await);
            assert!(
                plan.contains("DistributedQueryExec") || plan.contains("distributed_plan"),
                "{name} did not run on the cluster: {plan}"
            );
            assert_same(
                got,
                want,
                SUMS,
                &format!("{name} served from {engine} and locally"),
            );
        }
        // Through the extended protocol too (a bound parameter, planned on the cluster).
        let count = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i64>(0);
        let sql = "select count(*) from fact_sales where customer_id = $1";
        assert_eq!(
            count(c.query(sql, &[customer]).await.expect("cluster")),
            count(l.query(sql, &[customer]).await.expect("local")),
        );
        let explain = "explain select count(*) from fact_sales";
        let plan = format!("{:?}", texts(&c, explain).await);
        assert!(
            plan.contains("DistributedQueryExec") || plan.contains("distributed_plan"),
            "on the cluster: {plan}"
        );
        let plan = format!("{:?}", texts(&l, explain).await);
        assert!(
            !plan.contains("DistributedQueryExec") && !plan.contains("distributed_plan"),
            "locally: {plan}"
        );
        // Catalog queries and the run history are answered by the server itself.
        for sql in [
            "select table_name from information_schema.tables where table_name = 'fact_sales'",
            "select relname from pg_catalog.pg_class where relname = 'fact_sales'",
            "select count(*) > 0 from kbcrm_runs",
        ] {
            let got = texts(&c, sql).await;
            assert!(!got.is_empty(), "{sql}: no rows");
            assert_eq!(got, texts(&l, sql).await, "{sql}");
        }
    });
}

#[test]
fn queries_and_cubes_on_a_ballista_cluster_in_the_process_match_local() {
    let (local, other) = built("ballista");
    same_results(&local, &other, "ballista");
    served_alike(&local, "ballista");
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Start `kbcrm ballista ...` in `dir`, wait for its first line and for `port` to accept.
fn start(dir: &Path, args: &[&str], port: u16) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kbcrm"))
        .arg("ballista")
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kbcrm ballista starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    assert!(line.contains("Ballista"), "{line}");
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "port {port} did not open: {args:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    process
}

#[test]
fn queries_and_cubes_on_a_scheduler_and_two_executors_match_local() {
    let scheduler_port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let _scheduler = start(
        dir.path(),
        &[
            "scheduler",
            "--bind",
            &format!("127.0.0.1:{scheduler_port}"),
            "--external-host",
            "127.0.0.1",
        ],
        scheduler_port,
    );
    let mut executors = Vec::new();
    let mut work_dirs = Vec::new();
    for i in 0..2 {
        let (port, grpc) = (free_port(), free_port());
        let work = dir.path().join(format!("executor-{i}"));
        std::fs::create_dir_all(&work).expect("mkdir");
        executors.push(start(
            dir.path(),
            &[
                "executor",
                "--scheduler",
                &format!("127.0.0.1:{scheduler_port}"),
                "--bind-host",
                "127.0.0.1",
                "--external-host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--grpc-port",
                &grpc.to_string(),
                "--vcores",
                "1",
                "--work-dir",
                &work.to_string_lossy(),
            ],
            port,
        ));
        work_dirs.push(work);
    }
    // Executors register with the scheduler right after they start listening.
    std::thread::sleep(Duration::from_secs(2));
    let engine = format!("df://127.0.0.1:{scheduler_port}");
    let (local, other) = built(&engine);
    same_results(&local, &other, &engine);
    for work in &work_dirs {
        let used = std::fs::read_dir(work).expect("work dir").count();
        assert!(used > 0, "executor {} ran no task", work.display());
    }
}

#[test]
fn an_unreachable_scheduler_is_a_clear_error() {
    let p = Project::empty();
    let engine = format!("df://127.0.0.1:{}", free_port());
    let out = p.kbcrm(&["--engine", &engine, "query", "select 1"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot reach the Ballista scheduler at {engine}")),
        "{err}"
    );
}
