//! PostgreSQL tables as sources, against a real server (`.ci/postgres start` runs one and
//! exports KBCRM_TEST_PG_URL and KBCRM_TEST_PG_CA): the ERP pipeline pulled from the database
//! the generator filled, incremental reads of updates and inserts, deletes, types, TLS, parallel
//! key ranges, and the errors a user meets.

use tokio_postgres::NoTls;

use crate::support::{Project, may_skip, repo, run_in, run_with_env, stderr, stdout};

/// A database of its own for one test on the test server.
struct Db {
    /// URL of the database (as the admin user, no TLS).
    url: String,
    /// Admin URL (database `postgres`).
    admin: String,
    name: String,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn with_db(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("KBCRM_TEST_PG_URL is a URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

impl Db {
    /// A fresh database, or `None` (a printed reason) when no test server is configured.
    fn new(name: &str) -> Option<Db> {
        let Ok(admin) = std::env::var("KBCRM_TEST_PG_URL") else {
            may_skip("a PostgreSQL server (eval \"$(.ci/postgres start)\" sets KBCRM_TEST_PG_URL)");
            return None;
        };
        let name = format!("kbcrm_test_{name}");
        exec(
            &admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        exec(&admin, &format!("CREATE DATABASE {name}"));
        Some(Db {
            url: with_db(&admin, &name),
            admin,
            name,
        })
    }

    fn exec(&self, sql: &str) {
        exec(&self.url, sql);
    }

    /// The first column of every row, as text.
    fn column(&self, sql: &str) -> Vec<String> {
        runtime().block_on(async {
            let (client, conn) = tokio_postgres::connect(&self.url, NoTls)
                .await
                .expect("connect to the test server");
            tokio::spawn(conn);
            client
                .simple_query(sql)
                .await
                .expect(sql)
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(r.get(0).unwrap_or("NULL").to_string())
                    }
                    _ => None,
                })
                .collect()
        })
    }

    fn value(&self, sql: &str) -> String {
        self.column(sql).remove(0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            exec(
                &self.admin,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            )
        });
    }
}

fn exec(url: &str, sql: &str) {
    runtime().block_on(async {
        let (client, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("connect to the test server");
        tokio::spawn(conn);
        client.batch_execute(sql).await.expect(sql);
    });
}

/// `kbcrm run --output json` for one pipeline: table -> (rows read, changed, skipped).
fn run_json(p: &Project, env: &[(&str, &str)]) -> Vec<(String, u64, bool, bool)> {
    let out = run_with_env(p.path(), &["run", "erp", "--output", "json", "-v"], env);
    // The run's log, shown when the test fails.
    eprintln!("{}", stderr(&out));
    assert!(out.status.success(), "kbcrm run failed");
    let doc: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("run json");
    doc["runs"][0]["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap_or_default().to_string(),
                t["rows_read"].as_u64().unwrap_or(0),
                t["changed"].as_bool().unwrap_or(false),
                t["skipped"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn table<'a>(run: &'a [(String, u64, bool, bool)], name: &str) -> &'a (String, u64, bool, bool) {
    run.iter()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("{name} not in run report {run:?}"))
}

#[test]
fn erp_pipeline_pulls_from_postgres_incrementally_with_deletes() {
    let Some(db) = Db::new("erp") else { return };
    let p = Project::demo();
    // The generator fills the ERP database with the same data as the shared sample files.
    let gen_out = run_in(
        p.path(),
        &[
            "generate",
            "--scale",
            &crate::support::SCALE.to_string(),
            "--seed",
            "7",
            "--out",
            "gen/sources",
            "--erp-postgres",
            &db.url,
        ],
    );
    assert!(gen_out.status.success(), "{}", stderr(&gen_out));
    let printed = stdout(&gen_out);
    assert!(printed.contains("erp.invoices"), "{printed}");
    assert!(!printed.contains(&db.url), "the URL must not be printed");
    // The same figures as the file-based pipeline loads from the same generated files.
    let files = Project::demo();
    files.ok(&["run", "erp"]);
    let figures = |p: &Project, t: &str, col: &str| {
        p.query(&format!(
            "select cast(count(*) as varchar) || ' ' || cast(sum({col}) as varchar) \
             from raw_erp_{t}"
        ))[0][0]
            .clone()
    };
    let db_invoices: u64 = db
        .value("select count(*) from erp.invoices")
        .parse()
        .unwrap();

    std::fs::copy(
        repo().join("examples/postgres/erp.yaml"),
        p.path().join("pipelines/erp.yaml"),
    )
    .expect("copy pipeline");
    let env = [("ERP_DATABASE_URL", db.url.as_str())];
    // First run: everything.
    let run1 = run_json(&p, &env);
    assert_eq!(table(&run1, "raw_erp_invoices").1, db_invoices);
    for (t, col) in [
        ("invoices", "amount"),
        ("payments", "amount"),
        ("customers", "credit_limit"),
    ] {
        let want = db.value(&format!(
            "select count(*)::text || ' ' || sum({col})::text from erp.{t}"
        ));
        assert_eq!(figures(&p, t, col), want, "{t}: warehouse vs database");
        assert_eq!(figures(&files, t, col), want, "{t}: database vs files");
    }
    // The rest of the project builds on it as on the files.
    p.ok_with_env(&["run"], &env);
    assert!(p.scalar("select count(*) from fact_invoice") > 0);

    // At the source: one customer changes, one invoice is added, one customer is deleted.
    let ids = db.column("select erp_customer_id from erp.customers order by 1 limit 2");
    let (changed, deleted) = (&ids[0], &ids[1]);
    // The watermarks kbcrm keeps: the newest modification time of each table.
    let watermark = |t: &str| db.value(&format!("select max(modified_at)::text from erp.{t}"));
    let (wm_customers, wm_invoices) = (watermark("customers"), watermark("invoices"));
    db.exec(&format!(
        "update erp.customers set city = 'Neustadt', modified_at = now() \
           where erp_customer_id = '{changed}';
         insert into erp.invoices values ('INV-NEW-1', '{changed}', null, '2026-01-05', \
           '2026-02-04', 123.45, 'EUR', now());
         delete from erp.customers where erp_customer_id = '{deleted}'"
    ));
    let run2 = run_json(&p, &env);
    // What the run must read: the rows modified after the watermark less the overlap
    // (10 minutes), which are the changes and the few rows modified just before.
    let due = |t: &str, wm: &str| -> u64 {
        db.value(&format!(
            "select count(*) from erp.{t} where modified_at > '{wm}'::timestamptz - interval '10 minutes'"
        ))
        .parse()
        .unwrap()
    };
    let customers_due = due("customers", &wm_customers);
    let customers: u64 = db
        .value("select count(*) from erp.customers")
        .parse()
        .unwrap();
    assert!(
        customers_due * 4 < customers,
        "the generator spreads modification times: {customers_due} of {customers} due"
    );
    assert_eq!(
        table(&run2, "raw_erp_customers").1,
        customers_due,
        "{run2:?}"
    );
    assert_eq!(
        table(&run2, "raw_erp_invoices").1,
        due("invoices", &wm_invoices),
        "{run2:?}"
    );
    assert!(
        !table(&run2, "raw_erp_payments").2,
        "payments: nothing changed {run2:?}"
    );
    assert_eq!(
        p.query(&format!(
            "select city from raw_erp_customers where erp_customer_id = '{changed}'"
        )),
        vec![vec!["Neustadt".to_string()]]
    );
    assert_eq!(
        p.scalar("select count(*) from raw_erp_invoices where invoice_id = 'INV-NEW-1'"),
        1
    );
    // Keys are compared at most once a day: the delete is not seen yet.
    assert_eq!(
        p.scalar(&format!(
            "select count(*) from raw_erp_customers where erp_customer_id = '{deleted}' \
             and _deleted_at is null"
        )),
        1
    );
    let yaml = std::fs::read_to_string(p.path().join("pipelines/erp.yaml")).unwrap();
    p.write(
        "pipelines/erp.yaml",
        yaml.replace("compare_keys: 1d", "compare_keys: always"),
    );
    let run3 = run_json(&p, &env);
    assert!(table(&run3, "raw_erp_customers").2, "{run3:?}");
    assert_eq!(
        p.scalar(&format!(
            "select count(*) from raw_erp_customers where erp_customer_id = '{deleted}' \
             and _deleted_at is not null"
        )),
        1
    );
    assert_eq!(
        p.scalar("select count(*) from raw_erp_customers where _deleted_at is not null"),
        1
    );
    // Nothing new: nothing committed, though the overlap re-reads the recent change.
    let before = p.warehouse_files();
    let run4 = run_json(&p, &env);
    assert!(run4.iter().all(|t| !t.2), "{run4:?}");
    assert_eq!(p.warehouse_files(), before);
}

const TYPES_PIPELINE: &str = "\
sources:
  things:
    format: postgres
    connection: THINGS_URL
    location: shop.things
    mode: merge
    keys: [id]
    partition: { column: id, parts: 4 }
    incremental: { cursor: changed_at }
    rejects: { max_ratio: 0.5 }
    schema:
      id: { type: bigint, required: true }
      small: int
      qty: int
      price: decimal(12,3)
      ratio: double
      name: { type: string, required: true }
      code: string
      active: bool
      born: date
      seen: timestamp
      changed_at: timestamp
      ref: string
      doc: json
      docb: string
  flags:
    format: postgres
    connection: { file: secrets/things.url }
    query: select id, label, removed, removed_on from shop.flags
    mode: merge
    keys: [id]
    deletes: { soft_column: removed_on }
    schema:
      id: { type: int, required: true }
      label: string
      removed: bool
      removed_on: timestamp
";

#[test]
fn postgres_types_partitions_tls_quarantine_and_soft_deletes() {
    let Some(db) = Db::new("types") else { return };
    db.exec(
        "create schema shop;
         create table shop.things (
           id bigint primary key, small smallint, qty integer, price numeric(12,3),
           ratio double precision, name varchar(40), code char(3), active boolean, born date,
           seen timestamp, changed_at timestamptz, ref uuid, doc json, docb jsonb);
         insert into shop.things
           select g, (g % 100)::smallint, g * 3, (g * 1.125)::numeric(12,3), g / 8.0,
                  'thing ' || g, 'C' || (g % 10), g % 2 = 0, date '2020-01-01' + g,
                  timestamp '2024-03-01 10:00:00' + g * interval '1 minute',
                  timestamptz '2025-01-01 00:00:00+00' + g * interval '1 second',
                  md5(g::text)::uuid, json_build_object('g', g), jsonb_build_object('h', g)
           from generate_series(1, 5000) g;
         update shop.things set small = null, code = null, ref = null where id % 7 = 0;
         update shop.things set name = null where id = 11;
         update shop.things set price = 'NaN' where id = 12;
         update shop.things set born = 'infinity' where id = 13;
         create table shop.flags (id int primary key, label text, removed bool, removed_on timestamptz);
         insert into shop.flags values (1, 'a', false, null), (2, 'b', true, '2025-06-01 08:00:00+00');",
    );
    let p = Project::empty();
    p.write("pipelines/shop.yaml", TYPES_PIPELINE);
    let ca = std::env::var("KBCRM_TEST_PG_CA").expect("KBCRM_TEST_PG_CA (from .ci/postgres)");
    let tls_url = format!("{}?sslmode=verify-full&sslrootcert={ca}", db.url);
    p.write("secrets/things.url", format!("{tls_url}\n"));
    let env = [("THINGS_URL", tls_url.as_str())];
    p.ok_with_env(&["run"], &env);

    // Three rows rejected with their reasons; the rest loaded, value for value.
    let rejects = p.query("select line, column_name, reason, raw from quarantine order by raw");
    assert_eq!(rejects.len(), 3, "{rejects:?}");
    let reasons: Vec<String> = rejects.iter().map(|r| r[2].clone()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("missing required value in column 'name'"))
    );
    assert!(reasons.iter().any(|r| r.contains("NaN")));
    assert!(reasons.iter().any(|r| r.contains("infinite date")));
    assert!(rejects.iter().any(|r| r[3] == "id=11"), "{rejects:?}");
    let expect = db.value(
        "select count(*) || '|' || sum(id) || '|' || sum(small) || '|' || sum(qty) || '|' || \
         sum(price) || '|' || count(code) || '|' || sum(active::int) || '|' || \
         min(born) || '|' || max(seen) || '|' || count(ref) \
         from shop.things where id not in (11, 12, 13)",
    );
    let got = p.query(
        "select cast(count(*) as varchar) || '|' || cast(sum(id) as varchar) || '|' || \
         cast(sum(small) as varchar) || '|' || cast(sum(qty) as varchar) || '|' || \
         cast(sum(price) as varchar) || '|' || cast(count(code) as varchar) || '|' || \
         cast(sum(cast(active as int)) as varchar) || '|' || cast(min(born) as varchar) || '|' || \
         to_char(max(seen), '%Y-%m-%d %H:%M:%S') || '|' || cast(count(ref) as varchar) \
         from raw_shop_things",
    );
    assert_eq!(got[0][0], expect);
    let row = p.query(
        "select ratio, name, code, ref, doc, docb, to_char(changed_at, '%Y-%m-%dT%H:%M:%S') \
         from raw_shop_things where id = 8",
    );
    let want_ref = db.value("select ref::text from shop.things where id = 8");
    assert_eq!(
        row[0],
        vec![
            "1.0".to_string(),
            "thing 8".into(),
            "C8 ".into(),
            want_ref,
            "{\"g\" : 8}".into(),
            "{\"h\": 8}".into(),
            "2025-01-01T00:00:08".into()
        ]
    );
    // Soft deletes: the removed row carries its removal time.
    assert_eq!(
        p.query(
            "select id, to_char(_deleted_at, '%Y-%m-%d %H:%M') from raw_shop_flags order by id"
        ),
        vec![
            vec!["1".to_string(), String::new()],
            vec!["2".to_string(), "2025-06-01 08:00".to_string()]
        ]
    );

    // Incremental with partitions: a change and a new row, nothing else read.
    db.exec(
        "update shop.things set qty = -1, changed_at = now() where id = 4000;
         insert into shop.things (id, name, changed_at) values (9000, 'new', now());",
    );
    let out = p.ok_with_env(&["run", "--output", "json"], &env);
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let things = doc["runs"][0]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "raw_shop_things")
        .cloned()
        .unwrap();
    assert_eq!(things["rows_read"], 2, "{things}");
    assert_eq!(
        p.scalar("select qty from raw_shop_things where id = 4000"),
        -1
    );
    assert_eq!(p.scalar("select count(*) from raw_shop_things"), 4998);

    // verify-full without the CA: the server's certificate is not trusted; a clear error,
    // nothing written.
    let untrusted = format!("{}?sslmode=verify-full", db.url);
    p.fails_cleanly(
        &["run"],
        &[("THINGS_URL", untrusted.as_str())],
        &["sslrootcert"],
        &[],
    );
}

const SMALL_PIPELINE: &str = "\
sources:
  items:
    format: postgres
    connection: ITEMS_URL
    location: public.items
    schema:
      id: { type: int, required: true }
      amount: decimal(10,2)
";

#[test]
fn postgres_errors_are_clear_and_commit_nothing() {
    let Some(db) = Db::new("errors") else { return };
    db.exec(
        "create table items (id int primary key, amount numeric(10,2), label text);
         insert into items values (1, 2.50, 'x'), (2, null, 'y');
         do $$ begin create role kbcrm_reader login password 'right-secret';
           exception when duplicate_object then
             alter role kbcrm_reader login password 'right-secret'; end $$;
         grant select on items to kbcrm_reader;",
    );
    let p = Project::empty();
    p.write("pipelines/shop.yaml", SMALL_PIPELINE);
    let mut reader = url::Url::parse(&db.url).unwrap();
    reader.set_username("kbcrm_reader").unwrap();
    reader.set_password(Some("right-secret")).unwrap();
    let good = reader.to_string();
    p.ok_with_env(&["run"], &[("ITEMS_URL", good.as_str())]);
    assert_eq!(p.scalar("select count(*) from raw_shop_items"), 2);
    db.exec("insert into items values (3, 1.00, 'z')");

    let check = |url: &str, want: &[&str]| {
        p.fails_cleanly(
            &["run"],
            &[("ITEMS_URL", url)],
            want,
            &["wrong-secret", "right-secret"],
        )
    };
    let mut wrong = reader.clone();
    wrong.set_password(Some("wrong-secret")).unwrap();
    check(
        wrong.as_str(),
        &[
            "source 'items'",
            "password authentication failed",
            "check the user and password",
        ],
    );
    let mut unreachable = reader.clone();
    unreachable.set_port(Some(1)).unwrap();
    check(
        unreachable.as_str(),
        &["127.0.0.1:1", "is the server running"],
    );
    check(
        "mysql://x@localhost/db",
        &["ITEMS_URL is not a PostgreSQL URL"],
    );
    let out = run_with_env(p.path(), &["run"], &[]);
    assert!(stderr(&out).contains("environment variable ITEMS_URL is not set"));
    // Declared types that the database columns do not match, all named at once.
    p.write(
        "pipelines/shop.yaml",
        SMALL_PIPELINE.replace("amount: decimal(10,2)", "amount: int\n      label: date"),
    );
    check(
        &good,
        &[
            "column 'amount' is declared int but is numeric",
            "column 'label' is declared date but is text",
        ],
    );
    p.write(
        "pipelines/shop.yaml",
        SMALL_PIPELINE.replace(
            "amount: decimal(10,2)",
            "amount: decimal(10,2)\n      price: double",
        ),
    );
    check(&good, &["column \"price\" does not exist", "`source:`"]);
    // A URL in the YAML is refused before anything runs.
    p.write(
        "pipelines/shop.yaml",
        SMALL_PIPELINE.replace("connection: ITEMS_URL", "connection: postgres://u:p@h/db"),
    );
    let out = run_with_env(p.path(), &["validate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("looks like a URL"),
        "{}",
        stderr(&out)
    );
}
