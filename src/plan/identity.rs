//! An identity resolution as the plan holds it: validated, with its record sources in priority
//! order. [`crate::identity`] runs it.

use std::collections::HashMap;

use crate::config::pipeline::{Normalizer, Survivorship};

/// One system's records of the entity.
#[derive(Debug, Clone)]
pub struct RecordSource {
    /// System name (the `source` column of the map).
    pub name: String,
    /// Table holding the records.
    pub table: String,
    /// Id column in that table.
    pub id: String,
    /// Column telling when the record last changed.
    pub updated_at: Option<String>,
    /// (golden field, column) pairs.
    pub fields: Vec<(String, String)>,
}

/// A validated identity resolution.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Pipeline it belongs to.
    pub pipeline: String,
    /// Entity name, e.g. `customer`.
    pub entity: String,
    /// The map table.
    pub map_table: String,
    /// The golden-record table.
    pub golden_table: String,
    /// The id column, `<entity>_id`.
    pub id_column: String,
    /// Prefix of new ids.
    pub id_prefix: String,
    /// Record sources in priority order.
    pub sources: Vec<RecordSource>,
    /// (rule name, fields) in priority order.
    pub rules: Vec<(String, Vec<String>)>,
    /// Normaliser per field (fields not listed are compared trimmed and lower-cased).
    pub normalize: HashMap<String, Normalizer>,
    /// Country calling code for national phone numbers.
    pub default_cc: String,
    /// Survivorship per golden field, for every field.
    pub survivorship: Vec<(String, Survivorship)>,
    /// Largest group a match key may join.
    pub max_group: usize,
}
