//! `kbcrm serve` against real PostgreSQL clients: tokio-postgres (the rust-postgres driver) for
//! the protocol-level checks, psql and Python's psycopg / SQLAlchemy / pandas for what BI users
//! run. Every expected value is computed from the fixture's CSV text, not from the server.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::support::{Project, have, may_skip, stderr, stdout};

const CUSTOMERS: &str = "customer_id,name,email,region,credit_limit\n\
C1,Anna Berg,anna@example.com,North,1000.50\n\
C2,Bo Lind,bo@example.com,South,250.00\n\
C3,Cleo Holm,,North,0.00\n\
C4,Dan Ek,dan@example.com,West,99.99\n";

const SALES: &str = "order_id,customer_id,order_date,amount,paid\n\
O1,C1,2025-01-05,100.25,true\n\
O2,C1,2025-02-05,50.75,false\n\
O3,C2,2025-01-09,10.00,true\n\
O4,C3,2025-03-01,7.50,true\n\
O5,C4,2025-03-02,1.25,false\n";

const PIPELINE: &str = "\
sources:
  customers:
    format: csv
    location: data/customers.csv
    schema: { customer_id: string, name: string, email: string, region: string, credit_limit: \"decimal(12,2)\" }
  sales:
    format: csv
    location: data/sales.csv
    schema: { order_id: string, customer_id: string, order_date: date, amount: double, paid: bool }
  secrets:
    format: csv
    location: data/secrets.csv
    schema: { k: string, v: string }
models:
  - path: sql/customers.sql
  - path: sql/sales.sql
  - path: sql/secrets.sql
";

const PROJECT: &str = "\
name: served
serve:
  statement_timeout: 30s
  max_connections: 4
  refresh_interval: 300ms
pii:
  customers: [name, email]
roles:
  admin: { tables: [\"*\"], pii: true }
  analyst: { tables: [customers, sales] }
  north:
    tables: [customers, sales]
    row_filter:
      customers: \"region = 'North'\"
      sales: \"customer_id in (select customer_id from customers where region = 'North')\"
";

fn add_user(p: &Project, name: &str, role: &str, password: &str) {
    add_user_with_env(p, name, role, password, &[]);
}

/// `kbcrm user add` with extra environment variables.
pub(crate) fn add_user_with_env(
    p: &Project,
    name: &str,
    role: &str,
    password: &str,
    env: &[(&str, &str)],
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kbcrm"))
        .args(["user", "add", name, "--role", role, "--password-stdin"])
        .envs(env.iter().copied())
        .current_dir(p.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kbcrm runs");
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "user add: {}", stderr(&out));
}

/// A project with three tables, three roles and three users, built and ready to serve;
/// `serve_extra` are more lines of the `serve:` block.
pub(crate) fn project(serve_extra: &str) -> Project {
    let p = Project::empty();
    p.write(
        "kbcrm.yaml",
        PROJECT.replace(
            "  refresh_interval: 300ms\n",
            &format!("  refresh_interval: 300ms\n{serve_extra}"),
        ),
    );
    p.write("pipelines/p.yaml", PIPELINE);
    p.write("sql/customers.sql", "select * from raw_p_customers\n");
    p.write("sql/sales.sql", "select * from raw_p_sales\n");
    p.write("sql/secrets.sql", "select * from raw_p_secrets\n");
    p.write("data/customers.csv", CUSTOMERS);
    p.write("data/sales.csv", SALES);
    p.write("data/secrets.csv", "k,v\nroot,hunter2\n");
    p.ok(&["run"]);
    add_user(&p, "ada", "admin", "ada long password");
    add_user(&p, "ann", "analyst", "ann-pw-2025");
    add_user(&p, "nils", "north", "nils pw");
    p
}

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn serve(p: &Project) -> Server {
    serve_with_env(p, &[])
}

/// `kbcrm serve` on a free port with extra environment variables.
pub(crate) fn serve_with_env(p: &Project, env: &[(&str, &str)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kbcrm"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .current_dir(p.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kbcrm serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Server { child, port }
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) async fn connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} password='{password}' dbname=kbcrm"),
        NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The error of a call that must fail.
pub(crate) fn refused<T>(r: Result<T, tokio_postgres::Error>, what: &str) -> tokio_postgres::Error {
    match r {
        Ok(_) => panic!("{what}: accepted, expected an error"),
        Err(e) => e,
    }
}

pub(crate) fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

pub(crate) fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

/// Two billion rows, streamed as the client reads them (extended protocol).
pub(crate) async fn endless_rows(c: &Client) -> tokio_postgres::RowStream {
    c.query_raw(
        "select * from generate_series(1, 2000000000) as t(n)",
        Vec::<String>::new(),
    )
    .await
    .expect("the query starts")
}

pub(crate) async fn texts(c: &Client, sql: &str) -> Vec<Vec<String>> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// On a Ballista cluster, every role sees what it sees on the local server: the same tables,
/// PII masked, rows filtered, hidden tables refused.
#[test]
fn roles_see_the_same_rows_on_a_ballista_cluster() {
    let p = project("");
    let local = serve(&p);
    let cluster = serve_with_env(&p, &[("KBCRM_ENGINE", "ballista")]);
    let queries = [
        "select customer_id, name, email, region, credit_limit from customers order by 1",
        "select order_id, customer_id, order_date, amount, paid from sales order by 1",
        "select c.region, sum(s.amount), count(*) from sales s join customers c \
         using (customer_id) group by c.region order by 1",
        "with big as (select * from sales where amount > 5) \
         select count(*), max(customer_id) from big",
    ];
    rt().block_on(async {
        for (user, password) in [
            ("ada", "ada long password"),
            ("ann", "ann-pw-2025"),
            ("nils", "nils pw"),
        ] {
            let l = connect(local.port, user, password).await.expect("local");
            let c = connect(cluster.port, user, password)
                .await
                .expect("cluster");
            for sql in queries {
                let want = texts(&l, sql).await;
                assert!(!want.is_empty(), "{user}: {sql}");
                assert_eq!(texts(&c, sql).await, want, "{user}: {sql}");
                let plan = format!("{:?}", texts(&c, &format!("explain {sql}")).await);
                assert!(
                    plan.contains("DistributedQueryExec") || plan.contains("distributed_plan"),
                    "{user} on the cluster: {plan}"
                );
            }
            let secrets = "select k, v from secrets";
            if user == "ada" {
                assert_eq!(texts(&c, secrets).await, [["root", "hunter2"]]);
            } else {
                let e = refused(c.simple_query(secrets).await, "secrets");
                assert_eq!(code(&e), "42501", "{user}: {e}");
            }
        }
    });
}

#[test]
fn logins_need_the_right_password_and_fail_alike() {
    let p = project("");
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    assert!(yaml.contains("ann: { role: analyst, scram: \"SCRAM-SHA-256$4096:"));
    assert!(
        !yaml.contains("ann-pw-2025"),
        "a password reached kbcrm.yaml"
    );
    // Unknown role: nothing written.
    let out = p.kbcrm(&["user", "add", "eve", "--role", "root", "--password-stdin"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stderr(&out).contains("no role 'root'"), "{}", stderr(&out));

    let s = serve(&p);
    rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025").await.expect("login");
        assert_eq!(texts(&c, "select 1 + 1").await, vec![vec!["2"]]);
        for (user, pw) in [("ann", "wrong"), ("nobody", "ann-pw-2025"), ("ann", "")] {
            let e = refused(connect(s.port, user, pw).await, "refused");
            assert_eq!(code(&e), "28P01", "{user}/{pw}: {e}");
        }
        // A failed login takes as long for an unknown user as for a wrong password.
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for _ in 0..9 {
            let t = Instant::now();
            assert!(connect(s.port, "ann", "nope").await.is_err());
            known.push(t.elapsed());
            let t = Instant::now();
            assert!(connect(s.port, "ghost", "nope").await.is_err());
            unknown.push(t.elapsed());
        }
        known.sort();
        unknown.sort();
        let ratio = known[4].as_secs_f64() / unknown[4].as_secs_f64();
        assert!(
            (0.5..2.0).contains(&ratio),
            "median failed login {:?} (user exists) vs {:?} (unknown)",
            known[4],
            unknown[4]
        );
    });
}

#[test]
fn roles_see_only_their_tables_masked_and_filtered() {
    let p = project("");
    let s = serve(&p);
    rt().block_on(async {
        let ann = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        // Every way of reaching the ungranted table is refused.
        for sql in [
            "select * from secrets",
            "select * from customers c join secrets s on c.customer_id = s.k",
            "select * from customers where customer_id in (select k from secrets)",
            "with s as (select * from secrets) select * from s",
            "select * from public.secrets",
            "explain select * from secrets",
        ] {
            let e = refused(ann.simple_query(sql).await, sql);
            assert_eq!(code(&e), "42501", "{sql}: {e}");
            let e = refused(ann.query(sql, &[]).await, sql);
            assert_eq!(code(&e), "42501", "extended {sql}: {e}");
        }
        // ... and hidden from the catalog listings.
        for sql in [
            "select table_name from information_schema.tables where table_schema = 'public' order by 1",
            "select relname from pg_catalog.pg_class c join pg_catalog.pg_namespace n on c.relnamespace = n.oid where n.nspname = 'public' order by 1",
            "select tablename from pg_catalog.pg_tables where schemaname = 'public' order by 1",
        ] {
            assert_eq!(
                texts(&ann, sql).await,
                vec![vec!["customers"], vec!["sales"]],
                "{sql}"
            );
        }
        // PII masked for the analyst, clear for the admin.
        let masked = texts(&ann, "select customer_id, name, email, region from customers order by 1").await;
        assert_eq!(masked[0], vec!["C1", "***", "***", "North"]);
        assert_eq!(masked[2], vec!["C3", "***", "NULL", "North"]);
        let ada = connect(s.port, "ada", "ada long password").await.unwrap();
        let clear = texts(&ada, "select name, email from customers where customer_id = 'C1'").await;
        assert_eq!(clear, vec![vec!["Anna Berg", "anna@example.com"]]);
        assert_eq!(texts(&ada, "select v from secrets").await, vec![vec!["hunter2"]]);

        // The northern manager sees northern customers and their sales only.
        let nils = connect(s.port, "nils", "nils pw").await.unwrap();
        let expected_total: f64 = SALES
            .lines()
            .skip(1)
            .filter(|l| l.contains(",C1,") || l.contains(",C3,"))
            .map(|l| l.split(',').nth(3).unwrap().parse::<f64>().unwrap())
            .sum();
        let got = texts(&nils, "select count(*), sum(amount) from sales").await;
        assert_eq!(got, vec![vec!["3".to_string(), format!("{expected_total}")]]);
        assert_eq!(
            texts(&nils, "select customer_id from customers order by 1").await,
            vec![vec!["C1"], vec!["C3"]]
        );
        // Typed results on the extended protocol.
        let row = ann
            .query_one(
                "select credit_limit, order_date, amount, paid, count(*) over () as n \
                 from customers c join sales s using (customer_id) where order_id = $1",
                &[&"O1"],
            )
            .await
            .unwrap();
        assert_eq!(row.columns()[0].type_(), &tokio_postgres::types::Type::NUMERIC);
        assert_eq!(row.get::<_, chrono::NaiveDate>(1).to_string(), "2025-01-05");
        assert_eq!(row.get::<_, f64>(2), 100.25);
        assert!(row.get::<_, bool>(3));
        assert_eq!(row.get::<_, i64>(4), 1);
    });
}

#[test]
fn the_server_is_read_only_and_settings_stay_in_their_session() {
    let p = project("");
    let s = serve(&p);
    rt().block_on(async {
        let a = connect(s.port, "ada", "ada long password").await.unwrap();
        for (sql, expected) in [
            ("insert into sales values ('O9', 'C1', '2025-01-01', 1.0, true)", "25006"),
            ("update sales set amount = 0", "25006"),
            ("delete from sales", "25006"),
            ("create table t as select 1", "25006"),
            ("create view v as select * from sales", "25006"),
            ("drop table sales", "25006"),
            ("copy sales to '/tmp/sales.csv'", "42501"),
            ("create external table x stored as csv location '/etc/passwd'", "42601"),
            ("select * from read_csv('/etc/passwd')", "42501"),
            ("set datafusion.execution.batch_size = 1", "42501"),
            ("set datafusion.runtime.memory_limit = '100G'", "42501"),
        ] {
            let e = refused(a.simple_query(sql).await, sql);
            assert_eq!(code(&e), expected, "{sql}: {e}");
        }
        assert_eq!(texts(&a, "select count(*) from sales").await, vec![vec!["5"]]);

        let b = connect(s.port, "ada", "ada long password").await.unwrap();
        a.batch_execute("set application_name = 'report-a'; set statement_timeout = '2s'; set datestyle = 'ISO, DMY'")
            .await
            .unwrap();
        assert_eq!(texts(&a, "show application_name").await, vec![vec!["report-a"]]);
        let other = texts(&b, "show application_name").await;
        assert_ne!(other, vec![vec!["report-a"]], "a SET leaked into another session");
    });
}

#[test]
fn timeouts_cancel_and_the_connection_limit() {
    let p = project("");
    let s = serve(&p);
    rt().block_on(async {
        use futures::StreamExt;
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        c.batch_execute("set statement_timeout = '1500ms'")
            .await
            .unwrap();
        // Rows start at once; the timeout ends the stream part-way.
        let started = Instant::now();
        let stream = c
            .query_raw(
                "select * from generate_series(1, 2000000000) as t(n)",
                Vec::<String>::new(),
            )
            .await
            .expect("the query starts");
        futures::pin_mut!(stream);
        let mut rows = 0u64;
        let err = loop {
            match stream.next().await {
                Some(Ok(_)) => rows += 1,
                Some(Err(e)) => break e,
                None => panic!("two billion rows arrived within the timeout"),
            }
        };
        assert!(rows > 0, "no rows streamed before the timeout: {err:?}");
        assert_eq!(code(&err), "57014", "{err}");
        assert!(message(&err).contains("statement timeout"), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(15));
        // The connection is still usable; SET statement_timeout = 0 keeps the server's limit
        // (30 s, longer than the rest of this test).
        assert_eq!(texts(&c, "select 7").await, vec![vec!["7"]]);

        // Cancel from another connection while rows stream.
        c.batch_execute("set statement_timeout = 0").await.unwrap();
        let token = c.cancel_token();
        let stream = c
            .query_raw(
                "select * from generate_series(1, 2000000000) as t(n)",
                Vec::<String>::new(),
            )
            .await
            .unwrap();
        futures::pin_mut!(stream);
        let mut rows = 0u64;
        let err = loop {
            match stream.next().await {
                Some(Ok(_)) => {
                    rows += 1;
                    if rows == 1000 {
                        token.cancel_query(NoTls).await.unwrap();
                    }
                }
                Some(Err(e)) => break e,
                None => panic!("not cancelled"),
            }
        };
        assert_eq!(code(&err), "57014", "{err}");
        assert!(message(&err).contains("user request"), "{err:?}");
        assert_eq!(texts(&c, "select 8").await, vec![vec!["8"]]);

        // max_connections: 4 in the fixture; this is the second open connection.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(connect(s.port, "ann", "ann-pw-2025").await.unwrap());
        }
        let e = refused(
            connect(s.port, "ann", "ann-pw-2025").await,
            "a fifth connection",
        );
        assert_eq!(code(&e), "53300", "{e}");
        drop(held);
        let mut ok = false;
        for _ in 0..50 {
            if connect(s.port, "ann", "ann-pw-2025").await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "a slot did not come free after clients left");
    });
}

#[test]
fn new_table_versions_and_users_are_served_without_a_restart() {
    let p = project("");
    let s = serve(&p);
    async fn count(c: &Client) -> String {
        texts(c, "select count(*) from sales").await[0][0].clone()
    }
    let runtime = rt();
    let c = runtime
        .block_on(connect(s.port, "ada", "ada long password"))
        .unwrap();
    assert_eq!(runtime.block_on(count(&c)), "5");
    p.write(
        "data/sales.csv",
        format!("{SALES}O6,C2,2025-04-01,3.00,true\n"),
    );
    p.ok(&["run"]);
    let mut seen = String::new();
    for _ in 0..100 {
        seen = runtime.block_on(count(&c));
        if seen == "6" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, "6", "the server still answers from the old version");
    // The run history is served to roles granted it, as it is at each query.
    let runs = || runtime.block_on(texts(&c, "select count(*) from kbcrm_runs"))[0][0].clone();
    let before = runs();
    assert!(before.parse::<u32>().unwrap() >= 2, "{before}");
    p.ok(&["run"]);
    assert_eq!(
        runs().parse::<u32>().unwrap(),
        before.parse::<u32>().unwrap() + 1
    );
    let ann = runtime
        .block_on(connect(s.port, "ann", "ann-pw-2025"))
        .unwrap();
    let e = refused(
        runtime.block_on(ann.simple_query("select * from kbcrm_runs")),
        "the analyst reading kbcrm_runs",
    );
    assert_eq!(code(&e), "42501");
    // A user added while the server runs can log in without a restart.
    add_user(&p, "late", "analyst", "late-pw");
    let mut logged_in = false;
    for _ in 0..100 {
        if runtime.block_on(connect(s.port, "late", "late-pw")).is_ok() {
            logged_in = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(logged_in, "a user added by `kbcrm user add` cannot log in");
}

pub(crate) fn psql(
    port: u16,
    user: &str,
    password: &str,
    extra: &str,
    sql: &str,
) -> std::process::Output {
    Command::new("psql")
        .args([
            &format!("host=127.0.0.1 port={port} user={user} dbname=kbcrm {extra}"),
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs")
}

#[test]
fn psql_lists_and_describes_tables() {
    if !have("psql", "--version") && may_skip("psql") {
        return;
    }
    let p = project("");
    let s = serve(&p);
    let out = psql(s.port, "ann", "ann-pw-2025", "", "\\dt");
    assert!(out.status.success(), "{}", stderr(&out));
    let listing = stdout(&out);
    assert!(
        listing.contains("customers") && listing.contains("sales"),
        "{listing}"
    );
    assert!(!listing.contains("secrets"), "{listing}");
    let out = psql(s.port, "ann", "ann-pw-2025", "", "\\d customers");
    assert!(out.status.success(), "{}", stderr(&out));
    let d = stdout(&out);
    assert!(
        d.contains("customer_id") && d.contains("credit_limit"),
        "{d}"
    );
    let out = psql(s.port, "ann", "ann-pw-2025", "", "\\dn");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("public"), "{}", stdout(&out));
    let out = psql(s.port, "ann", "wrong", "", "select 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tls_is_used_when_configured_and_required() {
    if !have("psql", "--version") && may_skip("psql") {
        return;
    }
    if !have("openssl", "version") && may_skip("openssl") {
        return;
    }
    let p = project("  tls: { cert: tls/server.crt, key: tls/server.key }\n  require_tls: true\n");
    // A missing certificate stops the server at start.
    let out = p.kbcrm(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stderr(&out).contains("server.crt"), "{}", stderr(&out));
    std::fs::create_dir_all(p.path().join("tls")).unwrap();
    let keygen = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "tls/server.key",
            "-out",
            "tls/server.crt",
        ])
        .current_dir(p.path())
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", stderr(&keygen));
    let s = serve(&p);
    let out = psql(
        s.port,
        "ann",
        "ann-pw-2025",
        "sslmode=require",
        "select 'over tls'",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "over tls");
    let out = psql(s.port, "ann", "ann-pw-2025", "sslmode=disable", "select 1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("only TLS"), "{}", stderr(&out));
}

#[test]
fn python_clients_psycopg_sqlalchemy_pandas() {
    let probe = Command::new("python3")
        .args(["-c", "import psycopg, sqlalchemy, pandas"])
        .output();
    if !probe.is_ok_and(|o| o.status.success())
        && may_skip("python3 with psycopg, sqlalchemy, pandas")
    {
        return;
    }
    let p = project("");
    let s = serve(&p);
    let script = crate::support::repo().join("tests/it/clients/python_clients.py");
    let out = Command::new("python3")
        .arg(script)
        .env("KBCRM_PORT", s.port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python clients failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("all python client checks passed"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn jdbc_metadata_and_prepared_queries() {
    let jar =
        std::env::var("KBCRM_PGJDBC").unwrap_or_else(|_| "/usr/share/java/postgresql.jar".into());
    if (!have("java", "-version") || !std::path::Path::new(&jar).exists())
        && may_skip("java and the PostgreSQL JDBC driver")
    {
        return;
    }
    let p = project("");
    let s = serve(&p);
    let source = crate::support::repo().join("tests/it/clients/JdbcClient.java");
    let out = Command::new("java")
        .args(["-cp", &jar])
        .arg(source)
        .args([&s.port.to_string(), "ann", "ann-pw-2025", "customers,sales"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "jdbc client failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("all jdbc checks passed"),
        "{}",
        stdout(&out)
    );
}

/// What Grafana's PostgreSQL data source sends to fill its table picker, as it sends it.
const GRAFANA_TABLES: &str = r#"SELECT
        CASE WHEN
              quote_ident(table_schema) IN (
              SELECT
                CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
              FROM
                generate_series(
                  array_lower(string_to_array(current_setting('search_path'),','),1),
                  array_upper(string_to_array(current_setting('search_path'),','),1)
                ) as i,
                string_to_array(current_setting('search_path'),',') s
              )
          THEN quote_ident(table_name)
          ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
        END AS "table"
        FROM information_schema.tables
        WHERE quote_ident(table_schema) NOT IN ('information_schema',
                                 'pg_catalog',
                                 '_timescaledb_cache',
                                 '_timescaledb_catalog',
                                 '_timescaledb_internal',
                                 '_timescaledb_config',
                                 'timescaledb_information',
                                 'timescaledb_experimental')
        ORDER BY CASE WHEN
              quote_ident(table_schema) IN (
              SELECT
                CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
              FROM
                generate_series(
                  array_lower(string_to_array(current_setting('search_path'),','),1),
                  array_upper(string_to_array(current_setting('search_path'),','),1)
                ) as i,
                string_to_array(current_setting('search_path'),',') s
              ) THEN 0 ELSE 1 END, 1"#;

const GRAFANA_COLUMNS: &str = r#"SELECT quote_ident(column_name) AS "column", data_type AS "type"
  FROM information_schema.columns
  WHERE CASE WHEN array_length(parse_ident('public.sales'),1) = 2
    THEN quote_ident(table_schema) = (parse_ident('public.sales'))[1]
      AND quote_ident(table_name) = (parse_ident('public.sales'))[2]
    ELSE quote_ident(table_name) = 'public.sales' END"#;

/// Metabase's connection set-up and table sync (its JDBC metadata calls are covered by the
/// JDBC test).
const METABASE: &[&str] = &[
    "SET extra_float_digits = 2",
    "SET application_name = 'Metabase v0.55.1'",
    "SHOW TRANSACTION ISOLATION LEVEL",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ UNCOMMITTED",
    r#"SELECT nspname AS "TABLE_SCHEM", current_database() AS "TABLE_CATALOG" FROM pg_catalog.pg_namespace WHERE nspname <> 'pg_toast' AND (nspname !~ '^pg_temp_' OR nspname = (pg_catalog.current_schemas(true))[1]) ORDER BY "TABLE_SCHEM""#,
    "show timezone",
];

const METABASE_TABLES: &str = r#"SELECT "n"."nspname" AS "schema", "c"."relname" AS "name",
    CASE "c"."relkind" WHEN 'r' THEN 'TABLE' WHEN 'v' THEN 'VIEW' ELSE NULL END AS "type"
  FROM "pg_catalog"."pg_class" AS "c"
  INNER JOIN "pg_catalog"."pg_namespace" AS "n" ON "c"."relnamespace" = "n"."oid"
  WHERE ("n"."nspname" !~ '^pg_') AND ("n"."nspname" <> 'information_schema')
    AND c.relkind in ('r', 'p', 'v', 'f', 'm') AND ("n"."nspname" IN ('public'))
  ORDER BY "type" ASC, "schema" ASC, "name" ASC"#;

#[test]
fn grafana_and_metabase_catalog_queries() {
    let p = project("");
    let s = serve(&p);
    rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        // The search_path lookup is not evaluated (no current_setting()), so Grafana shows
        // schema-qualified names, which it then queries as they are.
        assert_eq!(
            texts(&c, GRAFANA_TABLES).await,
            vec![vec!["public.customers"], vec!["public.sales"]]
        );
        let cols = texts(&c, GRAFANA_COLUMNS).await;
        let names: Vec<&str> = cols.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(
            names,
            ["order_id", "customer_id", "order_date", "amount", "paid"]
        );
        for sql in METABASE {
            c.simple_query(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        }
        assert_eq!(
            texts(&c, METABASE_TABLES).await,
            vec![
                vec!["public", "customers", "TABLE"],
                vec!["public", "sales", "TABLE"]
            ]
        );
    });
}

#[test]
fn a_run_half_way_through_committing_is_not_served_until_complete() {
    let p = project("");
    let s = serve(&p);
    let runtime = rt();
    let c = runtime
        .block_on(connect(s.port, "ada", "ada long password"))
        .unwrap();
    // Every table the run changes: the source tables and the models over them.
    let counts = |c: &Client| {
        runtime.block_on(async {
            let mut n = Vec::new();
            for t in ["raw_p_customers", "raw_p_sales", "customers", "sales"] {
                n.push(texts(c, &format!("select count(*) from {t}")).await[0][0].clone());
            }
            n.join(" ")
        })
    };
    assert_eq!(counts(&c), "4 5 4 5");
    p.write(
        "data/customers.csv",
        format!("{CUSTOMERS}C5,Eva Sund,,East,5.00\n"),
    );
    p.write(
        "data/sales.csv",
        format!("{SALES}O6,C5,2025-04-01,3.00,true\n"),
    );
    // The run dies after committing its first table; its manifest stays pending.
    let out = Command::new(env!("CARGO_BIN_EXE_kbcrm"))
        .arg("run")
        .current_dir(p.path())
        .env("KBCRM_CRASH_AFTER_TABLE_COMMITS", "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the crash hook did not fire");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(counts(&c), "4 5 4 5", "a half-committed run is visible");
    }
    // The next run completes the commit; the server then serves all of it.
    p.ok(&["run"]);
    let mut seen = counts(&c);
    for _ in 0..100 {
        if seen == "5 6 5 6" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        seen = counts(&c);
    }
    assert_eq!(seen, "5 6 5 6");
}

#[test]
fn the_memory_limit_applies_to_each_query() {
    let p = project("");
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        format!("{yaml}\nengine:\n  memory_limit: 64MiB\n"),
    );
    let s = serve(&p);
    let runtime = rt();
    let (a, b) = runtime.block_on(async {
        (
            connect(s.port, "ada", "ada long password").await.unwrap(),
            connect(s.port, "ada", "ada long password").await.unwrap(),
        )
    });
    // More than the limit in one query: refused with 53200, and the connection goes on.
    let e = refused(
        runtime.block_on(a.simple_query(
            "select array_length(array_agg(x), 1) from generate_series(1, 20000000) t(x)",
        )),
        "a query above the memory limit",
    );
    assert_eq!(code(&e), "53200", "{}", message(&e));
    assert_eq!(runtime.block_on(texts(&a, "select 1"))[0][0], "1");
    // Two queries of about 40 MB each at once: each has its own 64 MiB, so both finish
    // (with one pool for the server the second would be refused).
    let sql = "select array_length(array_agg(x), 1) from generate_series(1, 250000000) t(x) \
               where x % 50 = 0";
    let (ra, rb) = runtime.block_on(async { tokio::join!(texts(&a, sql), texts(&b, sql)) });
    assert_eq!(
        (ra[0][0].as_str(), rb[0][0].as_str()),
        ("5000000", "5000000")
    );
}

/// Resident memory and open file descriptors of a process, from /proc.
pub(crate) fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss_kb, fds)
}

/// Many clients at once for a while (`KBCRM_SERVE_LOAD_CLIENTS`, default 20, and
/// `KBCRM_SERVE_LOAD_SECS`, default 4; the long mode is 50 clients for 120 s): queries, prepared
/// statements, cancels and dropped connections mixed. The server must answer
/// throughout, keep no connection once the clients are gone, and end with its memory where it
/// was after the first round.
#[test]
fn many_clients_mixing_queries_cancels_and_disconnects() {
    let p = project("");
    let yaml = std::fs::read_to_string(p.path().join("kbcrm.yaml")).unwrap();
    p.write(
        "kbcrm.yaml",
        yaml.replace("max_connections: 4", "max_connections: 64"),
    );
    let s = serve(&p);
    let pid = s.child.id();
    let secs: u64 = std::env::var("KBCRM_SERVE_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let clients: u64 = std::env::var("KBCRM_SERVE_LOAD_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (idle_rss, idle_fds) = rss_and_fds(pid);
    const GROUPED: &str =
        "select region, count(*), sum(credit_limit) from customers group by region order by region";
    let expected: &'static Vec<Vec<String>> = Box::leak(Box::new(rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        texts(&c, GROUPED).await
    })));
    let round = |seconds: u64| {
        rt().block_on(async move {
            use futures::StreamExt;
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut tasks = Vec::new();
            for client in 0..clients {
                let port = s.port;
                tasks.push(tokio::spawn(async move {
                    let mut done = [0u64; 5];
                    let mut step = client;
                    while Instant::now() < deadline {
                        // Slots of connections just dropped free up when the server notices;
                        // until then it refuses with 53300, as PostgreSQL does.
                        let c = match connect(port, "ann", "ann-pw-2025").await {
                            Ok(c) => c,
                            Err(e) if code(&e) == "53300" => {
                                done[4] += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            Err(e) => panic!("login: {e}"),
                        };
                        for _ in 0..(5 + step % 7) {
                            step = step
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            match (step >> 33) % 4 {
                                0 => {
                                    let r = texts(&c, GROUPED).await;
                                    assert_eq!(r, *expected, "an answer changed under load");
                                    done[0] += 1;
                                }
                                1 => {
                                    let stmt = c
                                        .prepare("select count(*) from sales where amount > $1")
                                        .await
                                        .unwrap();
                                    let n: i64 =
                                        c.query_one(&stmt, &[&5.0f64]).await.unwrap().get(0);
                                    assert_eq!(n, 4, "amounts above 5 in the fixture");
                                    done[1] += 1;
                                }
                                2 => {
                                    // A long query cancelled part-way.
                                    let token = c.cancel_token();
                                    let stream = c
                                        .query_raw(
                                            "select * from generate_series(1, 200000) as t(n)",
                                            Vec::<String>::new(),
                                        )
                                        .await
                                        .unwrap();
                                    futures::pin_mut!(stream);
                                    let mut rows = 0;
                                    while let Some(r) = stream.next().await {
                                        if r.is_err() {
                                            break;
                                        }
                                        rows += 1;
                                        if rows == 200 {
                                            token.cancel_query(NoTls).await.unwrap();
                                        }
                                    }
                                    done[2] += 1;
                                }
                                _ => {
                                    // Walk away in the middle of a stream.
                                    let stream = c
                                        .query_raw(
                                            "select * from generate_series(1, 200000) as t(n)",
                                            Vec::<String>::new(),
                                        )
                                        .await
                                        .unwrap();
                                    futures::pin_mut!(stream);
                                    let _ = stream.next().await;
                                    done[3] += 1;
                                    break;
                                }
                            }
                        }
                        drop(c);
                    }
                    done
                }));
            }
            let mut total = [0u64; 5];
            for t in tasks {
                let d = t.await.expect("a client task panicked");
                for i in 0..5 {
                    total[i] += d[i];
                }
            }
            total
        })
    };
    // A first round warms caches and pools; the second must not grow memory further.
    let first = round(secs.min(5));
    std::thread::sleep(Duration::from_secs(2));
    let (warm_rss, _) = rss_and_fds(pid);
    let second = round(secs);
    // Dropped connections are noticed and closed.
    let mut settled = rss_and_fds(pid);
    for _ in 0..50 {
        if settled.1 <= idle_fds + 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        settled = rss_and_fds(pid);
    }
    eprintln!(
        "serve load: {secs} s, {clients} clients; queries/prepared/cancelled/abandoned/refused logins: first round \
         {first:?}, second {second:?}; RSS idle {idle_rss} kB, after warm-up {warm_rss} kB, \
         at the end {} kB; fds idle {idle_fds}, at the end {}",
        settled.0, settled.1
    );
    assert!(
        second[..4].iter().all(|n| *n > 0),
        "every kind of work ran: {second:?}"
    );
    assert!(
        settled.1 <= idle_fds + 2,
        "connections left open: {} fds, {idle_fds} when idle",
        settled.1
    );
    assert!(
        settled.0 <= warm_rss + warm_rss / 2 + 50_000,
        "memory grew: {} kB after the second round, {warm_rss} kB after the first",
        settled.0
    );
    // Still answering.
    let answer = rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025")
            .await
            .expect("login after the load");
        texts(&c, "select count(*) from sales").await
    });
    assert_eq!(answer, vec![vec!["5"]]);
}
