//! The integration tests: the `kbcrm` binary on temporary projects and generated data.

mod backfill;
mod bad_input;
mod crash;
mod cubes;
mod distributed;
mod errors;
mod extract;
mod freshness;
mod history;
mod incremental;
mod layout;
mod lineage;
mod models;
mod mysql;
mod object_storage;
mod pipeline_run;
mod postgres;
mod recovery;
mod rollups;
mod schedule;
mod serve;
mod serve_clients;
mod serve_limits;
mod sources;
mod star;
mod support;
