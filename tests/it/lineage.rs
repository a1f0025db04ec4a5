//! `kbcrm lineage` prints the graph the pipelines declare.

use crate::support::Project;

#[test]
fn lineage_follows_sources_models_and_extracts() {
    let p = Project::empty();
    p.write(
        "pipelines/a.yaml",
        "sources:\n  x:\n    format: csv\n    location: data/x.csv\n    schema:\n      id: { type: string }\n\
         models:\n  - sql/stg_x.sql\n",
    );
    p.write("sql/stg_x.sql", "select id from raw_a_x\n");
    p.write(
        "pipelines/b.yaml",
        "models:\n  - sql/joined.sql\n  - sql/summary.sql\n",
    );
    p.write(
        "sql/joined.sql",
        "with s as (select id from stg_x) select s.id from s join raw_a_x r on r.id = s.id\n",
    );
    p.write("sql/summary.sql", "select count(*) as n from joined\n");
    p.write("data/x.csv", "id\n1\n");
    let text = p.ok(&["lineage"]);
    assert_eq!(
        text,
        "a:\n  source data/x.csv -> raw_a_x  (load)\n  raw_a_x -> stg_x  (model)\n\
         b:\n  raw_a_x -> joined  (model)\n  stg_x -> joined  (model)\n  joined -> summary  (model)\n"
    );
    let mermaid = p.ok(&["lineage", "--format", "mermaid"]);
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    for edge in [
        "src_data_x_csv -->|load| t_raw_a_x",
        "t_raw_a_x -->|model| t_stg_x",
        "t_stg_x -->|model| t_joined",
        "t_joined -->|model| t_summary",
    ] {
        assert!(mermaid.contains(edge), "missing {edge}:\n{mermaid}");
    }
    let dot = p.ok(&["lineage", "--format", "dot"]);
    assert!(
        dot.starts_with("digraph lineage {") && dot.trim_end().ends_with('}'),
        "{dot}"
    );
    assert_eq!(dot.matches(" -> ").count(), 5, "{dot}");

    // The demo project: the cubes read the star schema, the executive pack reads the cubes.
    let demo = Project::demo();
    let text = demo.ok(&["lineage"]);
    for edge in [
        "fact_sales -> cube_customer_rfm  (model)",
        "cube_churn_warning -> cube_churn_rollup  (model)",
        "cube_churn_warning -> extract executive  (extract)",
        "stg_erp_customers -> map_customer_identity  (identity)",
    ] {
        assert!(text.contains(edge), "missing {edge}:\n{text}");
    }
}

/// A one-shot HTTP endpoint on loopback collecting POSTed bodies.
fn endpoint() -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut length, mut auth, mut line) = (0usize, String::new(), String::new());
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("authorization:") {
                    auth = line["authorization:".len()..].trim().to_string();
                }
                line.clear();
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let _ = (&conn).write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
            let _ = tx.send((auth, String::from_utf8_lossy(&body).into_owned()));
        }
    });
    (port, rx)
}

#[test]
fn openlineage_run_events_go_to_a_file_and_an_endpoint() {
    let (port, events) = endpoint();
    let p = Project::empty();
    p.write(
        "kbcrm.yaml",
        format!(
            "name: test\nopenlineage:\n  file: lineage/events.ndjson\n  url: http://127.0.0.1:{port}/api/v1/lineage\n  \
             api_key_env: TEST_OL_KEY\n  namespace: crm\n"
        ),
    );
    p.write(
        "pipelines/a.yaml",
        "sources:\n  x:\n    format: csv\n    location: data/x.csv\n    schema:\n      id: { type: string }\n\
         models:\n  - sql/stg_x.sql\n",
    );
    p.write("sql/stg_x.sql", "select id from raw_a_x\n");
    p.write("data/x.csv", "id\n1\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kbcrm"))
        .arg("run")
        .current_dir(p.path())
        .env("TEST_OL_KEY", "k-123")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(p.path().join("lineage/events.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (
            lines[0]["eventType"].as_str(),
            lines[1]["eventType"].as_str()
        ),
        (Some("START"), Some("COMPLETE"))
    );
    assert_eq!(lines[0]["run"]["runId"], lines[1]["run"]["runId"]);
    assert_eq!(
        lines[1]["job"],
        serde_json::json!({"namespace": "crm", "name": "a"})
    );
    let names = |key: &str| -> Vec<String> {
        lines[1][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        names("inputs").iter().any(|n| n.ends_with("data/x.csv")),
        "{:?}",
        names("inputs")
    );
    assert_eq!(names("outputs"), ["raw_a_x", "stg_x"]);
    let run_id = lines[1]["run"]["runId"].as_str().unwrap().to_string();
    assert_eq!(
        p.query(&format!(
            "select count(*) from kbcrm_runs where run_id = '{run_id}'"
        ))[0][0],
        "1"
    );
    // The same two events reached the endpoint, with the API key.
    for expected in ["START", "COMPLETE"] {
        let (auth, body) = events
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        assert_eq!(auth, "Bearer k-123");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["eventType"], expected);
        assert_eq!(e["run"]["runId"], run_id.as_str());
    }
    // A failing run sends FAIL with the error.
    p.write(
        "sql/stg_x.sql",
        "select cast(id as int) / cast(0 as int) as id from raw_a_x\n",
    );
    p.write("data/x.csv", "id\n1\n2\n");
    assert_eq!(p.kbcrm(&["run"]).status.code(), Some(1));
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(p.path().join("lineage/events.ndjson"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["eventType"], "FAIL");
    assert!(
        last["run"]["facets"]["errorMessage"]["message"]
            .as_str()
            .unwrap()
            .contains("stg_x")
    );
}
