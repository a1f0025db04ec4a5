//! # kbcrm
//!
//! A data-warehouse ETL and OLAP engine for knowledge-based customer relationship management.
//! Declarative YAML pipelines load ERP, sales and service data into a customer-centred star
//! schema of Delta Lake tables; Apache DataFusion answers SQL over it.
//!
//! ```text
//! cli ─► config (YAML spec types) ─► plan (validated project, DAG) ─► run (the only sequencer)
//!                                                                  │
//!        sources ─► warehouse (staged writes, one commit per run) ◄┘
//!        engine.rs builds the one DataFusion SessionContext used by all of them
//!        query reads the warehouse's committed tables
//! ```
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
//! let answer = kbcrm::query::query(&project, "select count(*) from dim_customer").await?;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod config;
pub mod demo;
#[cfg(feature = "ballista")]
pub mod distributed;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod extract;
pub mod freshness;
pub mod generate;
pub mod identity;
pub mod init;
pub mod lineage;
pub mod optimizer;
pub mod plan;
pub mod query;
pub mod roles;
pub mod rollup;
pub mod run;
pub mod schedule;
pub mod serve;
pub mod sources;
pub mod stats;
pub mod udf;
pub mod validate;
pub mod warehouse;

pub use error::{Error, Result};

pub use arrow;
pub use datafusion;
pub use deltalake;
