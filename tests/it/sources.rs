//! Source formats and declared types, checked value by value.

use std::sync::Arc;

use kbcrm::arrow::array::{Int64Array, RecordBatch, StringArray};
use kbcrm::arrow::datatypes::{DataType, Field, Schema};

use crate::support::{Project, stderr};

const SCHEMA: &str = concat!(
    "    schema:\n",
    "      id: { type: bigint, required: true }\n",
    "      price: \"decimal(8,2)\"\n",
    "      ok: bool\n",
    "      day: { type: date, format: \"%d.%m.%Y\" }\n",
    "      at: timestamp\n",
    "      score: double\n",
    "      note: string\n",
    "      extra: json\n",
);

#[test]
fn csv_values_are_typed_and_bad_rows_quarantined() {
    let p = Project::empty();
    p.write("pipelines/t.yaml", format!("sources:\n  s:\n    format: csv\n    location: data/*.csv\n    csv: {{ delimiter: \";\" }}\n    rejects: {{ max_ratio: 0.5 }}\n{SCHEMA}"));
    p.write(
        "data/one.csv",
        "\u{feff}id;price;ok;day;at;score;note;extra\r\n\
         1;12.50;yes;02.01.2024;2024-01-02 03:04:05;1.5;\"a;b\";{\"k\":1}\r\n\
         2;;false;;2024-01-02T03:04:05+01:00;;;\r\n\
         3;12,5x;true;02.01.2024;;;;\r\n\
         ;1.00;true;;;;;\r\n\
         5;1.00;true\r\n",
    );
    p.write(
        "data/two.csv",
        "id;price;ok;day;at;score;note;extra\n6;0.10;0;31.12.2025;;;\"line\nbreak\";[1,2]\n",
    );
    p.write("data/ignored.txt", "not matched by the glob\n");
    p.ok(&["run"]);
    let rows = p.query(
        "select id, cast(price as varchar), ok, cast(day as varchar), cast(at as varchar), score, note, extra \
         from raw_t_s order by id",
    );
    let expect = [
        [
            "1",
            "12.50",
            "true",
            "2024-01-02",
            "2024-01-02T03:04:05Z",
            "1.5",
            "a;b",
            "{\"k\":1}",
        ],
        ["2", "", "false", "", "2024-01-02T02:04:05Z", "", "", ""],
        [
            "6",
            "0.10",
            "false",
            "2025-12-31",
            "",
            "",
            "line\nbreak",
            "[1,2]",
        ],
    ];
    assert_eq!(rows.len(), expect.len(), "{rows:?}");
    for (r, e) in rows.iter().zip(expect) {
        assert_eq!(r, &e.map(String::from).to_vec());
    }
    let rejects = p.query("select line, column_name, reason from quarantine order by line");
    assert_eq!(rejects.len(), 3, "{rejects:?}");
    assert_eq!(rejects[0][0], "4");
    assert_eq!(rejects[0][1], "price");
    assert!(
        rejects[0][2].contains("'12,5x' is not a valid decimal(8,2)"),
        "{rejects:?}"
    );
    assert_eq!(rejects[1][0], "5");
    assert!(rejects[1][2].contains("missing required value for column 'id'"));
    assert_eq!(rejects[2][0], "6");
    assert!(rejects[2][2].contains("expected 8 fields, found 3"));
}

#[test]
fn ndjson_values_are_typed_and_bad_lines_quarantined() {
    let p = Project::empty();
    p.write("pipelines/t.yaml", format!("sources:\n  s:\n    format: json\n    location: data/\n    rejects: {{ max_ratio: 0.9 }}\n{SCHEMA}"));
    p.write(
        "data/a.ndjson",
        "{\"id\": 1, \"price\": 12.5, \"ok\": true, \"day\": \"02.01.2024\", \"at\": \"2024-01-02T03:04:05Z\", \"score\": 2, \"note\": 7, \"extra\": {\"a\": [1]}}\n\
         \n\
         {\"id\": \"2\", \"price\": \"3.10\"}\n\
         {\"id\": 3, \"price\": \"abc\"}\n\
         {\"id\": 4, \"pri\n\
         [1, 2]\n",
    );
    p.ok(&["run"]);
    let rows = p.query("select id, cast(price as varchar), ok, cast(day as varchar), score, note, extra from raw_t_s order by id");
    assert_eq!(
        rows,
        vec![
            [
                "1",
                "12.50",
                "true",
                "2024-01-02",
                "2.0",
                "7",
                "{\"a\":[1]}"
            ]
            .map(String::from)
            .to_vec(),
            ["2", "3.10", "", "", "", "", ""].map(String::from).to_vec(),
        ]
    );
    let rejects = p.query("select line, reason from quarantine order by line");
    assert_eq!(
        rejects.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        ["4", "5", "6"]
    );
    assert!(rejects[1][1].starts_with("invalid JSON"), "{rejects:?}");
    assert!(
        rejects[2][1].contains("expected a JSON object"),
        "{rejects:?}"
    );
}

fn sample_batch() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Int64, true),
        Field::new("label", DataType::Utf8, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![Some(1), Some(2), None])),
            Arc::new(StringArray::from(vec![Some("one"), None, Some("three")])),
        ],
    )
    .unwrap()
}

const COLUMNAR_SCHEMA: &str = "    schema:\n      id: { type: int, required: true, source: key }\n      label: string\n    rejects: { max_ratio: 0.5 }\n";

#[test]
fn parquet_columns_are_cast_and_required_nulls_rejected() {
    let p = Project::empty();
    let path = p.path().join("data/part.parquet");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let batch = sample_batch();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    p.write(
        "pipelines/t.yaml",
        format!("sources:\n  s:\n    format: parquet\n    location: data/\n{COLUMNAR_SCHEMA}"),
    );
    p.ok(&["run"]);
    assert_eq!(
        p.query("select id, label from raw_t_s order by id"),
        vec![vec!["1", "one"], vec!["2", ""]]
    );
    assert_eq!(
        p.query("select line, column_name from quarantine"),
        vec![vec!["3", "id"]]
    );
    // A column the file does not have is a schema error naming it.
    p.write(
        "pipelines/t.yaml",
        format!(
            "sources:\n  s:\n    format: parquet\n    location: data/\n{}",
            COLUMNAR_SCHEMA.replace("source: key", "source: ky")
        ),
    );
    let out = p.kbcrm(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("column 'ky' is not in the file; it has 'key', 'label'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn delta_table_as_a_source() {
    let p = Project::empty();
    let url = url::Url::from_directory_path(p.path().join("external/t")).unwrap();
    std::fs::create_dir_all(p.path().join("external/t")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let table = kbcrm::deltalake::DeltaTableBuilder::from_url(url)
            .unwrap()
            .build()
            .unwrap();
        table.write(vec![sample_batch()]).await.unwrap();
    });
    p.write(
        "pipelines/t.yaml",
        format!("sources:\n  s:\n    format: delta\n    location: external/t\n{COLUMNAR_SCHEMA}"),
    );
    p.ok(&["run"]);
    assert_eq!(
        p.query("select id, label from raw_t_s order by id"),
        vec![vec!["1", "one"], vec!["2", ""]]
    );
}

#[test]
fn schema_command_prints_json_schema() {
    let p = Project::empty();
    let out = p.ok(&["schema"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["title"], "PipelineSpec");
    assert!(out.contains("\"max_ratio\"") && out.contains("\"keys\""));
    let v: serde_json::Value = serde_json::from_str(&p.ok(&["schema", "--project-file"])).unwrap();
    assert!(v["properties"]["warehouse"].is_object(), "{v}");
}

#[test]
fn init_makes_a_project_that_runs() {
    let dir = tempfile::TempDir::new().unwrap();
    let out = crate::support::run_in(dir.path(), &["init", "shop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shop = dir.path().join("shop");
    let out = crate::support::run_in(&shop, &["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = crate::support::run_in(
        &shop,
        &[
            "query",
            "--format",
            "csv",
            "select email from stg_crm_customers order by 1",
        ],
    );
    assert_eq!(
        crate::support::stdout(&out),
        "email\nanna.schmidt@example.com\nben.weber@example.com\n"
    );
    let again = crate::support::run_in(dir.path(), &["init", "shop"]);
    assert_eq!(again.status.code(), Some(2));
}

#[test]
fn location_as_file_url() {
    let p = Project::empty();
    p.write("elsewhere/x.csv", "id,name\n1,a\n2,b\n");
    let url = url::Url::from_file_path(p.path().join("elsewhere/x.csv")).unwrap();
    p.write(
        "pipelines/t.yaml",
        format!("sources:\n  s:\n    format: csv\n    location: {url}\n    schema:\n      id: int\n      name: string\n"),
    );
    p.ok(&["run"]);
    assert_eq!(p.scalar("select sum(id) from raw_t_s"), 3);
}

/// Files of other tools' names at a source's location (`_SUCCESS`, `.crc`, `_temporary/`) are
/// not read, and the run summary names each with the rule that skipped it.
#[test]
fn skipped_files_are_counted_and_named() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  c:\n    format: csv\n    location: data/\n    schema: { id: int, v: int }\n",
    );
    for f in [
        "a.csv",
        "b c.csv",
        "_SUCCESS",
        ".a.csv.crc",
        "_temporary/0/x.csv",
    ] {
        p.write(&format!("data/{f}"), "id,v\n1,2\n");
    }
    let out = p.ok(&["run"]);
    assert!(
        out.contains(
            "skipped 3 files: .a.csv.crc (starts with .), _SUCCESS (starts with _), \
             _temporary/0/x.csv (in a folder starting with _)"
        ),
        "{out}"
    );
    assert_eq!(p.query("select count(*) from raw_p_c"), vec![vec!["2"]]);
}
