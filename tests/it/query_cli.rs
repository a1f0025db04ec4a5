//! `kbcrm query`: SQL from an argument, stdin or a file; JSON lines that keep null columns;
//! `--timing` with what the query took and read.

use crate::support::{Project, stderr, stdout};

/// A project with a loaded table `raw_p_t` of 3 rows (one `name` missing) in 3 files.
fn project() -> Project {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  t:\n    format: csv\n    location: data/\n    schema: { id: int, name: string }\n",
    );
    p.write("data/a.csv", "id,name\n1,Ann\n");
    p.write("data/b.csv", "id,name\n2,\n");
    p.write("data/c.csv", "id,name\n3,Cy\n");
    p.ok(&["run"]);
    p
}

#[test]
fn sql_from_a_file_json_with_nulls_and_timing() {
    let p = project();
    p.write(
        "q.sql",
        "-- the names\nselect id, name from raw_p_t order by id\n",
    );
    let out = p.kbcrm(&["query", "--file", "q.sql", "--format", "json", "--timing"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1], serde_json::json!({ "id": 2, "name": null }));
    let timing = stderr(&out);
    assert!(
        timing.contains("planning ") && timing.contains(" ms, execution "),
        "{timing}"
    );
    assert!(timing.contains("; 3 rows; scanned 3 rows"), "{timing}");
    // A filtered query reports its own answer's rows.
    let out = p.kbcrm(&["query", "--timing", "select name from raw_p_t where id = 3"]);
    let timing = stderr(&out);
    assert!(out.status.success(), "{timing}");
    assert!(stdout(&out).contains("Cy"));
    assert!(timing.contains("; 1 rows;"), "{timing}");
    // Without --timing nothing is added to stderr; a missing file is named.
    let out = p.kbcrm(&["query", "select 1 as one"]);
    assert!(stderr(&out).trim().is_empty(), "{}", stderr(&out));
    let out = p.kbcrm(&["query", "--file", "nope.sql"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("nope.sql"), "{}", stderr(&out));
    // One of SQL and --file.
    let out = p.kbcrm(&["query", "--file", "q.sql", "select 1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn a_wrong_call_of_a_model_function_names_its_arguments() {
    let p = project();
    for (sql, expected) in [
        (
            "select bgnbd_p_alive(1.0, 2.0)",
            "bgnbd_p_alive(x: Float64, t_x: Float64, t: Float64, r: Float64, alpha: Float64, \
             a: Float64, b: Float64)",
        ),
        (
            "select gg_fit(1.0) from raw_p_t",
            "gg_fit(x: Float64, m: Float64)",
        ),
    ] {
        let out = p.kbcrm(&["query", sql]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sql}: {err}");
        assert!(err.contains(expected), "{sql}: {err}");
    }
}
