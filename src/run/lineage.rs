//! `kbcrm lineage`: where every table comes from. Source locations feed raw tables, models
//! and identity resolutions read tables and build tables, extracts read tables; printed as
//! text, Graphviz dot or Mermaid.

use std::collections::BTreeSet;

use clap::ValueEnum;

use crate::plan::Project;

/// Output formats of `kbcrm lineage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LineageFormat {
    /// One line per edge, grouped by pipeline.
    Text,
    /// Graphviz dot.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeKind {
    /// A source location.
    Source,
    /// A warehouse table.
    Table,
    /// An extract.
    Extract,
}

/// One edge: `from` feeds `to`, by `how` (source load, model, identity, extract), in a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    /// Pipeline (or `extracts`).
    pub pipeline: String,
    /// Upstream node.
    pub from: (NodeKind, String),
    /// Downstream node.
    pub to: (NodeKind, String),
    /// What makes the edge.
    pub how: &'static str,
}

/// Every edge of the project, in pipeline order.
pub fn edges(project: &Project) -> Vec<Edge> {
    let mut out = Vec::new();
    for p in &project.pipelines {
        let mut push = |from: (NodeKind, String), to: (NodeKind, String), how| {
            out.push(Edge {
                pipeline: p.name.clone(),
                from,
                to,
                how,
            })
        };
        for s in &p.sources {
            push(
                (NodeKind::Source, s.origin()),
                (NodeKind::Table, s.table.clone()),
                "load",
            );
        }
        for i in &p.identities {
            for r in &i.sources {
                for out_table in [&i.map_table, &i.golden_table] {
                    push(
                        (NodeKind::Table, r.table.clone()),
                        (NodeKind::Table, out_table.clone()),
                        "identity",
                    );
                }
            }
        }
        for m in &p.models {
            for d in &m.depends_on {
                push(
                    (NodeKind::Table, d.clone()),
                    (NodeKind::Table, m.name.clone()),
                    "model",
                );
            }
        }
    }
    let built: BTreeSet<&str> = project.producers().keys().copied().collect();
    let extracts = if project.extracts.is_empty() {
        vec![crate::plan::extracts::Extract::default_pack(&project.name)]
    } else {
        project.extracts.clone()
    };
    for x in &extracts {
        for t in crate::plan::extracts::PACK_INPUTS
            .iter()
            .filter(|t| built.contains(**t))
        {
            out.push(Edge {
                pipeline: "extracts".into(),
                from: (NodeKind::Table, t.to_string()),
                to: (NodeKind::Extract, x.name.clone()),
                how: "extract",
            });
        }
    }
    out
}

fn id(node: &(NodeKind, String)) -> String {
    let prefix = match node.0 {
        NodeKind::Source => "src",
        NodeKind::Table => "t",
        NodeKind::Extract => "x",
    };
    let clean: String = node
        .1
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}_{clean}")
}

fn label(node: &(NodeKind, String)) -> String {
    match node.0 {
        NodeKind::Source => format!("source {}", node.1),
        NodeKind::Table => node.1.clone(),
        NodeKind::Extract => format!("extract {}", node.1),
    }
}

/// The lineage in a format.
pub fn render(project: &Project, format: LineageFormat) -> String {
    let edges = edges(project);
    let nodes: BTreeSet<(NodeKind, String)> = edges
        .iter()
        .flat_map(|e| [e.from.clone(), e.to.clone()])
        .collect();
    let mut s = String::new();
    match format {
        LineageFormat::Text => {
            let mut current = None;
            for e in &edges {
                if current != Some(&e.pipeline) {
                    s.push_str(&format!("{}:\n", e.pipeline));
                    current = Some(&e.pipeline);
                }
                s.push_str(&format!(
                    "  {} -> {}  ({})\n",
                    label(&e.from),
                    label(&e.to),
                    e.how
                ));
            }
        }
        LineageFormat::Dot => {
            s.push_str(
                "digraph lineage {\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n",
            );
            for n in &nodes {
                let shape = match n.0 {
                    NodeKind::Source => "folder",
                    NodeKind::Table => "box",
                    NodeKind::Extract => "note",
                };
                s.push_str(&format!(
                    "  {} [label=\"{}\", shape={shape}];\n",
                    id(n),
                    label(n).replace('"', "\\\"")
                ));
            }
            for e in &edges {
                s.push_str(&format!(
                    "  {} -> {} [label=\"{}\"];\n",
                    id(&e.from),
                    id(&e.to),
                    e.how
                ));
            }
            s.push_str("}\n");
        }
        LineageFormat::Mermaid => {
            s.push_str("flowchart LR\n");
            for n in &nodes {
                let text = label(n).replace('"', "'");
                let shape = match n.0 {
                    NodeKind::Source => format!("[/\"{text}\"/]"),
                    NodeKind::Table => format!("[\"{text}\"]"),
                    NodeKind::Extract => format!("([\"{text}\"])"),
                };
                s.push_str(&format!("  {}{shape}\n", id(n)));
            }
            for e in &edges {
                s.push_str(&format!("  {} -->|{}| {}\n", id(&e.from), e.how, id(&e.to)));
            }
        }
    }
    s
}

/// The datasets a pipeline reads from outside itself and the tables it writes.
fn datasets(project: &Project, pipeline: &str) -> (Vec<(String, String)>, Vec<String>) {
    let edges: Vec<Edge> = edges(project)
        .into_iter()
        .filter(|e| e.pipeline == pipeline)
        .collect();
    let outputs: BTreeSet<String> = edges
        .iter()
        .filter(|e| e.to.0 == NodeKind::Table)
        .map(|e| e.to.1.clone())
        .collect();
    let mut inputs = BTreeSet::new();
    for e in &edges {
        match e.from.0 {
            NodeKind::Source => {
                let s = project
                    .pipeline(pipeline)
                    .and_then(|p| p.sources.iter().find(|s| s.origin() == e.from.1));
                if let Some(l) = s.and_then(|s| s.location()) {
                    inputs.insert((l.store_url.to_string(), l.prefix.clone()));
                }
                if let Some(db) = s.and_then(|s| s.database()) {
                    inputs.insert(crate::sources::database::lineage_dataset(db));
                }
            }
            NodeKind::Table if !outputs.contains(&e.from.1) => {
                inputs.insert((project.warehouse.to_string(), e.from.1.clone()));
            }
            _ => {}
        }
    }
    (inputs.into_iter().collect(), outputs.into_iter().collect())
}

/// The OpenLineage run event of a pipeline run.
pub fn run_event(
    project: &Project,
    namespace: &str,
    pipeline: &str,
    run_id: &str,
    event_type: &str,
    time: chrono::DateTime<chrono::Utc>,
    error: Option<&str>,
) -> serde_json::Value {
    let (inputs, outputs) = datasets(project, pipeline);
    let mut run = serde_json::json!({ "runId": run_id });
    if let Some(e) = error {
        run["facets"] = serde_json::json!({
            "errorMessage": {
                "_producer": PRODUCER,
                "_schemaURL": "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json",
                "message": e,
                "programmingLanguage": "Rust",
            }
        });
    }
    serde_json::json!({
        "eventType": event_type,
        "eventTime": time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "producer": PRODUCER,
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent",
        "run": run,
        "job": { "namespace": namespace, "name": pipeline },
        "inputs": inputs.iter().map(|(ns, name)| serde_json::json!({"namespace": ns, "name": name})).collect::<Vec<_>>(),
        "outputs": outputs.iter().map(|name| serde_json::json!({"namespace": project.warehouse.to_string(), "name": name})).collect::<Vec<_>>(),
    })
}

/// Who produced the events.
const PRODUCER: &str = concat!("kbcrm/", env!("CARGO_PKG_VERSION"));

/// Send a pipeline run's event where kbcrm.yaml says; a target that fails is logged, never
/// fatal to the run.
pub async fn emit(
    project: &Project,
    pipeline: &str,
    run_id: &str,
    event_type: &str,
    error: Option<&str>,
) {
    let Some(target) = &project.openlineage else {
        return;
    };
    let event = run_event(
        project,
        &target.namespace,
        pipeline,
        run_id,
        event_type,
        chrono::Utc::now(),
        error,
    );
    if let Some(file) = &target.file {
        use std::io::Write;
        let written = (|| -> std::io::Result<()> {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)?;
            writeln!(f, "{event}")
        })();
        if let Err(e) = written {
            tracing::warn!(
                "cannot write the OpenLineage event to {}: {e}",
                file.display()
            );
        }
    }
    if let Some(url) = &target.url {
        let mut request = reqwest::Client::new()
            .post(url.clone())
            .timeout(std::time::Duration::from_secs(10))
            .header("content-type", "application/json")
            .body(event.to_string());
        if let Some(var) = &target.api_key_env {
            match std::env::var(var) {
                Ok(key) => request = request.bearer_auth(key),
                Err(_) => tracing::warn!("OpenLineage: the environment variable {var} is not set"),
            }
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!("OpenLineage endpoint {url} answered {}", r.status()),
            Err(e) => tracing::warn!("cannot send the OpenLineage event to {url}: {e}"),
        }
    }
}
