//! The pipeline spec: what a user writes in `pipelines/*.yaml`.
//!
//! These types only hold what the user wrote. [`crate::plan`] resolves paths, reads SQL and checks
//! everything that cannot be said in a type.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::types::ColumnSpecInput;

/// One pipeline file.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Name of the pipeline; defaults to the file name without `.yaml`.
    #[serde(default)]
    pub name: Option<String>,
    /// What the pipeline is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Cron expression for `kbcrm schedule`, e.g. "0 2 * * *" (minute hour day month
    /// weekday, an optional seconds field first), in kbcrm.yaml's `timezone`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub schedule: Option<Spanned<String>>,
    /// Further attempts `kbcrm schedule` makes when a scheduled run fails; default 0.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Wait before the first retry, doubled for each further one; default "1min".
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub retry_delay: Option<Spanned<String>>,
    /// What `kbcrm schedule` does about runs it missed while it was not running: `run_once`
    /// (one catch-up run, the default) or `skip` (wait for the next time).
    #[serde(default)]
    pub misfire: Option<Misfire>,
    /// Sources to load, by name. Each lands in a table (default `raw_<pipeline>_<source>`).
    #[serde(default)]
    #[schemars(with = "IndexMap<String, SourceSpec>")]
    pub sources: IndexMap<String, Spanned<SourceSpec>>,
    /// SQL models to build, in any order (the order comes from the SQL).
    #[serde(default)]
    #[schemars(with = "Vec<ModelEntry>")]
    pub models: Vec<Spanned<ModelEntry>>,
    /// Data tests checked before anything is committed.
    #[serde(default)]
    #[schemars(with = "Vec<TestSpec>")]
    pub tests: Vec<Spanned<TestSpec>>,
    /// Identity resolution: records of one entity from several systems matched into one id.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, IdentitySpec>")]
    pub identity: IndexMap<String, Spanned<IdentitySpec>>,
    /// Variables the pipeline's SQL reads with `kbcrm_var('name')` (thresholds, horizons).
    #[serde(default)]
    pub vars: IndexMap<String, serde_json::Value>,
}

/// Freshness thresholds of a source.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FreshnessSpec {
    /// Age of the newest file beyond which `kbcrm freshness` warns, e.g. "26h".
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub warn_after: Option<Spanned<String>>,
    /// Age beyond which it fails (exit code 3), e.g. "50h".
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub error_after: Option<Spanned<String>>,
}

/// What to do about scheduled times missed while the scheduler was down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Run once for all the missed times.
    #[default]
    RunOnce,
    /// Do not catch up; wait for the next scheduled time.
    Skip,
}

/// File formats a source can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// Comma (or other) separated values with a header row.
    Csv,
    /// Newline-delimited JSON, one object per line.
    Json,
    /// Apache Parquet.
    Parquet,
    /// A Delta Lake table.
    Delta,
    /// A table or query of a PostgreSQL database (`connection:`, and `location:` naming the
    /// table or `query:`).
    Postgres,
    /// A table or query of a MySQL or MariaDB database, as `postgres`.
    Mysql,
}

impl SourceFormat {
    /// Whether the source is a database rather than files.
    pub fn is_database(&self) -> bool {
        matches!(self, SourceFormat::Postgres | SourceFormat::Mysql)
    }
}

/// How a load changes its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Replace the table's content.
    #[default]
    Overwrite,
    /// Add the rows.
    Append,
    /// Upsert by `keys`: new keys are inserted, existing keys replaced when changed.
    Merge,
    /// Slowly changing dimension, type 2: a change to a tracked column closes the current
    /// version and opens a new one (see `scd2:`).
    Scd2,
}

impl WriteMode {
    /// The name as written in YAML.
    pub fn as_str(&self) -> &'static str {
        match self {
            WriteMode::Overwrite => "overwrite",
            WriteMode::Append => "append",
            WriteMode::Merge => "merge",
            WriteMode::Scd2 => "scd2",
        }
    }
}

/// A source of a pipeline.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// csv | json | parquet | delta | postgres | mysql
    pub format: SourceFormat,
    /// A path (relative to kbcrm.yaml), a folder, a glob (`sources/sales/*.csv`) or an
    /// object-store URL (`file://`, `s3://`, ...). For a database: the table to read
    /// (`schema.table`), unless `query:` is given.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub location: Option<Spanned<String>>,
    /// Database sources: where the connection URL comes from (never the URL itself):
    /// `ERP_DATABASE_URL` or `{ env: ERP_DATABASE_URL }` names an environment variable,
    /// `{ file: secrets/erp.url }` a file holding it. TLS follows the URL's `sslmode`
    /// (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert`.
    #[serde(default)]
    #[schemars(with = "Option<ConnectionSpec>")]
    pub connection: Option<Spanned<ConnectionSpec>>,
    /// Database sources: a SELECT to read instead of a table (`location:`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub query: Option<Spanned<String>>,
    /// Database sources: read key ranges of an integer column in parallel,
    /// e.g. `{ column: id, parts: 4 }`.
    #[serde(default)]
    pub partition: Option<PartitionSpec>,
    /// Database sources: how rows removed at the source are found and marked in the table's
    /// `_deleted_at` column: `{ soft_column: deleted_at }` (the source marks them itself) or
    /// `{ compare_keys: 1d }` (all keys compared with the source at most this often; `always`
    /// for every run).
    #[serde(default)]
    pub deletes: Option<DeletesSpec>,
    /// Table to load into; default `raw_<pipeline>_<source>`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub table: Option<Spanned<String>>,
    /// overwrite (default) | append | merge
    #[serde(default)]
    pub mode: WriteMode,
    /// Key columns for `mode: merge`.
    #[serde(default)]
    pub keys: Vec<String>,
    /// The columns, in order, with their declared types.
    #[schemars(with = "IndexMap<String, ColumnSpecInput>")]
    pub schema: Spanned<IndexMap<String, ColumnSpecInput>>,
    /// CSV options.
    #[serde(default)]
    pub csv: Option<CsvOptions>,
    /// Rejected-row limits.
    #[serde(default)]
    pub rejects: Option<RejectsSpec>,
    /// Load only what is new: `{ files: new }` or `{ cursor: COLUMN }` (database sources may
    /// add `overlap: 10min`, re-reading that much before the watermark for late commits).
    #[serde(default)]
    pub incremental: Option<IncrementalSpec>,
    /// How old the newest file may be before `kbcrm freshness` warns or fails,
    /// e.g. `{ warn_after: 26h, error_after: 50h }`.
    #[serde(default)]
    pub freshness: Option<FreshnessSpec>,
    /// What the source is.
    #[serde(default)]
    pub description: Option<String>,
}

/// How a source finds what is new since the last run: exactly one of `files:` and `cursor:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncrementalSpec {
    /// Only files not loaded before (`files: new`).
    #[serde(default)]
    pub files: Option<NewFiles>,
    /// Only rows whose COLUMN is above the highest value loaded before.
    #[serde(default)]
    pub cursor: Option<String>,
    /// Database sources with a timestamp or date cursor: also re-read rows this far below the
    /// watermark (e.g. "10min"), for transactions that committed late; rows read twice are
    /// merged by key. Default none.
    #[serde(default)]
    pub overlap: Option<String>,
}

/// Where a database connection URL comes from.
#[derive(Debug, Clone, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(untagged)]
pub enum ConnectionSpec {
    /// `connection: ERP_DATABASE_URL`: an environment variable.
    Name(String),
    /// `connection: { env: NAME }` or `connection: { file: PATH }`.
    From(ConnectionFrom),
}

/// `{ env: NAME }` or `{ file: PATH }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ConnectionFrom {
    /// An environment variable holding the URL.
    Env(String),
    /// A file (relative to kbcrm.yaml) holding the URL.
    File(String),
}

impl<'de> Deserialize<'de> for ConnectionSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ConnectionSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "the name of an environment variable, `{ env: NAME }` or `{ file: PATH }`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ConnectionSpec::Name(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                ConnectionFrom::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ConnectionSpec::From)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parallel reads of key ranges.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// An integer column (of the declared schema) to split on.
    pub column: String,
    /// Number of ranges read at once (1 to 64).
    pub parts: u32,
}

/// How deletes at a database source are found.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum DeletesSpec {
    /// A column the source sets when it deletes a row (a timestamp, a date or a boolean);
    /// rows where it is set (not null, or true) are marked deleted.
    SoftColumn(String),
    /// Compare all keys with the source at most this often (`always`, or a duration such as
    /// `1d`); keys gone at the source are marked deleted.
    CompareKeys(String),
}

/// The one value of `files:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NewFiles {
    /// Files not loaded before.
    New,
}

/// CSV reading options.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// Field separator: one ASCII character (`","` by default, `";"`, `"|"`, `"\t"`), or
    /// `whitespace`: fields separated by runs of blanks (spaces, tabs), leading and trailing
    /// blanks of a line ignored, each value trimmed.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub delimiter: Option<Spanned<String>>,
    /// Quote character; default '"'.
    #[serde(default)]
    pub quote: Option<char>,
    /// Whether the first line holds the column names; default true.
    #[serde(default)]
    pub header: Option<bool>,
    /// Field values that mean "no value"; default [""].
    #[serde(default)]
    pub null_values: Option<Vec<String>>,
    /// Whether every line ends with a delimiter (`1|2|3|`), which then ends no field. Detected
    /// per file when not given: a header whose last name is empty, or (without a header) a
    /// first line with one more field than declared, the last empty.
    #[serde(default)]
    pub trailing_delimiter: Option<bool>,
    /// Lines at the start of each file to skip before the header (or the first row); default 0.
    #[serde(default)]
    pub skip_rows: Option<u64>,
    /// Lines starting with this character are skipped (e.g. `"#"`); default none.
    #[serde(default)]
    pub comment: Option<char>,
    /// The files' text encoding: `utf-8` (default), `latin1` (ISO-8859-1) or `windows-1252`;
    /// the others are read as UTF-8 after transcoding. A UTF-8 byte-order mark is skipped.
    #[serde(default)]
    pub encoding: Option<TextEncoding>,
}

/// The text encoding of CSV files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
pub enum TextEncoding {
    /// UTF-8.
    #[default]
    #[serde(rename = "utf-8", alias = "utf8")]
    Utf8,
    /// ISO-8859-1: each byte is the character of that number.
    #[serde(rename = "latin1", alias = "iso-8859-1")]
    Latin1,
    /// Windows code page 1252 (Latin-1 with printable characters in 0x80-0x9F).
    #[serde(rename = "windows-1252", alias = "cp1252")]
    Windows1252,
}

/// Limits on rows rejected to quarantine.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectsSpec {
    /// Above this share of rejected rows the run fails and commits nothing (default 0.05).
    pub max_ratio: f64,
}

/// A model entry: a path (or glob) to SQL, or a map with the load mode.
#[derive(Debug, Clone, PartialEq, schemars::JsonSchema)]
#[schemars(untagged)]
pub enum ModelEntry {
    /// `- sql/staging/stg_orders.sql` or `- sql/staging/*.sql`
    Path(String),
    /// `- { path: sql/facts/fact_sales.sql, mode: merge, keys: [order_id, line_no] }`
    Full(Box<ModelSpec>),
}

/// A model with options.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// SQL file (or glob) relative to kbcrm.yaml.
    pub path: String,
    /// overwrite (default) | append | merge
    #[serde(default)]
    pub mode: WriteMode,
    /// Key columns for `mode: merge` and `mode: scd2`.
    #[serde(default)]
    pub keys: Vec<String>,
    /// With `mode: merge`: what is enough to refresh the model after its first build.
    /// `incremental: TABLE` (or a list of tables): the model reads only the rows added to those
    /// tables since its last build (all other tables in full) and merges the result.
    /// `incremental: { key: COLUMN, tables: [A, B] }`: the model rebuilds only the rows of the
    /// keys that appear among the rows added to any of the tables, reading those tables
    /// restricted to these keys (for models that aggregate per key, e.g. payments per invoice).
    #[serde(default)]
    #[schemars(with = "Option<ModelIncrementalInput>")]
    pub incremental: Option<ModelIncrementalSpec>,
    /// Options of `mode: scd2`.
    #[serde(default)]
    pub scd2: Option<Scd2Spec>,
    /// `rollup: true`: the model is a pre-aggregate of its tables (one SELECT of plain columns
    /// and sum/count/min/max over inner joins, grouped by those columns, no WHERE). `kbcrm
    /// query` and `kbcrm serve` answer an aggregate query over the same joins from it when
    /// the query only groups and filters by its columns and it was built from the tables'
    /// current versions; EXPLAIN says which rollup answered, or why none did.
    #[serde(default)]
    pub rollup: bool,
    /// Columns the model's data files are sorted by when written (e.g. `[customer_id]`), so
    /// that a query filtering on them reads only the row groups and pages holding the values
    /// (Parquet statistics). Applied to every write; `kbcrm run --full-refresh` rewrites a
    /// table written before its order was declared.
    #[serde(default)]
    pub cluster_by: Vec<String>,
    /// An SQL expression over the model's columns; each data file holds the rows of one of its
    /// values (e.g. `date_trunc('year', invoice_date)`: a file per year). A merge then rewrites
    /// only the files of the values its changed rows have, and a query filtering on the
    /// underlying column skips the other files. Within a file, rows follow `cluster_by`.
    #[serde(default)]
    pub files_by: Option<String>,
    /// Build the model a slice of its join key at a time when its inputs are large:
    /// `{ by: order_id, rows: 10000000 }` splits every input table with column `order_id`
    /// into slices by a hash of it, at most `rows` rows of the largest such table per slice,
    /// and runs the SQL once per slice, so that a join on that key holds a slice at a time.
    /// Only for SQL whose rows each depend on one key value (joins on the key, no aggregate
    /// across keys); applies when the model is built whole, not to incremental refreshes.
    #[serde(default)]
    pub slices: Option<SlicesSpec>,
}

/// `slices:` of a model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlicesSpec {
    /// The column the slices divide (a join key of the model's large tables).
    pub by: String,
    /// The most rows of the largest sliced table in one slice.
    pub rows: u64,
}

/// What refreshes an incremental model: its driving tables' new rows, optionally widened to
/// every row of the keys those new rows carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIncrementalSpec {
    /// Tables whose added rows drive the refresh.
    pub tables: Vec<String>,
    /// With a key: rebuild every row of the keys among the added rows.
    pub key: Option<String>,
}

/// The accepted spellings of a model's `incremental:` (for the JSON Schema).
#[allow(dead_code)]
#[derive(schemars::JsonSchema)]
#[serde(untagged)]
enum ModelIncrementalInput {
    /// One driving table.
    Table(String),
    /// Several driving tables.
    Tables(Vec<String>),
    /// `{ key: COLUMN, tables: [A, B] }`.
    ByKey(ModelIncrementalByKey),
}

/// `incremental: { key: COLUMN, tables: [A, B] }`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ModelIncrementalByKey {
    /// Column every listed table has; the rows of the keys among the new rows are rebuilt.
    key: String,
    /// The tables whose new rows name the keys to rebuild.
    tables: Vec<String>,
}

impl<'de> Deserialize<'de> for ModelIncrementalSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModelIncrementalSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a table name, a list of table names, or `{ key: COLUMN, tables: [A, B] }`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ModelIncrementalSpec {
                    tables: vec![v.to_string()],
                    key: None,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let tables =
                    Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(ModelIncrementalSpec { tables, key: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let k =
                    ModelIncrementalByKey::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ModelIncrementalSpec {
                    tables: k.tables,
                    key: Some(k.key),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Options of a type-2 slowly changing dimension.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Scd2Spec {
    /// Columns whose change opens a new version; other columns are updated in place.
    pub tracked: Vec<String>,
    /// Column holding when a change took effect; default the time of the run. A key's first
    /// version is valid from 1900-01-01.
    #[serde(default)]
    pub valid_from: Option<String>,
    /// Name of a surrogate key column (bigint, one per version) to add.
    #[serde(default)]
    pub surrogate_key: Option<String>,
}

/// Identity resolution of one entity (e.g. `customer`).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// Table of `(source, source_id, <entity>_id, rule, matched_at)`; default `map_<entity>_identity`.
    #[serde(default)]
    pub map: Option<String>,
    /// Table of one merged ("golden") record per entity id; default `int_<entity>_golden`.
    #[serde(default)]
    pub golden: Option<String>,
    /// Prefix of new ids; default the entity's first letter in upper case.
    #[serde(default)]
    pub id_prefix: Option<String>,
    /// The records to match, by source system name.
    pub records: IndexMap<String, IdentityRecords>,
    /// Match rules in priority order; records that agree on all `on:` fields (normalised,
    /// not null) are the same entity.
    pub rules: Vec<MatchRule>,
    /// How each field is normalised before matching: email | phone | tax_id | name | text.
    #[serde(default)]
    pub normalize: IndexMap<String, Normalizer>,
    /// Default country calling code for phone numbers written without one (e.g. "49").
    #[serde(default)]
    pub default_country_code: Option<String>,
    /// Which record's value each golden field takes.
    #[serde(default)]
    pub survivorship: IndexMap<String, Survivorship>,
    /// A match key shared by more records than this is ignored (a shared mailbox or switchboard
    /// number); default 20.
    #[serde(default)]
    pub max_group: Option<usize>,
}

/// Records of one source system.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityRecords {
    /// The table holding them.
    pub table: String,
    /// Column with the record's id in that system.
    pub id: String,
    /// Column saying when the record last changed (for `most_recent`).
    #[serde(default)]
    pub updated_at: Option<String>,
    /// Golden field name -> column of this table.
    pub fields: IndexMap<String, String>,
}

/// A match rule.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    /// Name shown in the map's `rule` column and the match-rate report.
    pub name: String,
    /// Fields that must all be equal (after normalisation).
    pub on: Vec<String>,
}

/// Field normalisers for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Normalizer {
    /// Trimmed and lower-cased.
    Email,
    /// E.164: digits with a leading +, national numbers given the default country code.
    Phone,
    /// Letters and digits only, upper-cased.
    TaxId,
    /// Lower-cased, accents folded, punctuation and legal forms (GmbH, AG, Ltd, Inc) removed.
    Name,
    /// Trimmed and lower-cased.
    Text,
}

/// Survivorship of one golden field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Survivorship {
    /// The first non-null value by source order.
    Prefer(Vec<String>),
    /// The value of the most recently updated record.
    MostRecent,
    /// The largest value.
    Max,
    /// The smallest value.
    Min,
}

impl<'de> Deserialize<'de> for ModelEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ModelEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path to a .sql file, or a map with `path:`, `mode:`, `keys:`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ModelEntry::Path(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                ModelSpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|m| ModelEntry::Full(Box::new(m)))
            }
        }
        d.deserialize_any(V)
    }
}

/// How bad a failed data test is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Fail the run; nothing is committed.
    #[default]
    Error,
    /// Report and go on.
    Warn,
}

/// A data test, checked on the run's output before commit.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TestSpec {
    /// No two rows share these columns' values.
    Unique(ColumnsTest),
    /// These columns have no nulls.
    NotNull(ColumnsTest),
    /// The column only holds the listed values.
    AcceptedValues(AcceptedValuesTest),
    /// Every value of the column exists in another table's column.
    Relationships(RelationshipsTest),
    /// A query that must return no rows.
    Sql(SqlTest),
}

/// Test over columns of one table.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnsTest {
    /// The table.
    pub table: String,
    /// The columns.
    pub columns: Vec<String>,
    /// error (default) | warn
    #[serde(default)]
    pub severity: Severity,
}

/// `accepted_values` test.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptedValuesTest {
    /// The table.
    pub table: String,
    /// The column.
    pub column: String,
    /// The values allowed (compared as text).
    pub values: Vec<String>,
    /// error (default) | warn
    #[serde(default)]
    pub severity: Severity,
}

/// `relationships` test.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelationshipsTest {
    /// The referencing table.
    pub table: String,
    /// The referencing column.
    pub column: String,
    /// `table.column` referenced.
    pub to: String,
    /// error (default) | warn
    #[serde(default)]
    pub severity: Severity,
}

/// A custom SQL assertion.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlTest {
    /// A name for reports.
    pub name: String,
    /// A SELECT that returns the offending rows; the test passes when it returns none.
    pub query: String,
    /// error (default) | warn
    #[serde(default)]
    pub severity: Severity,
}
