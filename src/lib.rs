//! # kbcrm
//!
//! A data-warehouse ETL and OLAP engine for knowledge-based customer relationship management.
//! Declarative YAML pipelines load ERP, sales and service data into a customer-centred star
//! schema of Delta Lake tables; Apache DataFusion answers SQL over it.
//!
//! ## How data moves, and the layers of the code
//!
//! ```text
//!  faces      cli (demo, init)   serve (SQL over the wire)   extract (packs)   schedule   generate
//!               │                   │                          │                 │          │
//!  sequencer  run ── loads sources, builds models and identities in DAG order, tests, commits;
//!               │    lineage, validate (models planned against schemas, no data)
//!               ▼
//!  stages     sources ──► warehouse ◄── identity          cubes (evaluate)
//!             files, DBs   Delta tables, staged writes,    match records   scores predictions
//!             → Arrow      one commit per run, query,      into one id     against a holdout
//!                          run history, state
//!               │
//!  engine     engine: the DataFusion session (memory, spill), kbcrm's SQL functions (udf),
//!               │     optimizer rules, rollup routing, Ballista (distributed), roles' views
//!  plan       plan: the validated, typed project: pipelines, sources, models, tests, DAG,
//!               │     access (roles, users), extracts
//!  config     config: what the user wrote (kbcrm.yaml, pipelines/*.yaml) as serde types
//!               │
//!  leaves     error   sql (quoting)   storage (URLs, object stores, listing rules)   cubes::models
//! ```
//!
//! Each layer imports only its own layer and those below it, and the modules of one layer form
//! no circle; the integration test `layout` checks both over every `crate::` path. What the user
//! wrote (`config::pipeline`, `config::project`) stops at `plan`: the engine, the stages and `run`
//! take plan's typed values (`plan::Write::Merge { keys }`, `plan::Input::Files { .. }`), in
//! which an invalid combination of settings cannot be written. Each folder's `mod.rs` says what
//! it owns and what it may import; no file is longer than about 800 lines and no function longer
//! than 120 without its reason written above it (`// Long because:`), which `layout` checks too.
//!
//! A project is a folder with `kbcrm.yaml`, `pipelines/*.yaml` and `sql/**.sql`:
//!
//! ```no_run
//! # async fn example() -> kbcrm::Result<()> {
//! use kbcrm::plan::{Overrides, Project};
//! use kbcrm::run::{Progress, RunOptions, Runner};
//!
//! let project = Project::load(std::path::Path::new("."), &Overrides::default())?;
//! let runner = Runner::new(&project, RunOptions::default(), Progress::hidden()).await?;
//! let reports = runner.run(&[]).await?; // every pipeline, in dependency order
//! let answer = kbcrm::warehouse::query::query(&project, "select count(*) from dim_customer").await?;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod config;
pub mod cubes;
pub mod engine;
pub mod error;
pub mod extract;
pub mod generate;
pub mod identity;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod serve;
pub mod sources;
pub mod sql;
pub mod storage;
pub mod warehouse;

pub use error::{Error, Result};

pub use arrow;
pub use datafusion;
pub use deltalake;
