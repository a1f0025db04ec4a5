//! The bad-input corpus: pipeline files with every spec mistake in `tests/fixtures/bad/yaml/`
//! (each names, in its first line, the position and the words of the error it must get), and
//! source files that are broken in the ways real exports are. No case may panic or commit what
//! it should not.

use crate::support::{Project, repo, stderr};

/// `# expect at LINE:COL words` from a fixture's first line.
fn expectation(text: &str) -> (String, String) {
    let first = text.lines().next().unwrap_or_default();
    let rest = first
        .strip_prefix("# expect at ")
        .unwrap_or_else(|| panic!("fixture without `# expect at L:C words`: {first}"));
    let (pos, words) = rest.split_once(' ').expect("position and words");
    (pos.to_string(), words.to_string())
}

#[test]
fn every_pipeline_spec_mistake_is_named_with_its_position() {
    let dir = repo().join("tests/fixtures/bad/yaml");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 30, "the corpus has {} cases", cases.len());
    let p = Project::empty();
    p.write("sql/stg_orders.sql", "select order_id from raw_p_orders\n");
    p.write("data/orders.csv", "order_id,amount\nA,1.50\n");
    let mut failures = Vec::new();
    for case in &cases {
        let text = std::fs::read_to_string(case).expect("fixture");
        let (pos, words) = expectation(&text);
        p.write("pipelines/p.yaml", &text);
        let out = p.kbcrm(&["validate"]);
        let err = stderr(&out);
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        if out.status.code() != Some(2)
            || err.contains("panicked")
            || !err.contains(&format!("pipelines/p.yaml:{pos}"))
            || !err.contains(&words)
        {
            failures.push(format!(
                "{name}: exit {:?}, wanted pipelines/p.yaml:{pos} and {words:?}:\n{err}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing was run, so nothing was written.
    assert!(p.warehouse_files().is_empty());
}

const DATA_PIPELINE: &str = "\
sources:
  c:
    format: csv
    location: csv/*.csv
    rejects: { max_ratio: 1 }
    schema:
      id: { type: int, required: true }
      note: string
  j:
    format: json
    location: json/
    rejects: { max_ratio: 1 }
    schema:
      id: { type: int, required: true }
      note: string
";

#[test]
fn broken_source_files_quarantine_their_bad_rows_and_load_the_rest() {
    let p = Project::empty();
    p.write("pipelines/p.yaml", DATA_PIPELINE);
    // A quote opened in the last record and never closed would swallow the rest of the file.
    p.write("csv/a_broken_quote.csv", "id,note\n1,ok\n2,\"abc\n3,def\n");
    p.write(
        "csv/b_utf8.csv",
        b"id,note\n4,ok\n5,bad \xff\xfe here\n6,fine\n".as_slice(),
    );
    let big = "x".repeat(10 * 1024 * 1024);
    p.write(
        "csv/c_big_field.csv",
        format!("id,note\n7,{big}\n8,small\n"),
    );
    p.write("csv/d_empty.csv", "");
    p.write("csv/e_header_only.csv", "id,note\n");
    p.write("csv/f_bom_crlf.csv", "\u{feff}id,note\r\n9,crlf\r\n");
    p.write("csv/g_ragged.csv", "id,note\n10,a,extra\n11\n12,b\n");
    p.write(
        "json/a.ndjson",
        "{\"id\": 20, \"note\": \"a\"}\n{\"id\": 21, \"note\": \"tru\n[1, 2]\n{\"id\": [22], \"note\": \"x\"}\n{\"id\": 23}",
    );
    p.write("json/b_empty.ndjson", "");
    p.ok(&["run"]);
    assert_eq!(
        p.query("select id, length(note) from raw_p_c order by id"),
        [
            ["1", "2"],
            ["4", "2"],
            ["6", "4"],
            ["7", &big.len().to_string()],
            ["8", "5"],
            ["9", "4"],
            ["12", "1"]
        ]
        .map(|r| r.map(String::from).to_vec())
    );
    assert_eq!(
        p.query("select id from raw_p_j order by id"),
        [["20"], ["23"]].map(|r| r.map(String::from).to_vec())
    );
    let rejects = p.query(
        "select regexp_replace(file, '.*/', ''), line, reason from quarantine order by file, line",
    );
    let expect = [
        ("a_broken_quote.csv", "3", "unterminated quoted field"),
        ("b_utf8.csv", "3", "invalid UTF-8 in column 'note'"),
        ("g_ragged.csv", "2", "expected 2 fields, found 3"),
        ("g_ragged.csv", "3", "expected 2 fields, found 1"),
        ("a.ndjson", "2", "invalid JSON"),
        ("a.ndjson", "3", "expected a JSON object"),
        ("a.ndjson", "4", "is not a valid int for column 'id'"),
    ];
    assert_eq!(rejects.len(), expect.len(), "{rejects:?}");
    for (r, (file, line, reason)) in rejects.iter().zip(expect) {
        assert_eq!((r[0].as_str(), r[1].as_str()), (file, line), "{rejects:?}");
        assert!(r[2].contains(reason), "{r:?} lacks {reason:?}");
    }
}

#[test]
fn parquet_with_another_schema_is_a_clear_error_and_commits_nothing() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: csv/\n    schema:\n      id: int\n      note: string\n",
    );
    p.write("csv/a.csv", "id,note\n1,a\n");
    p.ok(&["run"]);
    // Written by kbcrm itself: the raw table's own Parquet file, which has no column `amount`.
    let parquet = walk(&p.path().join("warehouse/raw_p_c"))
        .into_iter()
        .find(|f| f.extension().is_some_and(|x| x == "parquet"))
        .expect("a parquet file");
    std::fs::create_dir_all(p.path().join("pq")).unwrap();
    std::fs::copy(&parquet, p.path().join("pq/part.parquet")).unwrap();
    p.write(
        "pipelines/q.yaml",
        "sources:\n  x:\n    format: parquet\n    location: pq/\n    schema:\n      id: int\n      amount: decimal(10,2)\n",
    );
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run", "q"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("part.parquet") && err.contains("amount"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(p.warehouse_files(), before);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
