//! A query message of arbitrary text, as `kbcrm serve` takes it before planning: the
//! complexity check, the parse, the read-only policy, the catalog rewrites and PostgreSQL's
//! column names never panic or overflow the stack of a query thread for any text the check
//! lets through.

#![no_main]

use kbcrm::serve::{complexity, execute, pgcompat, policy, pool};
use libfuzzer_sys::fuzz_target;

fn prepare(sql: String) {
    if complexity::check(&sql).is_err() {
        return;
    }
    let parser =
        datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser::new();
    let Ok(statements) = parser.parse(&sql) else {
        return;
    };
    let hidden = ["secrets".to_string()].into_iter().collect();
    for mut stmt in statements {
        if policy::judge(&stmt, &hidden) == policy::Verdict::Run {
            policy::simplify_catalog_subqueries(&mut stmt);
            policy::empty_index_catalog_queries(&mut stmt);
            pgcompat::rewrite(&mut stmt);
            let _ = stmt.to_string();
        }
    }
    let _ = execute::column_names_of(&sql);
}

fuzz_target!(|data: &[u8]| {
    let sql = String::from_utf8_lossy(data).into_owned();
    // On a thread with the stack the server's query threads have.
    std::thread::Builder::new()
        .stack_size(pool::STACK_SIZE)
        .spawn(move || prepare(sql))
        .expect("a thread")
        .join()
        .expect("no panic");
});
