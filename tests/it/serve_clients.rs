//! PostgreSQL clients beyond drivers against `kbcrm serve`: psql's describe commands,
//! `pg_dump --schema-only` restored into a real PostgreSQL, DuckDB's postgres extension
//! (catalog load, binary COPY, a join), and what a session asks of itself (`current_user`,
//! `current_database()`, `SHOW ALL`, PostgreSQL's column names).

use std::process::Command;

use crate::serve::{connect, project, psql, rt, serve, texts};
use crate::support::{have, may_skip, repo, stderr, stdout};

#[test]
fn a_session_sees_its_login_database_settings_and_postgresql_column_names() {
    let p = project("");
    let s = serve(&p);
    rt().block_on(async {
        let c = connect(s.port, "ann", "ann-pw-2025").await.unwrap();
        let rows = c
            .simple_query(
                "select current_user, session_user, current_database(), count(*), \
                 sum(amount), 1 + 1, amount::int from sales group by amount",
            )
            .await
            .unwrap();
        let tokio_postgres::SimpleQueryMessage::Row(first) = &rows[1] else {
            panic!("no row: {rows:?}");
        };
        let names: Vec<&str> = first.columns().iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "current_user",
                "session_user",
                "current_database",
                "count",
                "sum",
                "?column?",
                "amount"
            ]
        );
        assert_eq!(first.get(0), Some("ann"));
        assert_eq!(first.get(1), Some("ann"));
        assert_eq!(first.get(2), Some("kbcrm"));
        // Another login is another user.
        let a = connect(s.port, "ada", "ada long password").await.unwrap();
        assert_eq!(texts(&a, "select current_user").await, vec![vec!["ada"]]);
        // Two aggregates named alike, as PostgreSQL allows.
        let stmt = c
            .prepare("select count(*), count(email) from customers")
            .await
            .unwrap();
        let names: Vec<&str> = stmt.columns().iter().map(|c| c.name()).collect();
        assert_eq!(names, ["count", "count"]);
        let row = c.query_one(&stmt, &[]).await.unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (4, 3));
        // SHOW ALL lists the settings, with this session's values.
        c.batch_execute("set application_name = 'report-7'")
            .await
            .unwrap();
        let all = texts(&c, "show all").await;
        let setting = |n: &str| {
            all.iter()
                .find(|r| r[0] == n)
                .map(|r| r[1].clone())
                .unwrap_or_else(|| panic!("{n} not in SHOW ALL: {all:?}"))
        };
        assert_eq!(setting("application_name"), "report-7");
        assert_eq!(setting("session_authorization"), "ann");
        assert_eq!(setting("server_version"), "15.6");
        assert_eq!(setting("statement_timeout"), "30s");
        // Another database name is refused, as PostgreSQL refuses one it does not have.
        let e = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=ann password=ann-pw-2025 dbname=sales",
                s.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("a database the server does not hold");
        assert_eq!(e.code().map(|c| c.code()), Some("3D000"), "{e:?}");
    });
}

#[test]
fn psql_describe_commands_answer() {
    if !have("psql", "--version") && may_skip("psql") {
        return;
    }
    let p = project("");
    let s = serve(&p);
    let run = |cmd: &str| {
        let out = psql(s.port, "ann", "ann-pw-2025", "", cmd);
        assert!(
            out.status.success() && !stderr(&out).contains("ERROR"),
            "{cmd}: {}",
            stderr(&out)
        );
        stdout(&out)
    };
    let d = run("\\d+ customers");
    for column in ["customer_id", "credit_limit", "numeric", "text"] {
        assert!(d.contains(column), "\\d+ customers: {d}");
    }
    assert!(run("\\dt+").contains("sales"));
    assert!(run("\\du").contains("ann"));
    assert!(run("\\dg").contains("ada"));
    assert!(run("\\l").contains("kbcrm"));
    assert!(run("\\dn").contains("public"));
    assert!(run("\\dp").contains("customers"));
    for cmd in [
        "\\df", "\\dT", "\\dD", "\\dc", "\\db", "\\da", "\\dv", "\\dx", "\\di",
    ] {
        run(cmd);
    }
    // Tables the role may not read are not described.
    assert!(!run("\\d").contains("secrets"));
}

#[test]
fn pg_dump_schema_restores_into_postgresql() {
    if !have("pg_dump", "--version") && may_skip("pg_dump") {
        return;
    }
    let p = project("");
    let s = serve(&p);
    let out = Command::new("pg_dump")
        .args([
            "--schema-only",
            "-h",
            "127.0.0.1",
            "-p",
            &s.port.to_string(),
            "-U",
            "ada",
            "kbcrm",
        ])
        .env("PGPASSWORD", "ada long password")
        .output()
        .expect("pg_dump runs");
    assert!(out.status.success(), "pg_dump: {}", stderr(&out));
    let dump = stdout(&out);
    for expected in [
        "CREATE TABLE public.customers",
        "credit_limit numeric",
        "CREATE TABLE public.sales",
        "order_date date",
        "amount double precision",
        "paid boolean",
        "CREATE TABLE public.secrets",
        "ALTER TABLE public.sales OWNER TO postgres",
    ] {
        assert!(dump.contains(expected), "{expected} missing from:\n{dump}");
    }
    let Ok(admin) = std::env::var("KBCRM_TEST_PG_URL") else {
        may_skip("a PostgreSQL server to restore into (eval \"$(.ci/postgres start)\")");
        return;
    };
    let restore = |sql: &str| {
        Command::new("psql")
            .args([admin.as_str(), "-X", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql runs")
    };
    let out = restore("DROP DATABASE IF EXISTS kbcrm_dump_check WITH (FORCE)");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = restore("CREATE DATABASE kbcrm_dump_check");
    assert!(out.status.success(), "{}", stderr(&out));
    // The dump gives every object to `postgres`, the owner the server reports (as on most
    // PostgreSQL servers; the throwaway one of the tests may lack it).
    let out = restore(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'postgres') \
         THEN CREATE ROLE postgres; END IF; END $$",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_path("/kbcrm_dump_check");
    let file = p.path().join("dump.sql");
    std::fs::write(&file, &dump).unwrap();
    let out = Command::new("psql")
        .args([
            url.as_str(),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PostgreSQL refused the dump: {}",
        stderr(&out)
    );
    let out = Command::new("psql")
        .args([
            url.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            "select table_name || '.' || column_name || ':' || data_type from \
             information_schema.columns where table_schema = 'public' \
             order by table_name, ordinal_position",
        ])
        .output()
        .unwrap();
    let columns = stdout(&out);
    assert!(
        columns.contains("sales.amount:double precision")
            && columns.contains("customers.credit_limit:numeric")
            && columns.contains("sales.order_date:date"),
        "{columns}"
    );
    let _ = restore("DROP DATABASE IF EXISTS kbcrm_dump_check WITH (FORCE)");
}

#[test]
fn duckdb_attaches_reads_and_joins_through_the_postgres_extension() {
    let python = std::env::var("KBCRM_DUCKDB_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import duckdb, duckdb_extension_postgres_scanner"])
        .output();
    if !probe.is_ok_and(|o| o.status.success())
        && may_skip("python3 with duckdb and duckdb-extension-postgres-scanner")
    {
        return;
    }
    let p = project("");
    let s = serve(&p);
    let out = Command::new(&python)
        .arg(repo().join("tests/it/clients/duckdb_client.py"))
        .env("KBCRM_PORT", s.port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "duckdb: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    // Computed from the fixture's CSV text: the analyst sees names and e-mails masked.
    assert_eq!(lines[0], "tables customers,sales", "{lines:?}");
    assert_eq!(
        lines[1],
        "customers C1|***|***|North|1000.5 C2|***|***|South|250.0 C3|***|None|North|0.0 C4|***|***|West|99.99",
        "{lines:?}"
    );
    assert_eq!(
        lines[2], "by region North|3|158.5 South|1|10.0 West|1|1.25",
        "{lines:?}"
    );
    assert_eq!(
        lines[3], "filtered O1|2025-01-05|true O3|2025-01-09|true",
        "{lines:?}"
    );
}
