use super::*;

#[test]
fn sizes_are_pretty_as_postgresql_prints_them() {
    assert_eq!(size_pretty(0), "0 bytes");
    assert_eq!(size_pretty(10239), "10239 bytes");
    assert_eq!(size_pretty(10240), "10 kB");
    assert_eq!(size_pretty(1_000_000), "977 kB");
    assert_eq!(size_pretty(10_485_760), "10 MB");
    assert_eq!(size_pretty(123_456_789_012), "115 GB");
}

#[test]
fn array_subqueries_and_option_tables_are_rewritten() {
    let sql = "SELECT ARRAY(SELECT b.rolname FROM pg_roles b WHERE b.oid = r.oid) AS m, \
                   (SELECT string_agg(option_name, ',') FROM pg_options_to_table(s.srvoptions)) \
                   FROM pg_roles r, pg_foreign_server s";
    let mut stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .unwrap()
        .remove(0);
    rewrite(&mut stmt);
    let text = stmt.to_string();
    assert!(
        text.contains("(SELECT array_agg(b.rolname) FROM pg_roles b WHERE b.oid = r.oid)"),
        "{text}"
    );
    assert!(!text.contains("pg_options_to_table"), "{text}");
    // A subquery with a LIMIT keeps its rows in a derived table.
    let mut stmt = Parser::parse_sql(
        &PostgreSqlDialect {},
        "SELECT ARRAY(SELECT x FROM t ORDER BY x LIMIT 3)",
    )
    .unwrap()
    .remove(0);
    rewrite(&mut stmt);
    let text = stmt.to_string();
    assert!(
        text.contains("array_agg(__kbcrm_a.__v)") && text.contains("LIMIT 3"),
        "{text}"
    );
}
