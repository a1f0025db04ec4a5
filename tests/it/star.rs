//! The star schema on generated data: identity resolution scored against the generator's truth,
//! totals reconciled with the source files, and a second day's batch.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::support::{Project, run_in, stderr, truth_csv};

/// Same-customer pairs: precision and recall of the map against the truth.
fn pair_scores(map: &[Vec<String>], truth: &HashMap<(String, String), String>) -> (f64, f64) {
    let mut pred: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut real: HashMap<&str, usize> = HashMap::new();
    for r in map {
        let t = truth
            .get(&(r[0].clone(), r[1].clone()))
            .unwrap_or_else(|| panic!("record {r:?} is not in the truth"));
        pred.entry(r[2].as_str()).or_default().push(t);
        *real.entry(t).or_default() += 1;
    }
    let pairs = |n: usize| n * n.saturating_sub(1) / 2;
    let mut tp = 0;
    let mut predicted = 0;
    for members in pred.values() {
        predicted += pairs(members.len());
        let mut by_truth: HashMap<&str, usize> = HashMap::new();
        for m in members {
            *by_truth.entry(m).or_default() += 1;
        }
        tp += by_truth.values().map(|n| pairs(*n)).sum::<usize>();
    }
    let actual: usize = real.values().map(|n| pairs(*n)).sum();
    (tp as f64 / predicted as f64, tp as f64 / actual as f64)
}

pub(crate) fn truth_identity(dir: &Path) -> HashMap<(String, String), String> {
    let mut reader = csv::Reader::from_path(dir.join("identity.csv")).unwrap();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            ((r[0].to_string(), r[1].to_string()), r[2].to_string())
        })
        .collect()
}

#[test]
fn identity_resolution_matches_the_truth() {
    let p = Project::demo();
    let out = p.ok(&["run"]);
    assert!(
        out.contains("identity customer:") && out.contains("matched by tax_id"),
        "{out}"
    );
    let truth = truth_identity(&crate::support::sample_data().join("truth"));
    let map = p.query("select source, source_id, customer_id from map_customer_identity");
    assert!(map.len() > 1000, "{} records", map.len());
    let (precision, recall) = pair_scores(&map, &truth);
    assert!(precision >= 0.99, "precision {precision:.4}");
    assert!(recall >= 0.99, "recall {recall:.4}");
    // Every system's records are in the map.
    let loaded = p.scalar("select (select count(*) from stg_erp_customers) + (select count(*) from stg_sales_contacts) + (select count(*) from stg_service_customers)");
    assert_eq!(loaded as usize, map.len());
    // One current dimension row per resolved customer.
    assert_eq!(
        p.scalar("select count(distinct customer_id) from map_customer_identity"),
        p.scalar("select count(*) from dim_customer where is_current")
    );
}

/// Cents of a decimal text such as "12.50".
fn cents(s: &str) -> i64 {
    let (i, f) = s.split_once('.').unwrap_or((s, "0"));
    let f = format!("{f:0<2}");
    let sign = if i.starts_with('-') { -1 } else { 1 };
    i.parse::<i64>().unwrap() * 100 + sign * f[..2].parse::<i64>().unwrap()
}

/// Net amount and count of the order lines that are valid in the source files: not malformed
/// and belonging to a valid order. Read straight from the generated CSV files.
fn valid_lines(data: &Path, batches: &[u32]) -> (i64, usize) {
    let mut malformed: HashSet<(String, u64)> = HashSet::new();
    for b in batches {
        let mut r =
            csv::Reader::from_path(data.join(format!("truth/malformed_{b:04}.csv"))).unwrap();
        for row in r.records() {
            let row = row.unwrap();
            malformed.insert((row[0].to_string(), row[1].parse().unwrap()));
        }
    }
    let rows = |dir: &str| -> Vec<(String, u64, csv::StringRecord)> {
        let mut out = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(data.join("sources").join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            let rel = f
                .strip_prefix(data.join("sources"))
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let mut r = csv::ReaderBuilder::new()
                .flexible(true)
                .from_path(&f)
                .unwrap();
            for (i, row) in r.records().enumerate() {
                out.push((rel.clone(), i as u64 + 2, row.unwrap()));
            }
        }
        out
    };
    let orders: HashSet<String> = rows("sales/orders")
        .into_iter()
        .filter(|(f, l, _)| !malformed.contains(&(f.clone(), *l)))
        .map(|(_, _, r)| r[0].to_string())
        .collect();
    let mut seen = HashSet::new();
    let mut total = 0;
    for (f, l, r) in rows("sales/order_lines") {
        if malformed.contains(&(f, l)) || !orders.contains(&r[0]) {
            continue;
        }
        if seen.insert((r[0].to_string(), r[1].to_string())) {
            total += cents(&r[6]);
        }
    }
    (total, seen.len())
}

fn fact_sales_totals(p: &Project) -> (i64, usize) {
    let rows = p.query("select cast(sum(net_amount) * 100 as bigint), count(*) from fact_sales");
    (rows[0][0].parse().unwrap(), rows[0][1].parse().unwrap())
}

#[test]
fn fact_sales_reconciles_with_the_source_files() {
    let p = Project::demo();
    p.ok(&["run"]);
    let expected = valid_lines(crate::support::sample_data(), &[1]);
    assert_eq!(fact_sales_totals(&p), expected);
    // Every invoice and ticket found its customer version.
    assert_eq!(
        p.scalar("select count(*) from fact_invoice"),
        p.scalar("select count(*) from stg_erp_invoices")
    );
    assert_eq!(
        p.scalar("select count(*) from fact_service_ticket"),
        p.scalar("select count(*) from stg_service_tickets")
    );
}

/// The first line of a run's output that contains `needle`.
fn line_with<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
}

#[test]
fn day_two_batch_reads_only_new_files_and_versions_only_changed_customers() {
    // Every run is as of one date, so that a test crossing midnight does not recompute the
    // cubes that read `kbcrm_as_of()`.
    const AS_OF: &str = "2026-01-15";
    let p = Project::demo_with_own_data(0.01, 11);
    p.ok(&["run", "--as-of", AS_OF]);
    let first_versions = p.scalar("select count(*) from dim_customer");
    let ids_before =
        p.query("select source, source_id, customer_id from map_customer_identity order by 1, 2");
    let paid_before = p.query("select invoice_id, cast(paid_amount as varchar) from fact_invoice");
    let out = run_in(
        p.path(),
        &[
            "generate", "--scale", "0.01", "--seed", "11", "--out", "sources", "--batch", "2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.ok(&["run", "--as-of", AS_OF]);
    let golden_line = line_with(&out, " int_customer_golden ");
    let golden_read: i64 = golden_line
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        golden_read * 5 < p.scalar("select count(*) from int_customer_golden"),
        "only the changed customers' golden records are rebuilt: {golden_line}"
    );
    // The match normalised only the added records (the others' keys come from the match-key
    // table), and the map took only the records whose id or rule changed.
    let written = |table: &str| -> (i64, i64) {
        let line = line_with(&out, &format!(" {table} "));
        let n = |i: usize| line.split_whitespace().nth(i).unwrap().parse().unwrap();
        (n(2), n(4))
    };
    let (records, map_written) = written("map_customer_identity");
    assert_eq!(
        records,
        p.scalar("select count(*) from map_customer_identity")
    );
    assert!(map_written > 0 && map_written * 10 < records, "{out}");
    let (_, keys_written) = written("kbcrm_keys_map_customer_identity");
    assert!(keys_written * 5 < records, "{out}");
    // Merged on the record, the map stays unique on it without being read again.
    let unique = line_with(&out, "unique(map_customer_identity: source, source_id)");
    assert!(
        unique.ends_with("pass (kept unique by the merge on its keys)"),
        "{unique}"
    );
    // Only the day-2 files were read.
    let files: Vec<_> = truth_csv_in(p.path(), "files_0002.csv");
    let day2_orders: i64 = files
        .iter()
        .filter(|f| f["file"].starts_with("sales/orders/"))
        .map(|f| f["rows"].parse::<i64>().unwrap())
        .sum();
    let line = line_with(&out, " raw_sales_orders ");
    assert!(
        line.contains(&format!(" {day2_orders} read")),
        "expected {day2_orders} rows read: {line}\n{out}"
    );
    // Every record resolved on day 1 keeps its customer id.
    let ids_after: HashMap<(String, String), String> = p
        .query("select source, source_id, customer_id from map_customer_identity")
        .into_iter()
        .map(|r| ((r[0].clone(), r[1].clone()), r[2].clone()))
        .collect();
    for r in &ids_before {
        assert_eq!(
            ids_after[&(r[0].clone(), r[1].clone())],
            r[2],
            "{r:?} changed id"
        );
    }
    assert!(
        ids_after.len() >= ids_before.len(),
        "records do not disappear"
    );
    // New versions exactly for the customers whose details changed.
    let truth = truth_identity(&p.path().join("truth"));
    let changed: HashSet<String> = truth_csv_in(p.path(), "changes_0002.csv")
        .into_iter()
        .map(|r| r["true_customer_id"].clone())
        .collect();
    assert!(!changed.is_empty());
    let versioned = p.query(
        "select m.source, m.source_id from map_customer_identity m join \
         (select customer_id from dim_customer group by customer_id having count(*) > 1) v on m.customer_id = v.customer_id",
    );
    let versioned: HashSet<String> = versioned
        .iter()
        .map(|r| truth[&(r[0].clone(), r[1].clone())].clone())
        .collect();
    assert_eq!(versioned, changed);
    let closed = p.scalar("select count(*) from dim_customer where not is_current");
    assert_eq!(closed as usize, changed.len());
    assert!(p.scalar("select count(*) from dim_customer") > first_versions);
    // Facts still reconcile with both days of source files.
    assert_eq!(fact_sales_totals(&p), valid_lines(p.path(), &[1, 2]));
    // The incremental facts read only what day 2 brought, yet hold what their SQL gives over
    // everything: fact_invoice rebuilt the invoices named by new invoices or new payments
    // (payments of day-1 invoices change their paid amount), the others their new rows.
    for (fact, sql) in [
        ("fact_invoice", "sql/facts/fact_invoice.sql"),
        ("fact_service_ticket", "sql/facts/fact_service_ticket.sql"),
        ("fact_interaction", "sql/facts/fact_interaction.sql"),
        ("fact_payment", "sql/facts/fact_payment.sql"),
    ] {
        let line = line_with(&out, &format!(" {fact} "));
        let read: i64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        let total = p.scalar(&format!("select count(*) from {fact}"));
        assert!(
            read * 10 < total,
            "{fact} read {read} of {total} rows: {line}"
        );
        let model = std::fs::read_to_string(p.path().join(sql)).unwrap();
        for (a, b) in [
            (model.as_str(), format!("select * from {fact}")),
            (&format!("select * from {fact}"), model.clone()),
        ] {
            let diff = p.scalar(&format!("select count(*) from (({a}) except all ({b}))"));
            assert_eq!(diff, 0, "{fact} differs from its SQL over all data");
        }
    }
    let paid_after: HashMap<String, String> = p
        .query("select invoice_id, cast(paid_amount as varchar) from fact_invoice")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let repaid = paid_before
        .iter()
        .filter(|r| paid_after[&r[0]] != r[1])
        .count();
    assert!(repaid > 0, "day 2 pays some day-1 invoices");
    // A run with nothing new commits nothing.
    let before = p.ok(&["tables"]);
    let out = p.ok(&["run", "--as-of", AS_OF]);
    assert!(out.contains("(no new files)"), "{out}");
    assert_eq!(before, p.ok(&["tables"]));
    // Day 2 rebuilt only the golden records of the customers whose records changed; resolving
    // everything again finds nothing to change in the map or the golden records.
    let out = p.ok(&["run", "star", "--full-refresh"]);
    for table in ["map_customer_identity", "int_customer_golden"] {
        let line = line_with(&out, &format!(" {table} "));
        assert!(line.ends_with("(unchanged)"), "{line}");
    }
}

#[test]
fn merged_customers_lose_their_golden_record_without_a_rebuild() {
    let p = Project::empty();
    let schema =
        "{ id: { type: string, required: true }, email: string, phone: string, name: string }";
    p.write(
        "pipelines/p.yaml",
        format!(
            "sources:\n  a:\n    format: csv\n    location: data/a/\n    mode: merge\n    keys: [id]\n    schema: {schema}\n  b:\n    format: csv\n    location: data/b/\n    mode: merge\n    keys: [id]\n    schema: {schema}\n\
             identity:\n  customer:\n    id_prefix: C\n    default_country_code: \"49\"\n    records:\n      a: {{ table: raw_p_a, id: id, fields: {{ email: email, phone: phone, name: name }} }}\n      b: {{ table: raw_p_b, id: id, fields: {{ email: email, phone: phone, name: name }} }}\n    rules:\n      - {{ name: email, on: [email] }}\n      - {{ name: phone, on: [phone] }}\n    normalize: {{ email: email, phone: phone }}\n    survivorship: {{ name: {{ prefer: [a, b] }} }}\n"
        ),
    );
    p.write(
        "data/a/a.csv",
        "id,email,phone,name\nA1,anna@example.com,,Anna\nA2,ben@example.com,030 111222,Ben\n",
    );
    p.write(
        "data/b/b1.csv",
        "id,email,phone,name\nB1,carl@example.com,,Carl\n",
    );
    p.ok(&["run"]);
    let golden = "select customer_id, name, record_count from int_customer_golden order by 1";
    assert_eq!(p.query(golden).len(), 3);
    // A new record shares Anna's e-mail and Ben's phone: their two customers become one.
    p.write(
        "data/b/b2.csv",
        "id,email,phone,name\nB2,Anna@Example.com,+49 30 111222,Anna B\n",
    );
    let out = p.ok(&["run"]);
    assert!(out.contains("(0 new, 1 merged)"), "{out}");
    let line = line_with(&out, " int_customer_golden ");
    assert!(
        line.contains(" 1 read "),
        "only the merged customer's golden record is built: {line}"
    );
    let rows = |r: &[[&str; 3]]| -> Vec<Vec<String>> {
        r.iter()
            .map(|r| r.iter().map(|s| s.to_string()).collect())
            .collect()
    };
    assert_eq!(
        p.query(golden),
        rows(&[["C00000001", "Anna", "3"], ["C00000003", "Carl", "1"]])
    );
    // Building every golden record again changes nothing.
    let out = p.ok(&["run", "--full-refresh"]);
    let line = line_with(&out, " int_customer_golden ");
    assert!(line.ends_with("(unchanged)"), "{line}");
}

/// Sorted rows of a query, to compare two warehouses.
fn sorted_rows(p: &Project, sql: &str) -> Vec<Vec<String>> {
    let mut rows = p.query(sql);
    rows.sort();
    rows
}

#[test]
fn several_days_of_batches_load_in_one_run_as_day_by_day() {
    // The same day-1 warehouse; then days 2..4 run one by one, or all in one run (a missed
    // day, a weekly job).
    let daily = Project::demo_with_own_data(0.01, 11);
    daily.ok(&["run"]);
    let weekly = daily.copied();
    let mut planted = String::new();
    for batch in ["2", "3", "4"] {
        for p in [&daily, &weekly] {
            let out = p.kbcrm(&[
                "generate", "--scale", "0.01", "--seed", "11", "--out", "sources", "--batch", batch,
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        if batch == "3" {
            // A customer changed on day 2 changes again on day 3 (the generator rarely does
            // that at this scale): a file of day 3 repeats a key of day 2.
            let day2 = daily
                .path()
                .join("sources/erp/customers/customers_0002_p00.csv");
            let mut reader = csv::Reader::from_path(day2).unwrap();
            let headers = reader.headers().unwrap().clone();
            let mut row: Vec<String> = reader
                .records()
                .next()
                .unwrap()
                .unwrap()
                .iter()
                .map(str::to_string)
                .collect();
            let at = |name: &str| headers.iter().position(|h| h == name).unwrap();
            planted = row[at("erp_customer_id")].clone();
            row[at("credit_limit")] = "999000".into();
            row[at("updated_at")] = "2026-01-02".into();
            let mut file = csv::Writer::from_writer(Vec::new());
            file.write_record(&headers).unwrap();
            file.write_record(&row).unwrap();
            let file = file.into_inner().unwrap();
            for p in [&daily, &weekly] {
                p.write("sources/erp/customers/customers_0003_p99.csv", &file);
            }
        }
        daily.ok(&["run"]);
    }
    weekly.ok(&["run"]);

    let raw_and_staged = [
        "raw_erp_customers",
        "stg_erp_customers",
        "raw_sales_contacts",
        "stg_sales_contacts",
        "raw_service_customers",
        "stg_service_customers",
        "stg_erp_invoices",
        "stg_erp_payments",
        "stg_sales_order_lines",
        "stg_service_tickets",
    ];
    // Current customer versions by the customer's first record (ids of new customers are
    // handed out in arrival order, so they may differ).
    let current = "select m.anchor, d.customer_name, d.segment, d.region, d.city, d.postcode, \
                   d.email, d.phone, cast(d.credit_limit as varchar), d.account_manager_id \
                   from dim_customer d join (select customer_id, min(source || ':' || source_id) \
                   as anchor from map_customer_identity group by customer_id) m \
                   on d.customer_id = m.customer_id where d.is_current";
    let members = "select customer_id, string_agg(source || ':' || source_id, ',' order by \
                   source, source_id) from map_customer_identity group by customer_id";
    let same = |label: &str| {
        for table in raw_and_staged {
            let sql = format!("select * from {table}");
            assert_eq!(
                sorted_rows(&daily, &sql),
                sorted_rows(&weekly, &sql),
                "{table} differs {label}"
            );
        }
        let groups = |p: &Project| -> Vec<String> {
            let mut g: Vec<String> = p.query(members).into_iter().map(|r| r[1].clone()).collect();
            g.sort();
            g
        };
        assert_eq!(groups(&daily), groups(&weekly), "customers differ {label}");
        assert_eq!(
            sorted_rows(&daily, current),
            sorted_rows(&weekly, current),
            "current customer versions differ {label}"
        );
        assert_eq!(
            fact_sales_totals(&daily),
            fact_sales_totals(&weekly),
            "{label}"
        );
    };
    same("after one run of three days");
    let limit = format!(
        "select cast(credit_limit as varchar) from stg_erp_customers where erp_customer_id = '{planted}'"
    );
    assert_eq!(weekly.query(&limit), vec![vec!["999000.00".to_string()]]);
    // Day-1 customers with a change on any day have a new version either way (one per day
    // day by day, the latest in the one run).
    let versioned = "select customer_id from dim_customer group by customer_id \
                     having count(*) > 1";
    assert!(!sorted_rows(&daily, versioned).is_empty());
    assert_eq!(
        sorted_rows(&daily, versioned),
        sorted_rows(&weekly, versioned)
    );
    // The cubes' sales intermediates, refreshed day by day for the orders of new lines only,
    // hold what building them whole gives.
    let rebuilt = daily.copied();
    rebuilt.ok(&["run", "cubes", "--full-refresh"]);
    for table in [
        "int_sales_order_category",
        "int_sales_order",
        "cube_sales_rollup",
    ] {
        let sql = format!("select * from {table}");
        let rows = sorted_rows(&daily, &sql);
        assert!(rows.len() > 10, "{table}: {rows:?}");
        assert_eq!(rows, sorted_rows(&rebuilt, &sql), "{table} differs");
    }
    // A full refresh loads every day's files again: a changed customer keeps its last row.
    weekly.ok(&["run", "--full-refresh"]);
    same("after a full refresh");
}

fn truth_csv_in(dir: &Path, name: &str) -> Vec<HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(dir.join("truth").join(name)).unwrap();
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|r| {
            headers
                .iter()
                .zip(r.unwrap().iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn validate_accepts_the_demo_project() {
    let p = Project::demo();
    let out = p.ok(&["validate"]);
    assert!(out.starts_with("ok: 6 pipelines"), "{out}");
    let _ = truth_csv("files_0001.csv");
}
