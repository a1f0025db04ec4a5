//! The customer cubes' statistics: the BG/NBD and Gamma-Gamma models and the evaluation of their
//! predictions on a warehouse.
//!
//! `models` is plain numerics over slices of numbers and imports nothing from kbcrm, so the
//! engine's SQL functions (`bgnbd_fit`, `gg_expected_spend`, ...) can wrap it; it sits with the
//! leaves in the layering. `evaluate` scores cubes built as of an earlier date against what
//! happened since; it may import the engine and the stages below `run`.

pub mod evaluate;
pub mod models;
