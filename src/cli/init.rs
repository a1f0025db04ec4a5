//! `kbcrm init`: a new project with one working pipeline to start from, or (`--from`) with a
//! pipeline written from the user's own files.

use std::path::{Path, PathBuf};

mod from;

use crate::error::{Error, Result};
use crate::plan::PROJECT_FILE;

const PROJECT: &str = "\
# kbcrm project file. Paths are relative to this file.
name: NAME
warehouse: warehouse/
pipelines: pipelines/
sql: sql/
engine:
  memory_limit: 2GiB
# `kbcrm serve`: roles say which tables users read; add users with
# `kbcrm user add NAME --role analyst`.
pii:
  raw_crm_customers: [name, email]
  stg_crm_customers: [name, email]
roles:
  analyst:
    tables: [\"*\"]
  admin:
    tables: [\"*\"]
    pii: true
";

const PIPELINE: &str = "\
# A pipeline: sources to load, SQL models to build, data tests to check before commit.
# `kbcrm schema` prints every allowed key.
name: crm
sources:
  customers:
    format: csv
    location: data/customers.csv
    mode: merge
    keys: [customer_id]
    schema:
      customer_id: { type: string, required: true }
      name: string
      email: string
      signed_up: date
models:
  - sql/staging/stg_crm_customers.sql
tests:
  - unique: { table: stg_crm_customers, columns: [customer_id] }
";

const MODEL: &str = "\
-- One SELECT per file; the file name is the table it builds.
with source as (
    select * from raw_crm_customers
),

final as (
    select
        customer_id,
        trim(name) as name,
        lower(trim(email)) as email,
        signed_up
    from source
)

select * from final
";

const DATA: &str = "\
customer_id,name,email,signed_up
C1,Anna Schmidt, Anna.Schmidt@Example.com ,2024-03-01
C2,Ben Weber,ben.weber@example.com,2024-05-17
";

/// Write a new project into `dir`. Refuses to touch a folder that already has a project file.
pub fn init(dir: &Path) -> Result<Vec<String>> {
    if dir.join(PROJECT_FILE).exists() {
        return Err(Error::Usage(format!(
            "'{}' already holds a {PROJECT_FILE}; kbcrm init does not overwrite a project",
            dir.display()
        )));
    }
    let name = std::path::absolute(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "kbcrm".into());
    let files = [
        (PROJECT_FILE, PROJECT.replace("NAME", &name)),
        ("pipelines/crm.yaml", PIPELINE.to_string()),
        ("sql/staging/stg_crm_customers.sql", MODEL.to_string()),
        ("data/customers.csv", DATA.to_string()),
        (".gitignore", "/warehouse/\n".to_string()),
    ];
    let mut written = Vec::new();
    for (rel, body) in files {
        let path = dir.join(rel);
        if path.exists() {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, body).map_err(|e| Error::io(&path, e))?;
        written.push(rel.to_string());
    }
    Ok(written)
}

/// `kbcrm init DIR --from PATH...`: a pipeline (named after the project folder) with a source
/// guessed from each path and a staging model per source, in a new project or beside the
/// pipelines of an existing one. Returns the files written and what was guessed.
pub fn init_from(dir: &Path, paths: &[PathBuf]) -> Result<(Vec<String>, String)> {
    let name = std::path::absolute(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "kbcrm".into());
    let pipeline = from::pipeline_name(&name);
    let sources = from::guess(dir, paths)?;
    let mut files = vec![(
        format!("pipelines/{pipeline}.yaml"),
        from::pipeline_yaml(&pipeline, &sources),
    )];
    for s in &sources {
        files.push((
            format!("sql/staging/stg_{}.sql", s.name),
            from::staging_sql(&pipeline, s),
        ));
    }
    for (rel, _) in &files {
        if dir.join(rel).exists() {
            return Err(Error::Usage(format!(
                "'{}' already exists; kbcrm init --from does not overwrite a file (move it, or \
                 run it in another folder)",
                dir.join(rel).display()
            )));
        }
    }
    if !dir.join(PROJECT_FILE).exists() {
        files.push((
            PROJECT_FILE.to_string(),
            format!(
                "# kbcrm project file. Paths are relative to this file.\nname: {name}\nwarehouse: \
                 warehouse/\n"
            ),
        ));
        files.push((".gitignore".to_string(), "/warehouse/\n".to_string()));
    }
    let mut written = Vec::new();
    for (rel, body) in files {
        let path = dir.join(&rel);
        if path.exists() {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, body).map_err(|e| Error::io(&path, e))?;
        written.push(rel);
    }
    Ok((written, from::summary(&sources)))
}
