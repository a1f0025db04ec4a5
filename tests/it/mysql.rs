//! MySQL/MariaDB tables as sources, against a real server (`.ci/mariadb start` runs one and
//! exports KBCRM_TEST_MYSQL_URL and KBCRM_TEST_MYSQL_CA): types, quarantine, TLS, parallel key
//! ranges, incremental reads, deletes, and the errors a user meets.

use mysql_async::prelude::Queryable;

use crate::support::{Project, may_skip};

/// A database of its own for one test on the test server.
struct Db {
    url: String,
    admin: String,
    name: String,
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Run statements (separated by `;` at line ends) in UTC.
fn exec(url: &str, sql: &str) {
    block(async {
        let mut c = mysql_async::Conn::from_url(url)
            .await
            .expect("connect to the test server");
        c.query_drop("SET time_zone = '+00:00'").await.unwrap();
        for stmt in sql.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
            c.query_drop(stmt)
                .await
                .unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
        c.disconnect().await.unwrap();
    });
}

impl Db {
    fn new(name: &str) -> Option<Db> {
        let Ok(admin) = std::env::var("KBCRM_TEST_MYSQL_URL") else {
            may_skip("a MariaDB server (eval \"$(.ci/mariadb start)\" sets KBCRM_TEST_MYSQL_URL)");
            return None;
        };
        let name = format!("kbcrm_test_{name}");
        exec(
            &admin,
            &format!("DROP DATABASE IF EXISTS {name};\nCREATE DATABASE {name}"),
        );
        let mut url = url::Url::parse(&admin).expect("a URL");
        url.set_path(&format!("/{name}"));
        Some(Db {
            url: url.to_string(),
            admin,
            name,
        })
    }

    fn exec(&self, sql: &str) {
        exec(&self.url, sql);
    }

    fn value(&self, sql: &str) -> String {
        block(async {
            let mut c = mysql_async::Conn::from_url(self.url.as_str())
                .await
                .unwrap();
            c.query_drop("SET time_zone = '+00:00'").await.unwrap();
            let v: Option<String> = c.query_first(sql).await.expect(sql);
            c.disconnect().await.unwrap();
            v.unwrap_or_default()
        })
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            exec(
                &self.admin,
                &format!("DROP DATABASE IF EXISTS {}", self.name),
            )
        });
    }
}

const PIPELINE: &str = "\
sources:
  things:
    format: mysql
    connection: THINGS_URL
    location: things
    mode: merge
    keys: [id]
    partition: { column: id, parts: 3 }
    incremental: { cursor: changed_at, overlap: 1s }
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
      doc: json
  flags:
    format: mysql
    connection: { file: secrets/things.url }
    query: select id, label, removed_on from flags
    mode: merge
    keys: [id]
    deletes: { soft_column: removed_on }
    schema:
      id: { type: int, required: true }
      label: string
      removed_on: timestamp
  gone:
    format: mysql
    connection: THINGS_URL
    location: gone
    mode: merge
    keys: [id]
    deletes: { compare_keys: always }
    schema:
      id: { type: int, required: true }
";

#[test]
fn mysql_types_partitions_tls_incremental_and_deletes() {
    let Some(db) = Db::new("things") else { return };
    db.exec(
        "create table things (id bigint primary key, small smallint, qty int,
           price decimal(12,3), ratio double, name varchar(40), code char(3), active boolean,
           born date, seen datetime(6), changed_at timestamp(6) null, doc json);\n
         set session max_recursive_iterations = 10000;\n
         insert into things
           with recursive g(n) as (select 1 union all select n + 1 from g where n < 5000)
           select n, n % 100, n * 3, n * 1.125, n / 8, concat('thing ', n), concat('C', n % 10),
                  n % 2 = 0, date '2020-01-01' + interval n day,
                  timestamp '2024-03-01 10:00:00' + interval n minute,
                  timestamp '2025-01-01 00:00:00' + interval n second, json_object('g', n)
           from g;\n
         update things set small = null, code = null where id % 7 = 0;\n
         update things set name = null where id = 11;\n
         create table flags (id int primary key, label text, removed_on datetime);\n
         insert into flags values (1, 'a', null), (2, 'b', '2025-06-01 08:00:00');\n
         create table gone (id int primary key);\n
         insert into gone values (1), (2), (3)",
    );
    let p = Project::empty();
    p.write("pipelines/shop.yaml", PIPELINE);
    let ca = std::env::var("KBCRM_TEST_MYSQL_CA").expect("KBCRM_TEST_MYSQL_CA (.ci/mariadb)");
    let tls_url = format!("{}?sslmode=verify-full&sslrootcert={ca}", db.url);
    p.write("secrets/things.url", format!("{tls_url}\n"));
    let env = [("THINGS_URL", tls_url.as_str())];
    p.ok_with_env(&["run"], &env);

    let rejects = p.query("select raw, reason from quarantine");
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0][0], "id=11");
    assert!(rejects[0][1].contains("missing required value in column 'name'"));
    let expect = db.value(
        "select concat_ws('|', count(*), sum(id), sum(small), sum(qty), sum(price), count(code),
                sum(active), min(born), max(seen)) from things where id <> 11",
    );
    let got = p.query(
        "select cast(count(*) as varchar) || '|' || cast(sum(id) as varchar) || '|' || \
         cast(sum(small) as varchar) || '|' || cast(sum(qty) as varchar) || '|' || \
         cast(sum(price) as varchar) || '|' || cast(count(code) as varchar) || '|' || \
         cast(sum(cast(active as int)) as varchar) || '|' || cast(min(born) as varchar) || '|' || \
         to_char(max(seen), '%Y-%m-%d %H:%M:%S%.6f') from raw_shop_things",
    );
    assert_eq!(got[0][0], expect);
    assert_eq!(
        p.query(
            "select ratio, name, code, doc, to_char(changed_at, '%Y-%m-%dT%H:%M:%S') \
             from raw_shop_things where id = 8"
        )[0],
        ["1.0", "thing 8", "C8", "{\"g\": 8}", "2025-01-01T00:00:08"]
            .map(String::from)
            .to_vec()
    );
    assert_eq!(
        p.query(
            "select id, to_char(_deleted_at, '%Y-%m-%d %H:%M') from raw_shop_flags order by id"
        ),
        vec![
            vec!["1".to_string(), String::new()],
            vec!["2".to_string(), "2025-06-01 08:00".to_string()]
        ]
    );

    // A change and a new row are read (with the one-second overlap), and a key gone at the
    // source is marked.
    db.exec(
        "update things set qty = -1, changed_at = now(6) where id = 4000;\n
         insert into things (id, name, changed_at) values (9000, 'new', now(6));\n
         delete from gone where id = 2",
    );
    let out = p.ok_with_env(&["run", "--output", "json"], &env);
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let table = |name: &str| {
        doc["runs"][0]["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {doc}"))
    };
    // The two changes, and the newest row of before (within the one-second overlap).
    assert_eq!(table("raw_shop_things")["rows_read"], 3, "{doc}");
    assert_eq!(
        p.scalar("select qty from raw_shop_things where id = 4000"),
        -1
    );
    assert_eq!(p.scalar("select count(*) from raw_shop_things"), 5000);
    assert_eq!(
        p.scalar("select count(*) from raw_shop_gone where _deleted_at is not null and id = 2"),
        1
    );

    // verify-full without the CA: the certificate is not trusted; nothing written.
    let untrusted = format!("{}?sslmode=verify-full", db.url);
    p.fails_cleanly(
        &["run"],
        &[("THINGS_URL", untrusted.as_str())],
        &["sslrootcert"],
        &[],
    );
}

#[test]
fn mysql_errors_are_clear_and_commit_nothing() {
    let Some(db) = Db::new("errors") else { return };
    db.exec(
        "create table items (id int primary key, amount decimal(10,2), label text);\n
         insert into items values (1, 2.50, 'x'), (2, null, 'y');\n
         create or replace user 'kbcrm_reader'@'%' identified by 'right-secret';\n
         grant select on kbcrm_test_errors.items to 'kbcrm_reader'@'%'",
    );
    let p = Project::empty();
    let pipeline = "sources:\n  items:\n    format: mysql\n    connection: ITEMS_URL\n    location: items\n    schema:\n      id: { type: int, required: true }\n      amount: decimal(10,2)\n";
    p.write("pipelines/shop.yaml", pipeline);
    let mut reader = url::Url::parse(&db.url).unwrap();
    reader.set_username("kbcrm_reader").unwrap();
    reader.set_password(Some("right-secret")).unwrap();
    let good = reader.to_string();
    p.ok_with_env(&["run"], &[("ITEMS_URL", good.as_str())]);
    assert_eq!(p.scalar("select count(*) from raw_shop_items"), 2);
    assert_eq!(
        p.query("select cast(sum(amount) as varchar) from raw_shop_items")[0][0],
        "2.50"
    );
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
        &["Access denied", "check the user and password"],
    );
    let mut unreachable = reader.clone();
    unreachable.set_port(Some(1)).unwrap();
    check(
        unreachable.as_str(),
        &["127.0.0.1:1", "is the server running"],
    );
    p.write(
        "pipelines/shop.yaml",
        pipeline.replace("amount: decimal(10,2)", "amount: int\n      label: date"),
    );
    check(
        &good,
        &[
            "column 'amount' is declared int but is decimal",
            "column 'label' is declared date but is text",
        ],
    );
}
