//! The integration tests: the `kbcrm` binary on temporary projects and generated data.

mod errors;
mod pipeline_run;
mod sources;
mod support;
