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
