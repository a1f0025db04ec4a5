//! Bad input gets a clear error naming the file and position, exit code 2, and nothing written.

use crate::support::{Project, stderr};

const PIPELINE: &str = "\
sources:
  orders:
    format: csv
    location: data/orders.csv
    schema:
      order_id: { type: string, required: true }
      amount: \"decimal(10,2)\"
models:
  - sql/stg_orders.sql
";

/// A small valid project, run once so that its tables exist.
fn project() -> Project {
    let p = Project::empty();
    p.write("pipelines/p.yaml", PIPELINE);
    p.write(
        "sql/stg_orders.sql",
        "select order_id, amount from raw_p_orders\n",
    );
    p.write("data/orders.csv", "order_id,amount\nA,1.50\nB,2.00\n");
    p.ok(&["run"]);
    p
}

/// Run `kbcrm run`, expect exit code `code` and these fragments in stderr; the warehouse must be
/// unchanged.
fn fails(p: &Project, code: i32, fragments: &[&str]) -> String {
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run"]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}, stderr:\n{err}"
    );
    for f in fragments {
        assert!(err.contains(f), "stderr lacks {f:?}:\n{err}");
    }
    assert_eq!(before, p.warehouse_files(), "the warehouse changed");
    err
}

#[test]
fn yaml_syntax_error() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace("  orders:\n", "  orders: [\n"),
    );
    fails(&p, 2, &["pipelines/p.yaml:2:"]);
}

#[test]
fn unknown_key() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace("    location:", "    locaton:"),
    );
    fails(&p, 2, &["pipelines/p.yaml:4:", "locaton", "kbcrm schema"]);
}

#[test]
fn wrong_type() {
    let p = project();
    p.write("pipelines/p.yaml", format!("{PIPELINE}tests: 12\n"));
    fails(&p, 2, &["pipelines/p.yaml:10:"]);
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace("format: csv", "format: xlsx"),
    );
    fails(&p, 2, &["pipelines/p.yaml:3:", "xlsx"]);
}

#[test]
fn bad_column_type() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace("\"decimal(10,2)\"", "decmal"),
    );
    fails(
        &p,
        2,
        &["pipelines/p.yaml:7:", "unknown column type 'decmal'"],
    );
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace(
            "amount: \"decimal(10,2)\"",
            "amount: { type: decimal(10,2) }",
        ),
    );
    fails(&p, 2, &["pipelines/p.yaml:7:", "quote the type"]);
}

#[test]
fn missing_source_file() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace("data/orders.csv", "data/nope.csv"),
    );
    fails(
        &p,
        2,
        &["source 'orders'", "no files found at 'data/nope.csv'"],
    );
}

#[test]
fn sql_syntax_error() {
    let p = project();
    p.write(
        "sql/stg_orders.sql",
        "select order_id\nfrom raw_p_orders where\n",
    );
    fails(&p, 2, &["sql/stg_orders.sql:", "SQL syntax error"]);
    p.write(
        "sql/stg_orders.sql",
        "select order_id,, amount from raw_p_orders\n",
    );
    fails(&p, 2, &["sql/stg_orders.sql:1:"]);
}

#[test]
fn model_reading_unknown_table() {
    let p = project();
    p.write("sql/stg_orders.sql", "select *\nfrom raw_p_order\n");
    fails(
        &p,
        2,
        &[
            "sql/stg_orders.sql:2:6",
            "'raw_p_order'",
            "did you mean 'raw_p_orders'",
        ],
    );
}

#[test]
fn model_with_unknown_column() {
    let p = project();
    p.write(
        "sql/stg_orders.sql",
        "select order_id, amout from raw_p_orders\n",
    );
    fails(&p, 2, &["sql/stg_orders.sql:1:", "amout"]);
}

#[test]
fn dependency_cycle() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        format!("{PIPELINE}  - sql/a.sql\n  - sql/b.sql\n"),
    );
    p.write("sql/a.sql", "select * from b\n");
    p.write("sql/b.sql", "select * from a\n");
    fails(&p, 2, &["cycle", "a (sql/a.sql)", "b (sql/b.sql)"]);
}

#[test]
fn duplicate_table_name() {
    let p = project();
    p.write(
        "pipelines/q.yaml",
        "models:\n  - sql/other/stg_orders.sql\n",
    );
    p.write("sql/other/stg_orders.sql", "select 1 as x\n");
    fails(&p, 2, &["table 'stg_orders' is also built by"]);
}

#[test]
fn csv_header_not_matching_schema() {
    let p = project();
    p.write("data/orders.csv", "order_id,amt\nA,1.50\n");
    fails(
        &p,
        2,
        &[
            "orders.csv:1",
            "missing column(s) 'amount'",
            "the file has 'order_id', 'amt'",
        ],
    );
}

#[test]
fn a_source_cannot_be_written_as_a_type_2_dimension() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace("    location:", "    mode: scd2\n    location:"),
    );
    let err = fails(
        &p,
        2,
        &[
            "pipelines/p.yaml:3:",
            "`mode: scd2`",
            "SQL model with `mode: scd2`",
        ],
    );
    assert!(!err.contains("bug in kbcrm"), "{err}");
}

#[test]
fn validate_reports_all_problems_at_once() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        PIPELINE.replace("data/orders.csv", "data/nope.csv"),
    );
    p.write(
        "pipelines/q.yaml",
        "models:\n  - sql/x.sql\n  - sql/y.sql\n",
    );
    p.write("sql/x.sql", "select * from nowhere\n");
    p.write("sql/y.sql", "select 1 as a; select 2 as b\n");
    let out = p.kbcrm(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sql/x.sql:1:15") && err.contains("'nowhere'"),
        "{err}"
    );
    assert!(
        err.contains("sql/y.sql") && err.contains("more than one statement"),
        "{err}"
    );
    let good = project();
    assert!(
        good.ok(&["validate"])
            .starts_with("ok: 1 pipelines, 1 sources, 1 models")
    );
}

#[test]
fn unknown_pipeline_and_missing_project() {
    let p = project();
    let out = p.kbcrm(&["run", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no pipeline named 'nope'; the project has: p"));
    let empty = tempfile::TempDir::new().unwrap();
    let out = crate::support::run_in(empty.path(), &["tables"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no kbcrm.yaml found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_server_users_and_roles_name_their_line() {
    let p = project();
    p.write(
        "kbcrm.yaml",
        "name: p\nserve:\n  statement_timeout: soon\nroles:\n  analyst: { tables: [\"*\"] }\nusers:\n  bob: { role: nobody, scram: \"hunter2\" }\n",
    );
    fails(
        &p,
        2,
        &[
            "kbcrm.yaml:3:22: serve.statement_timeout: 'soon' is not a duration",
            "kbcrm.yaml:7:16: users.bob.role: no role 'nobody' under roles: (declared: analyst)",
            "kbcrm.yaml:7:31: users.bob.scram: not a SCRAM-SHA-256 verifier",
        ],
    );
}

/// Each problem of a file at its own line: a bad column name that is not the first, a tab in
/// the indentation, every unknown or repeated key of kbcrm.yaml, with help that fits the file.
#[test]
fn every_problem_points_at_its_own_line_with_fitting_help() {
    let p = Project::empty();
    p.write("data/a.csv", "id,v\n1,2\n");
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/a.csv\n    schema:\n      id: int\n      \
         v: int\n      \"Bad Name\": int\n",
    );
    let out = p.kbcrm(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("pipelines/p.yaml:8:7: column name 'Bad Name'"),
        "{err}"
    );
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/a.csv\n    schema:\n      id: int\n\t  v: int\n",
    );
    let err = stderr(&p.kbcrm(&["validate"]));
    assert!(
        err.contains("pipelines/p.yaml:7:1: a tab in the indentation of line 7"),
        "{err}"
    );
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/a.csv\n    schema: { id: int }\n",
    );
    p.write(
        "kbcrm.yaml",
        "name: e\nservve: {}\nname: f\nenginee:\n  memory_limit: 1GiB\n",
    );
    let err = stderr(&p.kbcrm(&["validate"]));
    for expected in [
        "kbcrm.yaml:2:1: unknown field `servve`",
        "kbcrm.yaml:3:1: duplicate mapping key: name",
        "kbcrm.yaml:4:1: unknown field `enginee`",
        "`kbcrm schema --project-file` prints every allowed key",
        "3 problem(s)",
    ] {
        assert!(err.contains(expected), "{expected} missing from:\n{err}");
    }
    assert!(!err.contains("DuplicateKeyPolicy"), "{err}");
    p.write(
        "kbcrm.yaml",
        "name: e\nserve:\n  listen: nope\n  max_connections: 0\n",
    );
    let err = stderr(&p.kbcrm(&["validate"]));
    assert!(err.contains("kbcrm.yaml:3:3: serve.listen"), "{err}");
    assert!(
        err.contains("kbcrm.yaml:4:3: serve.max_connections"),
        "{err}"
    );
}

#[test]
fn an_error_on_a_very_long_line_is_cut_around_its_column_without_a_panic() {
    let p = project();
    // The unknown table sits past column 65,535 of a one-line model.
    p.write(
        "sql/stg_orders.sql",
        format!("select order_id, amount{} from nowhere", " ".repeat(70_000)),
    );
    let out = p.kbcrm(&["validate"]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        &err[..err.len().min(2000)]
    );
    assert!(!err.contains("panicked"), "{}", &err[..err.len().min(2000)]);
    assert!(err.len() < 4000, "the message is {} bytes", err.len());
    assert!(
        err.contains("'nowhere'") && err.contains("line 1 is too long to show; near column"),
        "{err}"
    );
}

#[test]
fn a_project_file_over_the_size_limit_is_refused_at_once() {
    let p = project();
    p.write(
        "pipelines/p.yaml",
        format!("{PIPELINE}# {}\n", "x".repeat(5000)),
    );
    let out = p.kbcrm_with_env(&["validate"], &[("KBCRM_MAX_FILE_BYTES", "4096")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("pipelines/p.yaml")
            && err.contains("more than the 4096 a project file may have")
            && err.contains("KBCRM_MAX_FILE_BYTES"),
        "{err}"
    );
    // Within the default limit it loads.
    assert!(p.ok(&["validate"]).starts_with("ok:"));
}
