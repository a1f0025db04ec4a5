//! `kbcrm extract`: the executive pack read back by real readers (openpyxl, headless Chromium,
//! an SMTP server), its figures checked against SQL over the same warehouse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;

use crate::support::{Project, have, may_skip, repo, stderr, stdout};

const AS_OF: &str = "2025-12-31";
const PREVIOUS: &str = "2025-09-30";

/// The demo project with its pipelines run as of the previous quarter and the cubes as of
/// the end of the sample history: two as-of dates to compare. Built once, read by many tests.
fn built() -> &'static Project {
    static P: OnceLock<Project> = OnceLock::new();
    P.get_or_init(|| {
        let p = Project::demo();
        p.ok(&["run", "--as-of", PREVIOUS]);
        p.ok(&["cubes", "--as-of", AS_OF]);
        p
    })
}

/// A private copy of the built project (warehouse included) that a test may change.
fn copy_of_built() -> Project {
    let p = Project::empty();
    let status = Command::new("cp")
        .args(["-a", "--no-target-directory"])
        .arg(built().path())
        .arg(p.path())
        .status()
        .unwrap();
    assert!(status.success());
    p
}

fn temp_out() -> tempfile::TempDir {
    tempfile::TempDir::new().unwrap()
}

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn client(script: &str) -> PathBuf {
    repo().join("tests/it/clients").join(script)
}

/// Run a Python helper and parse the JSON it prints.
fn python_json(script: &str, args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(client(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the helper")
}

fn f64_of(s: &str) -> f64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// A number from SQL over the warehouse.
fn sql_number(p: &Project, sql: &str) -> f64 {
    f64_of(&p.query(sql)[0][0])
}

/// The newest version of a table, read from its Delta log.
fn delta_version(p: &Project, table: &str) -> u64 {
    std::fs::read_dir(p.path().join("warehouse").join(table).join("_delta_log"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap()
}

fn read_csv(path: &Path) -> Vec<BTreeMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let headers = r.headers().unwrap().clone();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            headers
                .iter()
                .zip(rec.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Rows of a sheet as JSON values.
fn sheet<'a>(wb: &'a Value, name: &str) -> &'a Value {
    wb["sheets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no sheet {name}"))
}

/// Rows covered by a range such as `Loyalty!$B$5:$B$11`.
fn range_rows(range: &str) -> usize {
    let cells = range.rsplit('!').next().unwrap();
    let (a, b) = cells.split_once(':').unwrap();
    let row = |c: &str| -> usize { c.rsplit('$').next().unwrap().parse().unwrap() };
    row(b) - row(a) + 1
}

#[test]
fn workbook_figures_sheets_and_charts_match_the_warehouse() {
    if !python_has("openpyxl") && may_skip("python3 with openpyxl") {
        return;
    }
    let p = built();
    let out = temp_out();
    let printed = p.ok(&[
        "extract",
        "executive",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(
        printed.contains("extract 'executive' as of 2025-12-31 for role admin"),
        "{printed}"
    );
    let xlsx = out.path().join("executive/executive-2025-12-31.xlsx");
    let wb = python_json("workbook_check.py", &[xlsx.to_str().unwrap()]);
    let names: Vec<&str> = wb["sheets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Summary",
            "Churn warnings",
            "Loyalty",
            "Purchasing power",
            "Knowledge sources",
            "Notes"
        ]
    );
    assert_eq!(wb["properties"]["created"], "2025-12-31 00:00:00");

    // Headline figures against SQL over the cubes, now and a quarter before.
    let summary = sheet(&wb, "Summary");
    let rows = summary["rows"].as_array().unwrap();
    let figure = |label: &str| -> (f64, f64) {
        let r = rows
            .iter()
            .find(|r| r[0] == label)
            .unwrap_or_else(|| panic!("no figure {label}"));
        (r[1].as_f64().unwrap(), r[2].as_f64().unwrap())
    };
    let at = |sql: &str| -> (f64, f64) {
        (
            sql_number(p, &sql.replace("{D}", AS_OF)),
            sql_number(p, &sql.replace("{D}", PREVIOUS)),
        )
    };
    let checks = [
        (
            "Customers",
            at("select count(*) from cube_loyalty where as_of = '{D}'"),
        ),
        (
            "Revenue, last 12 months",
            at("select sum(spend_12m) from cube_purchasing_power where as_of = '{D}'"),
        ),
        (
            "Revenue at risk",
            at("select sum(revenue_at_risk) from cube_churn_warning where as_of = '{D}'"),
        ),
        (
            "Red warnings",
            at(
                "select count(*) from cube_churn_warning where as_of = '{D}' and warning_level = 'red'",
            ),
        ),
        (
            "Amber warnings",
            at(
                "select count(*) from cube_churn_warning where as_of = '{D}' and warning_level = 'amber'",
            ),
        ),
    ];
    for (label, (now, before)) in checks {
        let (v, prev) = figure(label);
        assert!(close(v, now), "{label}: workbook {v}, SQL {now}");
        assert!(
            close(prev, before),
            "{label} before: workbook {prev}, SQL {before}"
        );
        assert!(
            now != before,
            "{label} did not move between the two as-of dates"
        );
    }
    // The champions' share, summed here from the per-customer rows.
    let tiers = p.query(&format!(
        "select tier, monetary from cube_loyalty where as_of = '{AS_OF}'"
    ));
    let total: f64 = tiers.iter().map(|r| f64_of(&r[1])).sum();
    let champions: f64 = tiers
        .iter()
        .filter(|r| r[0] == "champion")
        .map(|r| f64_of(&r[1]))
        .sum();
    let (share, _) = figure("Champions' share of revenue");
    assert!(
        (share - champions / total).abs() < 1e-9,
        "{share} vs {}",
        champions / total
    );

    // The churn list: every red and amber customer, by revenue at risk, with reasons and owner.
    let churn = sheet(&wb, "Churn warnings");
    let warned = sql_number(
        p,
        &format!(
            "select count(*) from cube_churn_warning where as_of = '{AS_OF}' \
             and warning_level in ('red', 'amber')"
        ),
    ) as usize;
    let crows = churn["rows"].as_array().unwrap();
    let header: Vec<&str> = crows[3]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(header[0], "customer id");
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let data = &crows[4..];
    assert_eq!(data.len(), warned);
    let risk: Vec<f64> = data
        .iter()
        .map(|r| r[col("revenue at risk")].as_f64().unwrap())
        .collect();
    assert!(
        risk.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by revenue at risk"
    );
    assert!(
        data.iter()
            .all(|r| r[col("warning level")] == "red" || r[col("warning level")] == "amber")
    );
    assert!(data.iter().all(|r| r[col("account owner")].is_string()));
    assert!(
        data.iter()
            .filter(|r| r[col("warning level")] == "red")
            .all(|r| r[col("reasons")].as_str().is_some_and(|s| !s.is_empty()))
    );
    assert_eq!(churn["freeze"], "A5");
    assert_eq!(churn["autofilter"], format!("A4:K{}", 4 + warned));
    assert_eq!(churn["formats"]["G"], "#,##0");
    assert!(
        churn["widths"]["H"].as_f64().unwrap() > 30.0,
        "reasons column too narrow"
    );

    // Native charts over the sheets' own cells.
    let chart = |sheet_name: &str, kind: &str| -> Value {
        sheet(&wb, sheet_name)["charts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} on {sheet_name}"))
    };
    let regions = chart("Summary", "barChart");
    assert_eq!(regions["title"], "Revenue at risk by region");
    let n_regions = sql_number(
        p,
        &format!(
            "select count(distinct c.region) from cube_churn_warning w join dim_customer c \
             on c.customer_id = w.customer_id and c.is_current where w.as_of = '{AS_OF}'"
        ),
    ) as usize;
    assert_eq!(
        range_rows(regions["series"][0]["values"].as_str().unwrap()),
        n_regions
    );
    let pyramid = chart("Loyalty", "barChart");
    let n_tiers = sql_number(
        p,
        &format!("select count(distinct tier) from cube_loyalty where as_of = '{AS_OF}'"),
    ) as usize;
    assert_eq!(
        range_rows(pyramid["series"][0]["values"].as_str().unwrap()),
        n_tiers
    );
    let pareto = chart("Loyalty", "scatterChart");
    assert!(pareto["title"].as_str().unwrap().contains("Pareto"));
    assert_eq!(
        range_rows(pareto["series"][0]["values"].as_str().unwrap()),
        100
    );
    let clv = chart("Purchasing power", "barChart");
    assert_eq!(range_rows(clv["series"][0]["values"].as_str().unwrap()), 8);

    // Notes: the versions the figures come from and the run's data tests.
    let notes: Vec<(String, String)> = sheet(&wb, "Notes")["rows"].as_array().unwrap()[4..]
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let note = |k: &str| notes.iter().find(|(i, _)| i == k).map(|(_, v)| v.clone());
    assert_eq!(note("As of").as_deref(), Some(AS_OF));
    assert_eq!(note("Compared with").as_deref(), Some(PREVIOUS));
    for t in ["cube_churn_warning", "cube_loyalty", "dim_customer"] {
        assert_eq!(
            note(&format!("Table version: {t}")),
            Some(delta_version(p, t).to_string()),
            "{t}"
        );
    }
    let tests = note("Data tests").unwrap();
    let passed = p.query(
        "select count(*), sum(case when passed then 1 else 0 end) from kbcrm_test_results \
         where run_id = (select run_id from kbcrm_test_results where pipeline = 'cubes' \
         order by checked_at desc limit 1)",
    );
    assert!(
        tests.ends_with(&format!("{} of {} passed", passed[0][1], passed[0][0])),
        "{tests} vs {passed:?}"
    );
}

#[test]
fn dashboard_is_self_contained_and_renders() {
    if (!python_has("PIL") || !have("chromium", "--version"))
        && may_skip("chromium and python3 with Pillow")
    {
        return;
    }
    let p = built();
    let out = temp_out();
    p.ok(&[
        "extract",
        "executive",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let page = out.path().join("executive/executive-2025-12-31.html");
    let html = std::fs::read_to_string(&page).unwrap();
    for banned in [
        "http:", "https:", "src=", "<script", "<link", "@import", "url(",
    ] {
        assert!(!html.contains(banned), "the dashboard contains {banned}");
    }
    let customers = sql_number(
        p,
        &format!("select count(*) from cube_loyalty where as_of = '{AS_OF}'"),
    );
    assert!(html.contains(&kbcrm::extract::group_digits(customers)));
    assert_eq!(html.matches("<svg").count(), 6, "charts on the dashboard");
    for (w, h) in [(1280, 2400), (390, 1800)] {
        let png = out.path().join(format!("dash-{w}.png"));
        let r = python_json(
            "browser_check.py",
            &[
                page.to_str().unwrap(),
                png.to_str().unwrap(),
                &w.to_string(),
                &h.to_string(),
            ],
        );
        assert_eq!(r["exit"], 0, "{r}");
        assert_eq!(
            r["requests"],
            Value::Array(vec![]),
            "the page made requests: {r}"
        );
        assert_eq!(r["console"], Value::Array(vec![]), "console messages: {r}");
        assert!(
            r["colors"].as_u64().unwrap() > 100,
            "a blank screenshot? {r}"
        );
        assert!(r["ink"].as_f64().unwrap() > 0.2, "a blank screenshot? {r}");
    }
    // The same check catches a page that fetches and fails.
    let bad = out.path().join("bad.html");
    std::fs::write(
        &bad,
        "<!doctype html><h1>bad</h1><img src=\"http://example.invalid/x.png\">\
         <script>throw new Error('boom-kbcrm')</script>",
    )
    .unwrap();
    let png = out.path().join("bad.png");
    let r = python_json(
        "browser_check.py",
        &[bad.to_str().unwrap(), png.to_str().unwrap(), "800", "600"],
    );
    assert!(r["requests"].to_string().contains("example.invalid"), "{r}");
    assert!(r["console"].to_string().contains("boom-kbcrm"), "{r}");
}

#[test]
fn recipients_see_only_their_rows_and_pii_is_masked() {
    let p = built();
    let out = temp_out();
    p.ok(&["extract", "--out", out.path().to_str().unwrap()]);
    let north = read_csv(&out.path().join("north/tables/churn_warnings.csv"));
    let expected = sql_number(
        p,
        &format!(
            "select count(*) from cube_churn_warning w join dim_customer c \
             on c.customer_id = w.customer_id and c.is_current \
             where w.as_of = '{AS_OF}' and w.warning_level in ('red', 'amber') \
             and c.region = 'North'"
        ),
    ) as usize;
    assert!(expected > 0);
    assert_eq!(north.len(), expected);
    assert!(north.iter().all(|r| r["region"] == "North"));
    assert!(
        north.iter().all(|r| r["customer_name"] == "***"),
        "PII not masked"
    );
    // The north headline counts the north's customers only.
    let headline = read_csv(&out.path().join("north/tables/headline.csv"));
    let customers = headline
        .iter()
        .find(|r| r["figure"] == "Customers")
        .unwrap();
    let north_customers = sql_number(
        p,
        &format!(
            "select count(*) from cube_loyalty l join dim_customer c \
             on c.customer_id = l.customer_id and c.is_current \
             where l.as_of = '{AS_OF}' and c.region = 'North'"
        ),
    );
    assert!(close(f64_of(&customers["value"]), north_customers));
    // What the role may not read is left out and said so.
    let notes = read_csv(&out.path().join("north/tables/notes.csv"));
    assert!(notes.iter().any(|r| r["item"].starts_with("Left out")
        && r["value"].contains("may not read cube_knowledge_source")));
    assert!(
        !out.path()
            .join("north/tables/knowledge_sources.csv")
            .exists()
    );
    // The admin's pack has names and every region; its Parquet tables hold the same rows.
    let all = read_csv(&out.path().join("executive/tables/churn_warnings.csv"));
    assert!(
        all.iter()
            .all(|r| r["customer_name"] != "***" && !r["customer_name"].is_empty())
    );
    assert!(all.iter().any(|r| r["region"] != "North"));
    let file =
        std::fs::File::open(out.path().join("executive/tables/churn_warnings.parquet")).unwrap();
    let reader = kbcrm::datafusion::parquet::file::reader::SerializedFileReader::new(file).unwrap();
    use kbcrm::datafusion::parquet::file::reader::FileReader;
    assert_eq!(
        reader.metadata().file_metadata().num_rows() as usize,
        all.len()
    );
}

#[test]
fn the_same_versions_give_the_same_bytes() {
    let p = built();
    let (a, b) = (temp_out(), temp_out());
    p.ok(&["extract", "executive", "--out", a.path().to_str().unwrap()]);
    p.ok(&["extract", "executive", "--out", b.path().to_str().unwrap()]);
    let files = |d: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![d.to_path_buf()];
        while let Some(x) = stack.pop() {
            for e in std::fs::read_dir(&x).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push((
                        e.path().strip_prefix(d).unwrap().to_path_buf(),
                        std::fs::read(e.path()).unwrap(),
                    ));
                }
            }
        }
        out.sort();
        out
    };
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(
        fa.len(),
        2 + 2 * 10,
        "workbook, dashboard, 10 tables as CSV and Parquet"
    );
    for ((na, ba), (nb, bb)) in fa.iter().zip(&fb) {
        assert_eq!(na, nb);
        assert!(ba == bb, "{} differs between two extracts", na.display());
    }
    // An earlier as-of date has nothing before it to compare with.
    let c = temp_out();
    let printed = p.ok(&[
        "extract",
        "executive",
        "--as-of",
        PREVIOUS,
        "--out",
        c.path().to_str().unwrap(),
    ]);
    assert!(printed.contains("as of 2025-09-30"), "{printed}");
    let notes = read_csv(&c.path().join("executive/tables/notes.csv"));
    assert!(
        notes
            .iter()
            .any(|r| r["item"] == "Compared with" && r["value"].starts_with("nothing"))
    );
}

#[test]
fn folder_and_object_store_deliveries_and_a_failing_one() {
    let p = copy_of_built();
    let (folder, store) = (temp_out(), temp_out());
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        format!(
            "{yaml}\n  board:\n    role: analyst\n    formats: [xlsx, csv]\n    attempts: 2\n    deliver:\n      \
             - folder: {}\n      - url: file://{}/packs\n",
            folder.path().display(),
            store.path().display()
        ),
    );
    let out = temp_out();
    let printed = p.ok(&["extract", "board", "--out", out.path().to_str().unwrap()]);
    assert!(printed.contains("delivered to folder"), "{printed}");
    let written = out.path().join("board/board-2025-12-31.xlsx");
    let bytes = std::fs::read(&written).unwrap();
    assert_eq!(
        std::fs::read(folder.path().join("board/board-2025-12-31.xlsx")).unwrap(),
        bytes
    );
    assert_eq!(
        std::fs::read(store.path().join("packs/board/board-2025-12-31.xlsx")).unwrap(),
        bytes
    );
    assert!(
        store
            .path()
            .join("packs/board/tables/headline.csv")
            .is_file()
    );
    // The analyst role has no PII grant: names masked in what is delivered too.
    let churn = read_csv(&folder.path().join("board/tables/churn_warnings.csv"));
    assert!(churn.iter().all(|r| r["customer_name"] == "***"));

    // A folder that cannot be created: tried twice, the command fails, the files stay.
    let blocker = temp_out();
    std::fs::write(blocker.path().join("file"), "not a folder").unwrap();
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        yaml.replace(
            &format!("- folder: {}", folder.path().display()),
            &format!("- folder: {}/file/inside", blocker.path().display()),
        ),
    );
    let again = temp_out();
    let o = p.kbcrm(&["extract", "board", "--out", again.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("delivery failed") && err.contains("(2 attempts)"),
        "{err}"
    );
    assert!(
        err.contains("file/inside") && err.contains("the files are kept"),
        "{err}"
    );
    assert!(again.path().join("board/board-2025-12-31.xlsx").is_file());
    assert!(stdout(&o).contains("NOT delivered"), "{}", stdout(&o));
    // Both extracts are in the run history, the failed delivery with its reason.
    let runs = p.query(
        "select status, deliveries, error from kbcrm_runs where kind = 'extract' \
         and name = 'board' order by started_at",
    );
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0][0], "succeeded");
    assert!(runs[0][1].contains("delivered (1 attempts)"), "{runs:?}");
    assert_eq!(runs[1][0], "failed");
    assert!(runs[1][1].contains("failed after 2 attempts"), "{runs:?}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Sink(std::process::Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn email_over_starttls_arrives_with_the_workbook() {
    if (!python_has("aiosmtpd, openpyxl") || !have("openssl", "version"))
        && may_skip("python3 with aiosmtpd and openpyxl, and openssl")
    {
        return;
    }
    let p = copy_of_built();
    std::fs::create_dir_all(p.path().join("tls")).unwrap();
    // A certificate authority and a server certificate it signed, as a real relay has.
    p.write(
        "tls/leaf.ext",
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    );
    let steps = [
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kbcrm-test-ca \
         -keyout tls/ca.key -out tls/ca.crt",
        "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout tls/smtp.key -out tls/smtp.csr",
        "x509 -req -in tls/smtp.csr -CA tls/ca.crt -CAkey tls/ca.key -CAcreateserial -days 2 \
         -extfile tls/leaf.ext -out tls/smtp.crt",
    ];
    for step in steps {
        let o = Command::new("openssl")
            .args(step.split_whitespace())
            .current_dir(p.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl {step}: {}", stderr(&o));
    }
    let port = free_port();
    let inbox = temp_out();
    let mut child = Command::new("python3")
        .arg(client("smtp_sink.py"))
        .args(["serve", &port.to_string(), inbox.path().to_str().unwrap()])
        .arg(p.path().join("tls/smtp.crt"))
        .arg(p.path().join("tls/smtp.key"))
        .args(["mailer", "s3cret pass"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _sink = Sink(child);
    assert_eq!(line.trim(), "ready");
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        format!(
            "{yaml}\n  mail:\n    role: admin\n    formats: [xlsx, html]\n    attempts: 2\n    deliver:\n      \
             - email:\n          to: [\"Board <board@example.com>\"]\n          \
             from: \"kbcrm <reports@example.com>\"\n          smtp: localhost:{port}\n          \
             ca_file: tls/ca.crt\n          username_env: TEST_SMTP_USER\n          \
             password_env: TEST_SMTP_PASSWORD\n"
        ),
    );
    let run = |password: &str| {
        Command::new(env!("CARGO_BIN_EXE_kbcrm"))
            .args(["extract", "mail", "--out"])
            .arg(p.path().join("out"))
            .current_dir(p.path())
            .env("TEST_SMTP_USER", "mailer")
            .env("TEST_SMTP_PASSWORD", password)
            .output()
            .unwrap()
    };
    let ok = run("s3cret pass");
    assert!(ok.status.success(), "{}\n{}", stdout(&ok), stderr(&ok));
    let eml = inbox.path().join("1.eml");
    assert!(eml.is_file(), "no message arrived");
    let m = python_json("smtp_sink.py", &["read", eml.to_str().unwrap()]);
    assert!(
        m["subject"].as_str().unwrap().contains("as of 2025-12-31"),
        "{m}"
    );
    assert!(m["to"].as_str().unwrap().contains("board@example.com"));
    let body = m["body"].as_str().unwrap();
    let at_risk = sql_number(
        built(),
        &format!("select sum(revenue_at_risk) from cube_churn_warning where as_of = '{AS_OF}'"),
    );
    assert!(
        body.contains(&format!(
            "Revenue at risk: {}",
            kbcrm::extract::group_digits(at_risk)
        )),
        "{body}"
    );
    let workbook = m["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "mail-2025-12-31.xlsx")
        .unwrap_or_else(|| panic!("no workbook attached: {m}"));
    assert_eq!(workbook["sheets"][0], "Summary");
    let customers = sql_number(
        built(),
        &format!("select count(*) from cube_loyalty where as_of = '{AS_OF}'"),
    );
    assert!(close(workbook["summary_b5"].as_f64().unwrap(), customers));
    assert!(
        m["attachments"]
            .to_string()
            .contains("mail-2025-12-31.html")
    );

    // A wrong password is a permanent refusal: one attempt, a clear error, files kept.
    let bad = run("wrong");
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(
        err.contains("refused") && err.contains("(1 attempts)"),
        "{err}"
    );
    assert!(p.path().join("out/mail/mail-2025-12-31.xlsx").is_file());
    assert!(!inbox.path().join("2.eml").exists());

    // Nobody listening: tried `attempts` times.
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        yaml.replace(
            &format!("localhost:{port}"),
            &format!("localhost:{}", free_port()),
        ),
    );
    let down = run("s3cret pass");
    assert_eq!(down.status.code(), Some(1));
    assert!(stderr(&down).contains("(2 attempts)"), "{}", stderr(&down));
}

#[test]
fn bad_extract_settings_name_file_line_and_fix() {
    let p = copy_of_built();
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        format!(
            "{yaml}\n  broken:\n    role: board_room\n    as_of: yesterday\n    deliver:\n      \
             - email: {{ to: [not-an-address], from: a@example.com, smtp: mail.example.com }}\n"
        ),
    );
    let o = p.kbcrm(&["validate"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    for needle in [
        "kbcrm.yaml",
        "extracts.broken.role: no role 'board_room'",
        "extracts.broken.as_of: 'yesterday'",
        "'not-an-address' is not an e-mail address",
        "'mail.example.com' is not host:port",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(
        err.contains(&format!("kbcrm.yaml:{}", yaml.lines().count() + 3)),
        "{err}"
    );

    let p = built();
    let o = p.kbcrm(&["extract", "nosuch"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no extract 'nosuch'") && stderr(&o).contains("executive, north"));
    let o = p.kbcrm(&[
        "extract",
        "executive",
        "--as-of",
        "2020-01-01",
        "--no-deliver",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("nothing as of 2020-01-01 (they are as of: 2025-09-30, 2025-12-31)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_scheduled_extract_is_written_delivered_and_recorded() {
    let p = copy_of_built();
    let folder = temp_out();
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        format!(
            "{yaml}\n  daily:\n    role: analyst\n    formats: [xlsx]\n    schedule: \"0 6 * * *\"\n    \
             deliver:\n      - folder: {}\n",
            folder.path().display()
        ),
    );
    let out = temp_out();
    let printed = p.ok(&["schedule", "--once", "--out", out.path().to_str().unwrap()]);
    assert!(
        printed.contains("extract daily as of 2025-12-31 written to"),
        "{printed}"
    );
    assert!(out.path().join("daily/daily-2025-12-31.xlsx").is_file());
    assert!(folder.path().join("daily/daily-2025-12-31.xlsx").is_file());
    let runs = p.query(
        "select trigger, status, deliveries from kbcrm_runs where kind = 'extract' and name = 'daily'",
    );
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        (runs[0][0].as_str(), runs[0][1].as_str()),
        ("schedule", "succeeded")
    );
    assert!(runs[0][2].contains("delivered"), "{runs:?}");
    let again = p.ok(&["schedule", "--once", "--out", out.path().to_str().unwrap()]);
    assert!(again.contains("nothing is due"), "{again}");
}

/// Extracts killed at seeded moments leave staging folders; the next extract removes every one
/// that no live process holds (and leaves one a live writer holds), and its folder is whole.
#[test]
fn killed_extracts_leave_nothing_behind_the_next() {
    let p = built();
    let out = temp_out();
    let started = Instant::now();
    p.ok(&[
        "extract",
        "executive",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let took = started.elapsed();
    let whole: Vec<_> = std::fs::read_dir(out.path().join("executive/tables"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let mut killed = 0;
    for i in 1..=4u32 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kbcrm"))
            .args(["extract", "executive", "--no-deliver", "--out"])
            .arg(out.path())
            .current_dir(p.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(took * i / 5);
        killed += u32::from(child.try_wait().unwrap().is_none());
        child.kill().ok();
        child.wait().unwrap();
    }
    // A writer at work right now: its folder is locked and must stay.
    let live = out.path().join(".executive.partial-1-live");
    std::fs::create_dir(&live).unwrap();
    let held = std::fs::File::open(&live).unwrap();
    held.lock().unwrap();
    // And one an older kbcrm left, which held no lock.
    std::fs::create_dir(out.path().join(".executive.partial-4194305")).unwrap();
    p.ok(&[
        "extract",
        "executive",
        "--no-deliver",
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let left: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter()
            .all(|n| n == "executive" || n == ".executive.partial-1-live"),
        "left behind after {killed} killed extracts: {left:?}"
    );
    assert!(live.exists(), "a live writer's folder was removed");
    let now: Vec<_> = std::fs::read_dir(out.path().join("executive/tables"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(now.len(), whole.len());
    drop(held);
    eprintln!("killed extracts: {killed} of 4 killed while writing ({took:?} for a whole one)");
}
