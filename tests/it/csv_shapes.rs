//! CSV files as real exports hold them: another delimiter, no header, a delimiter at the end of
//! every line, columns separated by runs of blanks, CRLF, a byte-order mark, Latin-1 and
//! Windows-1252 text, lines to skip and comment lines. Each loads with the right `csv:` options,
//! and a header that cannot match says what to change.

use crate::support::{Project, stderr};

/// A project with one source `t` of `format: csv` read with `csv` options (a YAML flow map's
/// inside), the columns `schema`, and the file `data/t.csv` holding `bytes`.
fn project(csv: &str, schema: &str, bytes: &[u8]) -> Project {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        format!(
            "sources:\n  t:\n    format: csv\n    location: data/t.csv\n    csv: {{ {csv} }}\n    \
             schema: {{ {schema} }}\n"
        ),
    );
    p.write("data/t.csv", bytes);
    p
}

/// The rows of the loaded table, in `order` order, as text.
fn rows(p: &Project, columns: &str, order: &str) -> Vec<Vec<String>> {
    p.query(&format!("select {columns} from raw_p_t order by {order}"))
}

#[test]
fn a_headerless_pipe_file_with_a_delimiter_at_each_line_end_loads() {
    // The shape of a dbgen extract: '|' between fields and after the last, no header.
    let data = b"1|Customer#000000001|711.56|BUILDING|\n2|Customer#000000002|121.65|AUTOMOBILE|\n";
    let schema =
        "c_custkey: int, c_name: string, c_acctbal: \"decimal(12,2)\", c_mktsegment: string";
    let p = project("delimiter: '|', header: false", schema, data);
    p.ok(&["run"]);
    assert_eq!(
        rows(
            &p,
            "c_custkey, c_name, c_acctbal, c_mktsegment",
            "c_custkey"
        ),
        [
            ["1", "Customer#000000001", "711.56", "BUILDING"],
            ["2", "Customer#000000002", "121.65", "AUTOMOBILE"],
        ]
    );
    // Said explicitly, a line without the delimiter at its end is rejected with its reason.
    let p = project(
        "delimiter: '|', header: false, trailing_delimiter: true",
        schema,
        b"1|a|1.00|X|\n2|b|2.00|Y\n",
    );
    p.write("pipelines/p.yaml", {
        let text = std::fs::read_to_string(p.path().join("pipelines/p.yaml")).unwrap();
        text + "    rejects: { max_ratio: 1.0 }\n"
    });
    p.ok(&["run"]);
    assert_eq!(p.scalar("select count(*) from raw_p_t"), 1);
    let reason = p.query("select reason, line from quarantine");
    assert_eq!(
        reason,
        [[
            "expected 4 fields and a delimiter at the end of the line, found 4".to_string(),
            "2".to_string()
        ]]
    );
}

#[test]
fn a_header_with_a_delimiter_at_its_end_names_no_extra_column() {
    let p = project(
        "delimiter: ';'",
        "id: int, name: string",
        b"id;name;\n1;a;\n2;b;\n",
    );
    p.ok(&["run"]);
    assert_eq!(rows(&p, "id, name", "id"), [["1", "a"], ["2", "b"]]);
}

#[test]
fn whitespace_separated_columns_with_crlf_and_leading_blanks_load() {
    // A purchase log: runs of spaces between columns, a leading space, CRLF line ends, a quoted
    // value holding blanks.
    let data = b" 00001   19970101   1   11.77\r\n 00002  19970112  \"2\"  12.00  \r\n\r\n 00003\t19970102 2 20.76\r\n";
    let p = project(
        "delimiter: whitespace, header: false",
        "customer: string, day: { type: date, format: \"%Y%m%d\" }, items: int, amount: double",
        data,
    );
    p.ok(&["run"]);
    assert_eq!(
        rows(
            &p,
            "customer, cast(day as varchar), items, amount",
            "customer"
        ),
        [
            ["00001", "1997-01-01", "1", "11.77"],
            ["00002", "1997-01-12", "2", "12.0"],
            ["00003", "1997-01-02", "2", "20.76"],
        ]
    );
    let quoted = project(
        "delimiter: whitespace",
        "id: int, name: string",
        b"id   name\n1   \"Ann  Lee\"\n",
    );
    quoted.ok(&["run"]);
    assert_eq!(rows(&quoted, "id, name", "id"), [["1", "Ann  Lee"]]);
    // A quoted first value after leading blanks, a quote inside it, a tab before the next.
    let first = project(
        "delimiter: whitespace",
        "name: string, id: int",
        b"name id\n  \"Ann \"\"A\"\" Lee\"\t 1\n \"Bo\"  2  \n",
    );
    first.ok(&["run"]);
    assert_eq!(
        rows(&first, "name, id", "id"),
        [["Ann \"A\" Lee", "1"], ["Bo", "2"]]
    );
}

#[test]
fn a_byte_order_mark_latin1_and_windows_1252_text_load() {
    let bom = project(
        "header: false",
        "id: int, name: string",
        b"\xEF\xBB\xBF1,a\n2,b\n",
    );
    bom.ok(&["run"]);
    assert_eq!(rows(&bom, "id, name", "id"), [["1", "a"], ["2", "b"]]);
    // 'Müller' and 'Gruß' in Latin-1; '€' (0x80) in Windows-1252.
    let latin1 = project(
        "encoding: latin1",
        "id: int, name: string",
        b"id,name\n1,M\xFCller\n2,Gru\xDF\n",
    );
    latin1.ok(&["run"]);
    assert_eq!(
        rows(&latin1, "id, name", "id"),
        [["1", "Müller"], ["2", "Gruß"]]
    );
    let cp1252 = project(
        "encoding: windows-1252",
        "id: int, price: string",
        b"id,price\n1,5\x80\n",
    );
    cp1252.ok(&["run"]);
    assert_eq!(rows(&cp1252, "id, price", "id"), [["1", "5€"]]);
}

#[test]
fn lines_to_skip_and_comment_lines_are_passed_over_with_lines_still_counted() {
    let data =
        b"Export of 2024-01-31\nGenerated by ERP 9\nid,amount\n# a note\n1,1.5\n2,x\n3,2.5\n";
    let p = project(
        "skip_rows: 2, comment: '#'",
        "id: int, amount: double",
        data,
    );
    p.write("pipelines/p.yaml", {
        let text = std::fs::read_to_string(p.path().join("pipelines/p.yaml")).unwrap();
        text + "    rejects: { max_ratio: 0.5 }\n"
    });
    p.ok(&["run"]);
    assert_eq!(rows(&p, "id, amount", "id"), [["1", "1.5"], ["3", "2.5"]]);
    let rejected = p.query("select line, raw from quarantine");
    assert_eq!(rejected, [["6".to_string(), "2,x".to_string()]]);
}

#[test]
fn a_header_that_cannot_match_says_which_option_to_change() {
    // A header-less '|' file read with the defaults.
    let p = project(
        "header: true",
        "a: int, b: string, c: int",
        b"1|1|25738|TRUCK|\n2|4|1|AIR|\n",
    );
    let out = p.kbcrm(&["run"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("data/t.csv:1"), "{err}");
    assert!(err.contains("delimiter: '|'"), "{err}");
    assert!(err.contains("header: false"), "{err}");
    // Names that differ get the schema hint only.
    let p = project("header: true", "a: int", b"x,y\n1,2\n");
    let err = stderr(&p.kbcrm(&["run"]));
    assert!(
        err.contains("Fix `schema:`") && !err.contains("header: false"),
        "{err}"
    );
}

#[test]
fn bad_csv_options_are_refused_at_validation_with_the_fix() {
    for (csv, expected) in [
        ("delimiter: '||'", "is not one character"),
        ("delimiter: 'é'", "must be one ASCII character"),
        ("delimiter: '\"'", "must be different characters"),
        (
            "comment: ',', delimiter: ','",
            "must be different characters",
        ),
        ("encoding: ebcdic", "latin1"),
    ] {
        let p = project(csv, "a: int", b"a\n1\n");
        let out = p.kbcrm(&["validate"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{csv}: {err}");
        assert!(err.contains(expected), "{csv}: {err}");
    }
}

#[test]
fn a_run_failing_on_its_reject_limit_says_why_and_shows_the_first_rows() {
    // A '|' file read as ',' with a header that happens to match: every row has one field.
    let p = project(
        "header: false",
        "id: int, name: string",
        b"1|Ann\n2|Bob\n3,Cy\nx,Dee\n",
    );
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("rejected 3 of 4 rows"), "{err}");
    assert!(err.contains("2 × expected 2 fields, found 1"), "{err}");
    assert!(err.contains("1 × column 'id': <value>"), "{err}");
    assert!(
        err.contains("data/t.csv:1: \"1|Ann\" (expected 2 fields, found 1)"),
        "{err}"
    );
    assert!(err.contains("data/t.csv:4: \"x,Dee\""), "{err}");
    assert_eq!(before, p.warehouse_files(), "nothing may be committed");
    // Every rejected row of the failed run, by its id from the error.
    let run_id = err
        .split("kbcrm rejects --run ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("the run id in the error");
    let listed = p.ok(&["rejects", "--run", run_id, "--format", "csv"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(listed.contains("x,Dee"), "{listed}");
    let summary = p.ok(&["rejects", "--run", run_id, "--summary", "--format", "csv"]);
    assert!(
        summary.contains(",2\n") && summary.contains(",1"),
        "{summary}"
    );
    // No row was ever committed to quarantine: `rejects` says so instead of failing.
    let out = p.kbcrm(&["rejects", "--summary"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("no quarantine table yet"), "{err}");
}

#[test]
fn validate_reads_the_first_rows_and_names_a_header_or_delimiter_mismatch() {
    // Header-less '|' data read with the defaults: the header check names both fixes.
    let p = project("", "a: int, b: string", b"1|x\n2|y\n");
    let out = p.kbcrm(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("data/t.csv:1") && err.contains("delimiter: '|'"),
        "{err}"
    );
    // Without a header: no row of the sample loads, the first is named with the fix.
    let p = project("header: false", "a: int, b: string", b"1;x\n2;y\n");
    let out = p.kbcrm(&["validate"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("none of the first 2 rows of")
            && err.contains("at line 1: expected 2 fields, found 1")
            && err.contains("delimiter: ';'"),
        "{err}"
    );
    // Files that load, or none yet, pass.
    let p = project(
        "delimiter: ';', header: false",
        "a: int, b: string",
        b"1;x\n",
    );
    assert!(p.ok(&["validate"]).starts_with("ok:"));
    std::fs::remove_file(p.path().join("data/t.csv")).unwrap();
    assert!(p.ok(&["validate"]).starts_with("ok:"));
}

#[test]
fn a_header_naming_a_declared_column_twice_is_an_error_unless_read_by_position() {
    let data = b"id,name,name\n1,Ann,Anna\n";
    let p = project("", "id: int, name: string", data);
    let before = p.warehouse_files();
    let out = p.kbcrm(&["run"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("data/t.csv:1")
            && err.contains("names column 'name' twice (fields 2 and 3)")
            && err.contains("header: false, skip_rows: 1"),
        "{err}"
    );
    assert_eq!(before, p.warehouse_files(), "nothing may be committed");
    // By position, as the message says: the second 'name' kept as its own column.
    let p = project(
        "header: false, skip_rows: 1",
        "id: int, name: string, name_2: string",
        data,
    );
    p.ok(&["run"]);
    assert_eq!(rows(&p, "id, name, name_2", "id"), [["1", "Ann", "Anna"]]);
    // A repeated name the schema does not declare is not read, so it is no problem.
    let p = project("", "id: int", data);
    p.ok(&["run"]);
    assert_eq!(p.scalar("select count(*) from raw_p_t"), 1);
}
