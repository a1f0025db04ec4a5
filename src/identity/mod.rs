//! Identity resolution: the records of one entity from several systems, matched by rules in
//! priority order into one id per real-world entity.
//!
//! Matching is transitive (union-find): records that agree on all fields of any rule, after
//! normalisation, are one entity. Ids are stable: a cluster keeps the smallest id any of its
//! records had before, so a customer resolved once keeps its id in every later run. The
//! merged ("golden") record is plain SQL generated from the survivorship rules, so it can be read
//! and is typed like its inputs.
//!
//! A stage: may import `warehouse`, `engine`, `plan`, `config` and the leaves; `run` calls it.

pub mod normalize;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::prelude::SessionContext;

use crate::config::pipeline::{Normalizer, Survivorship};
use crate::config::types::UTC;
use crate::error::{Error, Result};
use crate::plan::{Identity, RecordSource};
use crate::sql::{column_list, quote_ident};
use crate::warehouse::delta_compatible_batch;

/// What the identity map held before a resolution, as [`Identity`]'s `assign` reads it.
struct Before<'a> {
    /// The map (or, narrowed, the match-key table).
    existing: &'a Existing,
    /// Each record's row of `existing`, if it had one.
    known: Vec<Option<MapRow>>,
    /// Records the figures count before this resolution.
    records: usize,
}

/// What a resolution found.
#[derive(Debug, Clone, Default)]
pub struct IdentityStats {
    /// Entity name.
    pub entity: String,
    /// Records read.
    pub records: usize,
    /// Distinct ids they resolve to.
    pub entities: usize,
    /// Records that joined their id by each rule, in rule order; records matching nothing are
    /// counted under "unmatched".
    pub by_rule: Vec<(String, usize)>,
    /// Ids created in this run.
    pub new_ids: usize,
    /// Ids that disappeared because new data showed two of them are one entity.
    pub merged_ids: usize,
    /// Match keys ignored for joining more records than `max_group`.
    pub oversized_groups: usize,
}

impl fmt::Display for IdentityStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identity {}: {} records -> {} {}s ({} new, {} merged)",
            self.entity, self.records, self.entities, self.entity, self.new_ids, self.merged_ids
        )?;
        let parts: Vec<String> = self
            .by_rule
            .iter()
            .map(|(r, n)| {
                let pct = if self.records == 0 {
                    0.0
                } else {
                    100.0 * *n as f64 / self.records as f64
                };
                format!("{r} {n} ({pct:.1}%)")
            })
            .collect();
        write!(f, "; matched by {}", parts.join(", "))?;
        if self.oversized_groups > 0 {
            write!(
                f,
                "; {} oversized match keys ignored",
                self.oversized_groups
            )?;
        }
        Ok(())
    }
}

/// The outcome of a resolution.
pub struct Resolution {
    /// The map's rows: all of them when `whole`, otherwise those to merge into it (on source
    /// and source_id), each new or different from the map's row of its record.
    pub map: RecordBatch,
    /// The match-key table's rows, whole or to merge as the map's (each new or different too).
    pub keys: RecordBatch,
    /// Whether `map` and `keys` replace the tables rather than merge into them.
    pub whole: bool,
    /// The id of every record matched (with `whole`, every record), to name the ids of
    /// given records.
    pub record_ids: RecordIds,
    /// What it found.
    pub stats: IdentityStats,
    /// The ids whose set of records changed, or `None` when a record disappeared, so the golden
    /// records are rebuilt whole.
    pub regrouped: Option<Regrouped>,
}

/// The ids a resolution regrouped.
#[derive(Debug, Default, PartialEq)]
pub struct Regrouped {
    /// Ids that gained or lost records (a new record, or one that moved to another id).
    pub changed: HashSet<String>,
    /// Ids left without records (merged into another id): their golden records go.
    pub gone: HashSet<String>,
}

/// Which ids gained or lost records, and which have none left, given each record's id now and
/// before (when it had one), and how many records the map held before.
fn regrouped_ids<'a>(
    records_before: usize,
    ids: &[&'a str],
    before: impl Iterator<Item = Option<&'a str>>,
) -> Option<Regrouped> {
    let mut changed: HashSet<&str> = HashSet::new();
    let mut kept = 0;
    for (&now, old) in ids.iter().zip(before) {
        match old {
            Some(old) => {
                kept += 1;
                if old != now {
                    changed.insert(old);
                    changed.insert(now);
                }
            }
            None => {
                changed.insert(now);
            }
        }
    }
    if kept != records_before {
        return None;
    }
    let ids_now: HashSet<&str> = ids.iter().copied().collect();
    let mut out = Regrouped::default();
    for id in changed {
        match ids_now.contains(id) {
            true => out.changed.insert(id.to_string()),
            false => out.gone.insert(id.to_string()),
        };
    }
    Some(out)
}

/// Schema of the map table.
pub fn map_schema(id_column: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("source_id", DataType::Utf8, false),
        Field::new(id_column, DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new(
            "matched_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC))),
            false,
        ),
    ]))
}

/// A span of [`Records::text`].
type Span = (usize, usize);

/// One record: its source (by index), its id and where its keys are.
struct Rec {
    source: usize,
    id: Span,
    /// Index of its key under the first rule in [`Records::keys`].
    keys: usize,
}

/// A record's key under one rule: the 128-bit xxh3 hash of its normalised fields. Records
/// agree on a rule when their keys are equal; two different field values share a hash with odds
/// of about n²/2¹²⁹ among n values (1 in 10²² for 10⁹ values).
type Key = u128;

/// A key as the two 64-bit halves the match-key table stores.
fn split_key(key: Key) -> (i64, i64) {
    ((key >> 64) as u64 as i64, key as u64 as i64)
}

/// The key of the two halves [`split_key`] made.
fn join_key(hi: i64, lo: i64) -> Key {
    ((hi as u64 as Key) << 64) | lo as u64 as Key
}

/// The two halves of rule `rule`'s keys in a batch of the match-key table.
fn key_halves(
    batch: &RecordBatch,
    rule: usize,
) -> (&arrow::array::Int64Array, &arrow::array::Int64Array) {
    let half = |h: usize| {
        batch
            .column(4 + 2 * rule + h)
            .as_primitive::<arrow::datatypes::Int64Type>()
    };
    (half(0), half(1))
}

/// Row `i`'s key from [`key_halves`], when it has one.
fn key_at(
    (hi, lo): (&arrow::array::Int64Array, &arrow::array::Int64Array),
    i: usize,
) -> Option<Key> {
    (hi.is_valid(i) && lo.is_valid(i)).then(|| join_key(hi.value(i), lo.value(i)))
}

/// The key of normalised field values (joined by a unit separator when a rule has several).
fn key_of<'a>(mut values: impl Iterator<Item = &'a str>, buf: &mut String) -> Key {
    buf.clear();
    if let Some(first) = values.next() {
        buf.push_str(first);
    }
    for v in values {
        buf.push('\u{1f}');
        buf.push_str(v);
    }
    twox_hash::XxHash3_128::oneshot(buf.as_bytes())
}

/// Every record's id and its key under each rule, ids as spans of one text: hundreds of
/// thousands of records cost a few allocations instead of several each.
#[derive(Default)]
struct Records {
    text: String,
    recs: Vec<Rec>,
    /// Keys, one per rule for each record, in rule order (`None`: a field is missing).
    keys: Vec<Option<Key>>,
    /// Rows skipped for having no id.
    without_id: usize,
}

impl Records {
    fn push_text(&mut self, s: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(s);
        (start, self.text.len())
    }

    fn str(&self, (start, end): Span) -> &str {
        &self.text[start..end]
    }

    /// Add a record of source `si` with these keys.
    fn push(&mut self, si: usize, id: &str, keys: impl IntoIterator<Item = Option<Key>>) {
        let id = self.push_text(id);
        let at = self.keys.len();
        self.keys.extend(keys);
        self.recs.push(Rec {
            source: si,
            id,
            keys: at,
        });
    }

    /// Append the records of `part` (loaded on their own) after these.
    fn append(&mut self, part: Records) {
        let shift = self.text.len();
        let keys = self.keys.len();
        self.text.push_str(&part.text);
        self.keys.extend(part.keys);
        self.without_id += part.without_id;
        self.recs.extend(part.recs.into_iter().map(|r| Rec {
            source: r.source,
            id: (r.id.0 + shift, r.id.1 + shift),
            keys: r.keys + keys,
        }));
    }

    fn id(&self, r: &Rec) -> &str {
        self.str(r.id)
    }

    /// The record's key under rule `rule`.
    fn key(&self, r: &Rec, rule: usize) -> Option<Key> {
        self.keys[r.keys + rule]
    }

    /// Sort by source priority, then id; a source's id repeated keeps its first record.
    fn sort_and_dedup(&mut self) {
        let mut recs = std::mem::take(&mut self.recs);
        recs.sort_by(|a, b| (a.source, self.id(a)).cmp(&(b.source, self.id(b))));
        recs.dedup_by(|a, b| a.source == b.source && self.id(a) == self.id(b));
        self.recs = recs;
    }
}

/// Rows of an earlier resolution: the map's (source, source_id, id, rule, matched_at), or the
/// match-key table's (source, source_id, id, rule, then a key per rule).
struct Existing {
    batches: Vec<RecordBatch>,
    /// Largest number among the ids made by this resolution.
    largest: u64,
}

/// One row of the existing map: (batch, row).
type MapRow = (usize, usize);

impl Existing {
    /// The rows of `sql` (none when `table` does not exist), noting the largest id number.
    async fn read(
        identity: &Identity,
        ctx: &SessionContext,
        table: &str,
        sql: &str,
    ) -> Result<Self> {
        let mut out = Existing {
            batches: Vec::new(),
            largest: 0,
        };
        if !ctx.table_exist(table)? {
            return Ok(out);
        }
        for batch in ctx.sql(sql).await?.collect().await? {
            let batch = delta_compatible_batch(&batch)?;
            let id = batch.column(2).as_string::<i32>();
            for i in 0..batch.num_rows() {
                if let Some(n) = identity.id_number(id.value(i)) {
                    out.largest = out.largest.max(n);
                }
            }
            out.batches.push(batch);
        }
        Ok(out)
    }

    fn text(&self, (b, i): MapRow, column: usize) -> &str {
        self.batches[b].column(column).as_string::<i32>().value(i)
    }

    fn id(&self, row: MapRow) -> &str {
        self.text(row, 2)
    }

    fn rule(&self, row: MapRow) -> &str {
        self.text(row, 3)
    }

    fn matched_at(&self, (b, i): MapRow) -> i64 {
        self.batches[b]
            .column(4)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .value(i)
    }

    /// A row's key of rule `rule`, when `self` is the match-key table.
    fn key(&self, (b, i): MapRow, rule: usize) -> Option<Key> {
        key_at(key_halves(&self.batches[b], rule), i)
    }

    /// Per record source (by index): record id -> its row. Records of a source no longer
    /// declared keep no id.
    fn index(&self, sources: &[RecordSource]) -> Vec<FastMap<&str, MapRow>> {
        let mut out: Vec<FastMap<&str, MapRow>> = vec![FastMap::default(); sources.len()];
        let source_index: HashMap<&str, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        for (b, batch) in self.batches.iter().enumerate() {
            let s = batch.column(0).as_string::<i32>();
            let sid = batch.column(1).as_string::<i32>();
            for i in 0..batch.num_rows() {
                if let Some(&si) = source_index.get(s.value(i)) {
                    out[si].insert(sid.value(i), (b, i));
                }
            }
        }
        out
    }
}

/// DataFusion's hash map (hashbrown with a fast hasher), for the large maps of matching.
type FastMap<K, V> = datafusion::common::HashMap<K, V>;

/// DataFusion's hash set, as [`FastMap`].
type FastSet<T> = datafusion::common::HashSet<T>;

/// The records' groups under one rule: each record's group (none without a key), and each
/// group's first record and size.
struct Grouping {
    group_of: Vec<Option<usize>>,
    groups: Vec<(usize, usize)>,
}

/// The groups of the records that agree on rule `rule`.
fn group_by_key(records: &Records, rule: usize) -> Grouping {
    let mut group_of_key: FastMap<Key, usize> = FastMap::default();
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let group_of = records
        .recs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let key = records.key(r, rule)?;
            let g = *group_of_key.entry(key).or_insert_with(|| {
                groups.push((i, 0));
                groups.len() - 1
            });
            groups[g].1 += 1;
            Some(g)
        })
        .collect();
    Grouping { group_of, groups }
}

/// `f` of each of `0..n`, on up to `threads` threads, in order.
fn run_split<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return (0..n).map(&f).collect();
    }
    let f = &f;
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|i| (i, f(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let done = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            for (i, v) in done {
                out[i] = Some(v);
            }
        }
    });
    out.into_iter()
        .map(|v| v.expect("every part was run"))
        .collect()
}

struct UnionFind(Vec<usize>);

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.0[hi] = lo;
        }
    }
}

/// A text column of `value` at each of `rows`.
fn strings<'a>(rows: &[usize], value: impl Fn(usize) -> &'a str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(
        rows.iter().map(|&i| value(i)),
    ))
}

/// What changed in the record tables since the last resolution, for a resolution that
/// normalises only those rows and takes every other record's keys from the match-key table.
#[derive(Clone)]
pub struct Since {
    /// Per record source (in declaration order), a table of the rows added to its table since
    /// the last resolution (new records, and new versions of changed ones).
    pub added: Vec<String>,
    /// Per record source, the rows its table held when the last resolution read it.
    pub rows_then: Vec<u64>,
    /// Per record source, the rows its table holds now.
    pub rows_now: Vec<u64>,
    /// The last resolution's figures, recorded with its tables ([`IdentityStats::last`]).
    pub last: Option<LastFigures>,
}

/// The figures of a resolution the match-key table does not give without grouping all of
/// it, recorded with the tables: the next resolution of added rows changes them by what it
/// changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastFigures {
    /// Distinct ids.
    pub entities: usize,
    /// Match keys joining more records than `max_group`.
    pub oversized_groups: usize,
}

impl IdentityStats {
    /// The figures to record for the next resolution.
    pub fn last(&self) -> LastFigures {
        LastFigures {
            entities: self.entities,
            oversized_groups: self.oversized_groups,
        }
    }
}

/// Every record's source, id and entity id, to find the ids of given records.
pub struct RecordIds {
    source: Vec<usize>,
    record: StringArray,
    id: StringArray,
}

impl RecordIds {
    /// The map's (source, source_id, id) rows of the records whose id is one of `ids`. Every
    /// record of an id a resolution gives or changes is among its records, so these are the
    /// map's rows of those ids.
    pub fn map_rows(&self, identity: &Identity, ids: &HashSet<String>) -> Result<RecordBatch> {
        let rows: Vec<usize> = (0..self.source.len())
            .filter(|&i| ids.contains(self.id.value(i)))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("source", DataType::Utf8, false),
            Field::new("source_id", DataType::Utf8, false),
            Field::new(identity.id_column.as_str(), DataType::Utf8, false),
        ]));
        let sources = strings(&rows, |i| identity.sources[self.source[i]].name.as_str());
        let records = strings(&rows, |i| self.record.value(i));
        let ids = strings(&rows, |i| self.id.value(i));
        RecordBatch::try_new(schema, vec![sources, records, ids])
            .map_err(|e| Error::Internal(format!("identity map rows: {e}")))
    }

    /// The entity ids of the records whose ids are in `records[source]`, per source index;
    /// `None` when one of them is not among these records (a resolution of added rows holds
    /// only the records they reach).
    pub fn ids_of(&self, records: &[HashSet<String>]) -> Option<HashSet<String>> {
        let mut found = 0;
        let ids = (0..self.source.len())
            .filter(|&i| {
                records
                    .get(self.source[i])
                    .is_some_and(|r| r.contains(self.record.value(i)))
            })
            .inspect(|_| found += 1)
            .map(|i| self.id.value(i).to_string())
            .collect();
        (found == records.iter().map(HashSet::len).sum::<usize>()).then_some(ids)
    }
}

/// The version of how match keys are made (normalised, joined, hashed) in the match-key table:
/// a change makes the next run match every record again instead of reading old keys.
const MATCH_KEYS_FORMAT: u32 = 1;

impl Identity {
    /// Fields used by match rules.
    fn match_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = self.rules.iter().flat_map(|(_, f)| f.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Each rule's fields, as positions in [`Identity::match_fields`].
    fn rule_fields(&self) -> Vec<Vec<usize>> {
        let fields = self.match_fields();
        self.rules
            .iter()
            .map(|(_, on)| {
                on.iter()
                    .filter_map(|f| fields.iter().position(|g| g == f))
                    .collect()
            })
            .collect()
    }

    /// kbcrm's table of every record's id and match keys, written with the map: the next
    /// resolution reads the keys of unchanged records from it instead of normalising them again.
    pub fn keys_table(&self) -> String {
        format!("kbcrm_keys_{}", self.map_table)
    }

    /// Everything the map and the golden records depend on besides the record tables.
    pub fn definition(&self) -> String {
        let mut normalize: Vec<String> = self
            .normalize
            .iter()
            .map(|(f, n)| format!("{f}: {n:?}"))
            .collect();
        normalize.sort();
        format!(
            "{:?}\nnormalize {normalize:?} country code {} max group {} match keys v{MATCH_KEYS_FORMAT}\n{}",
            self.rules,
            self.default_cc,
            self.max_group,
            self.golden_sql()
        )
    }

    /// Schema of the match-key table: the map's record and id columns, then one key per rule
    /// (its high and low 64 bits, both null when the record lacks a field of the rule).
    fn keys_schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new("source", DataType::Utf8, false),
            Field::new("source_id", DataType::Utf8, false),
            Field::new(self.id_column.as_str(), DataType::Utf8, false),
            Field::new("rule", DataType::Utf8, false),
        ];
        for r in 0..self.rules.len() {
            for half in ["hi", "lo"] {
                fields.push(Field::new(format!("key_{r}_{half}"), DataType::Int64, true));
            }
        }
        Arc::new(Schema::new(fields))
    }

    /// The records of each source read from `tables` (one per source, in order), their match
    /// fields normalised into keys: the queries run side by side, and each source's values are
    /// normalised on a thread of its own (up to `threads`).
    async fn load_records(
        &self,
        ctx: &SessionContext,
        threads: usize,
        tables: &[&str],
    ) -> Result<Records> {
        let fields = self.match_fields();
        let hows: Vec<Normalizer> = fields
            .iter()
            .map(|f| self.normalize.get(f).copied().unwrap_or(Normalizer::Text))
            .collect();
        let rule_fields = self.rule_fields();
        let queries = self.sources.iter().zip(tables).map(|(s, table)| {
            let cols: Vec<String> = fields
                .iter()
                .enumerate()
                .map(|(i, f)| match s.fields.iter().find(|(g, _)| g == f) {
                    Some((_, c)) => format!("cast({} as varchar) as f{i}", quote_ident(c)),
                    None => format!("cast(null as varchar) as f{i}"),
                })
                .collect();
            let sql = format!(
                "select cast({} as varchar) as id, {} from {}",
                quote_ident(&s.id),
                cols.join(", "),
                quote_ident(table)
            );
            async move { Ok::<_, Error>(ctx.sql(&sql).await?.collect().await?) }
        });
        let per_source = futures::future::try_join_all(queries).await?;
        let parts: Vec<Result<Records>> = run_split(per_source.len(), threads, |si| {
            self.source_records(si, &per_source[si], &hows, &rule_fields)
        });
        let mut out = Records::default();
        for part in parts {
            out.append(part?);
        }
        Ok(out)
    }

    /// The records of source `si` in its query's batches, with their key under each rule.
    fn source_records(
        &self,
        si: usize,
        batches: &[RecordBatch],
        hows: &[Normalizer],
        rule_fields: &[Vec<usize>],
    ) -> Result<Records> {
        let mut out = Records::default();
        let mut normalised: Vec<Option<String>> = vec![None; hows.len()];
        let mut buf = String::new();
        for batch in batches {
            let batch = delta_compatible_batch(batch)?;
            let ids = batch.column(0).as_string::<i32>();
            let values: Vec<&StringArray> = (1..batch.num_columns())
                .map(|i| batch.column(i).as_string::<i32>())
                .collect();
            for row in 0..batch.num_rows() {
                if ids.is_null(row) {
                    out.without_id += 1;
                    continue;
                }
                for ((col, how), slot) in values.iter().zip(hows).zip(normalised.iter_mut()) {
                    *slot = col
                        .is_valid(row)
                        .then(|| normalize::normalize(*how, col.value(row), &self.default_cc))
                        .flatten();
                }
                let keys = rule_fields.iter().map(|on| {
                    on.iter().all(|f| normalised[*f].is_some()).then(|| {
                        key_of(
                            on.iter()
                                .map(|f| normalised[*f].as_deref().unwrap_or_default()),
                            &mut buf,
                        )
                    })
                });
                let keys: Vec<Option<Key>> = keys.collect();
                out.push(si, ids.value(row), keys);
            }
        }
        Ok(out)
    }

    /// The number in an id made by this resolution (`C00000042` -> 42).
    fn id_number(&self, id: &str) -> Option<u64> {
        id.strip_prefix(&self.id_prefix)
            .and_then(|n| n.parse::<u64>().ok())
    }

    /// Match the records and assign their ids. With `since`, only the rows added since the last
    /// resolution are read and normalised, and every other record's keys come from the
    /// match-key table; when that table cannot stand for the record tables (a record was
    /// removed, an id repeats), every record is read.
    pub async fn resolve(
        &self,
        ctx: &SessionContext,
        now_micros: i64,
        since: Option<&Since>,
    ) -> Result<Resolution> {
        let started = std::time::Instant::now();
        let threads = ctx.state().config().target_partitions().max(1);
        if let Some(since) = since {
            match self.resolve_since(ctx, now_micros, since, threads).await? {
                Ok(resolution) => return Ok(resolution),
                Err(reason) => {
                    tracing::info!(entity = %self.entity, %reason, "matching every record again")
                }
            }
        }
        let tables: Vec<&str> = self.sources.iter().map(|s| s.table.as_str()).collect();
        let map_sql = format!(
            "select source, source_id, {}, rule, matched_at from {}",
            quote_ident(&self.id_column),
            quote_ident(&self.map_table)
        );
        // The existing map is read while the records load.
        let (mut records, existing) = futures::future::try_join(
            self.load_records(ctx, threads, &tables),
            Existing::read(self, ctx, &self.map_table, &map_sql),
        )
        .await?;
        tracing::debug!(
            records = records.recs.len(),
            seconds = started.elapsed().as_secs_f64(),
            "identity: records loaded"
        );
        // Deterministic order: by source priority, then id.
        records.sort_and_dedup();
        let index = existing.index(&self.sources);
        let known: Vec<Option<MapRow>> = records
            .recs
            .iter()
            .map(|r| index[r.source].get(records.id(r)).copied())
            .collect();
        let records_before = index.iter().map(FastMap::len).sum();
        drop(index);
        let before = Before {
            existing: &existing,
            known,
            records: records_before,
        };
        self.assign(records, before, None, now_micros, threads)
    }

    /// The resolution of [`Identity::resolve`] with `since`, or why it cannot be made so.
    ///
    /// Only the records an added row can affect are matched again: those sharing a key, old or
    /// new, with an added record, and every record of their ids. A key outside those records
    /// keeps its group, so the clusters of every other record stand. Each key's group size is
    /// counted over the whole match-key table (a group may grow past `max_group`, or shrink
    /// under it), and the figures of the whole resolution are the last resolution's, changed by
    /// what changed among these records.
    async fn resolve_since(
        &self,
        ctx: &SessionContext,
        now_micros: i64,
        since: &Since,
        threads: usize,
    ) -> Result<std::result::Result<Resolution, String>> {
        let started = std::time::Instant::now();
        let keys_table = self.keys_table();
        if !ctx.table_exist(keys_table.as_str())? {
            return Ok(Err(format!("no match-key table '{keys_table}' yet")));
        }
        let Some(last) = since.last else {
            return Ok(Err("no figures of the last resolution recorded".into()));
        };
        let keys_sql = format!(
            "select {} from {}",
            column_list(self.keys_schema().fields().iter().map(|f| f.name())),
            quote_ident(&keys_table)
        );
        let tables: Vec<&str> = since.added.iter().map(String::as_str).collect();
        let (mut added, existing) = futures::future::try_join(
            self.load_records(ctx, threads, &tables),
            Existing::read(self, ctx, &keys_table, &keys_sql),
        )
        .await?;
        if added.without_id > 0 {
            return Ok(Err(format!("{} added rows have no id", added.without_id)));
        }
        let loaded = added.recs.len();
        added.sort_and_dedup();
        if added.recs.len() != loaded {
            return Ok(Err("an id repeats among the added rows".into()));
        }
        tracing::debug!(
            added = loaded,
            seconds = started.elapsed().as_secs_f64(),
            "identity: match-key table read, added records loaded"
        );
        let rules = self.rules.len();
        let source_index: HashMap<&str, usize> = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let rule_index: HashMap<&str, usize> = self
            .rules
            .iter()
            .map(|(name, _)| name.as_str())
            .chain(std::iter::once("unmatched"))
            .enumerate()
            .map(|(i, name)| (name, i))
            .collect();
        let added_at: FastMap<(usize, &str), usize> = added
            .recs
            .iter()
            .enumerate()
            .map(|(j, r)| ((r.source, added.id(r)), j))
            .collect();
        // Every row: its source counted, its rule counted, and the rows of added records (new
        // versions of changed ones) found.
        let mut held = vec![0usize; self.sources.len()];
        let mut rules_then = vec![0usize; rules + 1];
        let mut old_of_added: Vec<Option<MapRow>> = vec![None; loaded];
        for (b, batch) in existing.batches.iter().enumerate() {
            let source = batch.column(0).as_string::<i32>();
            let record = batch.column(1).as_string::<i32>();
            let rule = batch.column(3).as_string::<i32>();
            for i in 0..batch.num_rows() {
                let Some(&si) = source_index.get(source.value(i)) else {
                    return Ok(Err(format!(
                        "the match-key table holds records of source '{}', which is not declared",
                        source.value(i)
                    )));
                };
                let Some(&ri) = rule_index.get(rule.value(i)) else {
                    return Ok(Err(format!(
                        "the match-key table holds rule '{}', which is not declared",
                        rule.value(i)
                    )));
                };
                held[si] += 1;
                rules_then[ri] += 1;
                if let Some(&j) = added_at.get(&(si, record.value(i))) {
                    old_of_added[j] = Some((b, i));
                }
            }
        }
        drop(added_at);
        // The record tables must hold exactly the records the table holds plus the new ones: a
        // record that went would otherwise keep its id.
        for (si, s) in self.sources.iter().enumerate() {
            let new = added
                .recs
                .iter()
                .zip(&old_of_added)
                .filter(|(r, old)| r.source == si && old.is_none())
                .count();
            if since.rows_then[si] != held[si] as u64
                || since.rows_now[si] != (held[si] + new) as u64
            {
                return Ok(Err(format!(
                    "table '{}' held {} rows and holds {} now, but the map had {} of its records \
                     and {new} are new (a record was removed, or rows repeat an id or have none)",
                    s.table, since.rows_then[si], since.rows_now[si], held[si]
                )));
            }
        }
        // The keys whose groups change: the added records' keys and their old rows' keys.
        let mut touched: Vec<FastSet<Key>> = vec![FastSet::default(); rules];
        for (j, r) in added.recs.iter().enumerate() {
            for (ri, keys) in touched.iter_mut().enumerate() {
                keys.extend(added.key(r, ri));
                keys.extend(old_of_added[j].and_then(|row| existing.key(row, ri)));
            }
        }
        // The ids of every record in those groups, and of the added records' old rows; then
        // every record of those ids, in the table's order.
        let mut ids: FastSet<&str> = old_of_added
            .iter()
            .flatten()
            .map(|&row| existing.id(row))
            .collect();
        for (b, batch) in existing.batches.iter().enumerate() {
            let halves: Vec<_> = (0..rules).map(|ri| key_halves(batch, ri)).collect();
            for i in 0..batch.num_rows() {
                let in_group = halves
                    .iter()
                    .zip(&touched)
                    .any(|(h, keys)| key_at(*h, i).is_some_and(|k| keys.contains(&k)));
                if in_group {
                    ids.insert(existing.id((b, i)));
                }
            }
        }
        drop(touched);
        let mut rows: Vec<MapRow> = Vec::new();
        for (b, batch) in existing.batches.iter().enumerate() {
            let id = batch.column(2).as_string::<i32>();
            rows.extend(
                (0..batch.num_rows())
                    .filter(|&i| ids.contains(id.value(i)))
                    .map(|i| (b, i)),
            );
        }
        // The size of each of these records' groups, old and new, over the whole table.
        let mut sizes: Vec<FastMap<Key, (usize, usize)>> = vec![FastMap::default(); rules];
        for (ri, keys) in sizes.iter_mut().enumerate() {
            for &row in &rows {
                keys.extend(existing.key(row, ri).map(|k| (k, (0, 0))));
            }
            for r in &added.recs {
                keys.extend(added.key(r, ri).map(|k| (k, (0, 0))));
            }
        }
        for batch in &existing.batches {
            for (ri, keys) in sizes.iter_mut().enumerate() {
                let h = key_halves(batch, ri);
                for i in 0..batch.num_rows() {
                    if let Some(size) = key_at(h, i).and_then(|k| keys.get_mut(&k)) {
                        size.0 += 1;
                    }
                }
            }
        }
        for (ri, keys) in sizes.iter_mut().enumerate() {
            for size in keys.values_mut() {
                size.1 = size.0;
            }
            for (j, r) in added.recs.iter().enumerate() {
                if let Some(k) = old_of_added[j].and_then(|row| existing.key(row, ri)) {
                    keys.get_mut(&k).expect("an old row's key is counted").1 -= 1;
                }
                if let Some(k) = added.key(r, ri) {
                    keys.get_mut(&k).expect("an added key is counted").1 += 1;
                }
            }
        }
        // Groups past `max_group` before and after: only these keys' groups changed size.
        let oversized = |then: bool| {
            sizes
                .iter()
                .flat_map(|keys| keys.values())
                .filter(|&&(before, after)| (if then { before } else { after }) > self.max_group)
                .count()
        };
        let Some(oversized_now) =
            (last.oversized_groups + oversized(false)).checked_sub(oversized(true))
        else {
            return Ok(Err(
                "the recorded figures do not fit the match-key table".into()
            ));
        };
        // The records to match: those rows, less the old rows of added records, which are
        // replaced by their new rows (which keep their old row, for their id).
        let replaced: FastSet<MapRow> = old_of_added.iter().flatten().copied().collect();
        let mut records = Records::default();
        let mut known: Vec<Option<MapRow>> = Vec::with_capacity(rows.len() + loaded);
        for &row in &rows {
            if replaced.contains(&row) {
                continue;
            }
            let (b, i) = row;
            let si = source_index[existing.batches[b].column(0).as_string::<i32>().value(i)];
            let record = existing.batches[b].column(1).as_string::<i32>().value(i);
            records.push(si, record, (0..rules).map(|ri| existing.key(row, ri)));
            known.push(Some(row));
        }
        tracing::debug!(
            records = records.recs.len() + loaded,
            added = loaded,
            ids = ids.len(),
            seconds = started.elapsed().as_secs_f64(),
            "identity: records the added rows reach found"
        );
        let first_added = records.recs.len();
        records.append(added);
        known.extend(old_of_added);
        let sizes: Vec<FastMap<Key, usize>> = sizes
            .into_iter()
            .map(|keys| keys.into_iter().map(|(k, (_, now))| (k, now)).collect())
            .collect();
        let before = Before {
            existing: &existing,
            known,
            records: rows.len(),
        };
        let mut resolution = self.assign(
            records,
            before,
            Some((first_added, &sizes)),
            now_micros,
            threads,
        )?;
        // The whole table's figures: the last resolution's, less these records' then, plus
        // theirs now.
        let stats = &mut resolution.stats;
        let records_then: usize = held.iter().sum();
        stats.records += records_then - rows.len();
        let Some(entities_left) = last.entities.checked_sub(ids.len()) else {
            return Ok(Err(
                "the recorded figures do not fit the match-key table".into()
            ));
        };
        stats.entities += entities_left;
        stats.oversized_groups = oversized_now;
        for &row in &rows {
            rules_then[rule_index[existing.rule(row)]] -= 1;
        }
        for ((_, n), then) in stats.by_rule.iter_mut().zip(rules_then) {
            *n += then;
        }
        Ok(Ok(resolution))
    }

    /// Join the records rule by rule and give each cluster its id: the smallest its records had
    /// (`known`: each record's row of `existing`), or a new one. With `narrowed`, `existing`
    /// is the match-key table, the records are those an added row can affect (from the first
    /// index given on, the added ones), each key's group has the size given (over every
    /// record), and the map and key rows returned are only those that change; the figures are
    /// then those of these records. Otherwise `existing` is the map and both tables are
    /// returned whole.
    fn assign(
        &self,
        records: Records,
        before: Before<'_>,
        narrowed: Option<(usize, &[FastMap<Key, usize>])>,
        now: i64,
        threads: usize,
    ) -> Result<Resolution> {
        let Before {
            existing,
            known,
            records: records_before,
        } = before;
        let started = std::time::Instant::now();
        let first_added = narrowed.map(|(first, _)| first);
        let recs = &records.recs;
        let mut uf = UnionFind((0..recs.len()).collect());
        let mut rule_of: Vec<Option<usize>> = vec![None; recs.len()];
        let mut oversized = 0;
        // Each rule's groups are found on their own, side by side; records are then joined
        // rule by rule, in priority order.
        let mut groupings = run_split(self.rules.len(), threads, |ri| group_by_key(&records, ri));
        if let Some((_, sizes)) = narrowed {
            for (ri, grouping) in groupings.iter_mut().enumerate() {
                for (first, n) in &mut grouping.groups {
                    *n = records
                        .key(&recs[*first], ri)
                        .and_then(|key| sizes[ri].get(&key).copied())
                        .ok_or_else(|| {
                            Error::Internal("identity: a match key's group was not counted".into())
                        })?;
                }
            }
        }
        for (ri, Grouping { group_of, groups }) in groupings.iter().enumerate() {
            oversized += groups.iter().filter(|(_, n)| *n > self.max_group).count();
            for (m, g) in group_of.iter().enumerate() {
                let Some(&(first, n)) = g.map(|g| &groups[g]) else {
                    continue;
                };
                if n >= 2 && n <= self.max_group {
                    rule_of[m].get_or_insert(ri);
                    uf.union(first, m);
                }
            }
        }
        drop(groupings);
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "identity: records matched"
        );
        // A set's root is its smallest member, so clusters come in order of first record.
        let mut cluster_of: Vec<usize> = vec![usize::MAX; recs.len()];
        let mut clusters: Vec<Vec<usize>> = Vec::new();
        for i in 0..recs.len() {
            let root = uf.find(i);
            if cluster_of[root] == usize::MAX {
                cluster_of[root] = clusters.len();
                clusters.push(Vec::new());
            }
            clusters[cluster_of[root]].push(i);
        }
        let mut stats = IdentityStats {
            entity: self.entity.clone(),
            records: recs.len(),
            oversized_groups: oversized,
            ..Default::default()
        };
        // Each cluster keeps the smallest id its records had, or gets a new one; new ids are
        // written into one text first, so that every record's id can be a slice. A cluster
        // without an old id holds only new records; the added ones come sorted by source and
        // id, so new ids are numbered as a whole resolution numbers them.
        let mut new_ids = String::new();
        let mut chosen: Vec<std::result::Result<&str, Span>> = Vec::with_capacity(clusters.len());
        let mut next = existing.largest + 1;
        for members in &clusters {
            let mut old: Vec<&str> = members
                .iter()
                .filter_map(|&m| known[m])
                .map(|row| existing.id(row))
                .collect();
            old.sort_unstable();
            old.dedup();
            chosen.push(match old.first() {
                Some(&id) => {
                    stats.merged_ids += old.len() - 1;
                    Ok(id)
                }
                None => {
                    stats.new_ids += 1;
                    let start = new_ids.len();
                    new_ids.push_str(&format!("{}{:08}", self.id_prefix, next));
                    next += 1;
                    Err((start, new_ids.len()))
                }
            });
        }
        // Distinct ids: the pieces of a cluster that split keep its id, and are one entity.
        let kept: FastSet<&str> = chosen.iter().filter_map(|c| c.ok()).collect();
        stats.entities = kept.len() + stats.new_ids;
        drop(kept);
        let mut ids: Vec<&str> = vec![""; recs.len()];
        for (members, id) in clusters.iter().zip(&chosen) {
            let id = match *id {
                Ok(id) => id,
                Err((start, end)) => &new_ids[start..end],
            };
            for &m in members {
                ids[m] = id;
            }
        }
        let regrouped = regrouped_ids(
            records_before,
            &ids,
            known.iter().map(|k| k.map(|row| existing.id(row))),
        );
        let mut by_rule = vec![0usize; self.rules.len() + 1];
        let rule_names: Vec<&str> = recs
            .iter()
            .enumerate()
            .map(|(i, _)| match rule_of[i] {
                Some(ri) => {
                    by_rule[ri] += 1;
                    self.rules[ri].0.as_str()
                }
                None => {
                    by_rule[self.rules.len()] += 1;
                    "unmatched"
                }
            })
            .collect();
        stats.by_rule = self
            .rules
            .iter()
            .map(|(n, _)| n.clone())
            .chain(std::iter::once("unmatched".to_string()))
            .zip(by_rule)
            .collect();
        // The rows to write: every record, or those whose id or rule changed and, for the key
        // table, the added ones whose keys changed too (an edited record whose match fields
        // stayed keeps its row).
        let moved = |i: usize| match known[i] {
            Some(row) => existing.id(row) != ids[i] || existing.rule(row) != rule_names[i],
            None => true,
        };
        let rekeyed = |i: usize| match known[i] {
            Some(row) => {
                (0..self.rules.len()).any(|ri| existing.key(row, ri) != records.key(&recs[i], ri))
            }
            None => true,
        };
        let (map_rows, key_rows): (Vec<usize>, Vec<usize>) = match first_added {
            None => ((0..recs.len()).collect(), (0..recs.len()).collect()),
            Some(first) => (
                (0..recs.len()).filter(|&i| moved(i)).collect(),
                (0..recs.len())
                    .filter(|&i| moved(i) || (i >= first && rekeyed(i)))
                    .collect(),
            ),
        };
        let source_names = |rows: &[usize]| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(
                rows.iter()
                    .map(|&i| self.sources[recs[i].source].name.as_str()),
            ))
        };
        let matched_at =
            TimestampMicrosecondArray::from_iter_values(map_rows.iter().map(|&i| {
                match (first_added, known[i]) {
                    (None, Some(row)) if !moved(i) => existing.matched_at(row),
                    _ => now,
                }
            }))
            .with_timezone(UTC);
        let map = RecordBatch::try_new(
            map_schema(&self.id_column),
            vec![
                source_names(&map_rows),
                strings(&map_rows, |i| records.id(&recs[i])),
                strings(&map_rows, |i| ids[i]),
                strings(&map_rows, |i| rule_names[i]),
                Arc::new(matched_at),
            ],
        )
        .map_err(|e| Error::Internal(format!("identity map: {e}")))?;
        let mut key_columns = vec![
            source_names(&key_rows),
            strings(&key_rows, |i| records.id(&recs[i])),
            strings(&key_rows, |i| ids[i]),
            strings(&key_rows, |i| rule_names[i]),
        ];
        for ri in 0..self.rules.len() {
            let halves: Vec<Option<(i64, i64)>> = key_rows
                .iter()
                .map(|&i| records.key(&recs[i], ri).map(split_key))
                .collect();
            for half in [|(hi, _): (i64, i64)| hi, |(_, lo): (i64, i64)| lo] {
                key_columns.push(Arc::new(arrow::array::Int64Array::from_iter(
                    halves.iter().map(|h| h.map(half)),
                )));
            }
        }
        let keys = RecordBatch::try_new(self.keys_schema(), key_columns)
            .map_err(|e| Error::Internal(format!("identity match keys: {e}")))?;
        let record_ids = RecordIds {
            source: recs.iter().map(|r| r.source).collect(),
            record: StringArray::from_iter_values(recs.iter().map(|r| records.id(r))),
            id: StringArray::from_iter_values(ids.iter()),
        };
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "identity: ids assigned"
        );
        Ok(Resolution {
            map,
            keys,
            whole: first_added.is_none(),
            stats,
            regrouped,
            record_ids,
        })
    }

    /// Golden fields in order of first appearance.
    pub fn golden_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.sources {
            for (f, _) in &s.fields {
                if !out.contains(f) {
                    out.push(f.clone());
                }
            }
        }
        out
    }

    /// The SQL of the golden-record table: every record joined to its id, one row per id, each
    /// field chosen by its survivorship rule.
    pub fn golden_sql(&self) -> String {
        format!(
            "with records as (\n{}\n)\n\n{}",
            self.records_sql(),
            self.golden_select("records")
        )
    }

    /// The SQL of every record joined to its id, each with its golden fields (null where its
    /// source has none), its source, rank, record id and update time.
    pub fn records_sql(&self) -> String {
        let fields = self.golden_fields();
        let id = quote_ident(&self.id_column);
        let records: Vec<String> = self
            .sources
            .iter()
            .enumerate()
            .map(|(rank, s)| {
                let cols: Vec<String> = fields
                    .iter()
                    .map(|f| match s.fields.iter().find(|(g, _)| g == f) {
                        Some((_, c)) => format!("r.{} as {}", quote_ident(c), quote_ident(f)),
                        None => format!("null as {}", quote_ident(f)),
                    })
                    .collect();
                let updated = match &s.updated_at {
                    Some(u) => format!("cast(r.{} as timestamp)", quote_ident(u)),
                    None => "cast(null as timestamp)".to_string(),
                };
                format!(
                    "    select m.{id}, '{name}' as _source, {rank} as _source_rank, m.source_id as _source_id, {updated} as _updated_at, {cols}\n    \
                     from {table} r\n    join {map} m on m.source = '{name}' and m.source_id = cast(r.{rid} as varchar)",
                    name = s.name.replace('\'', "''"),
                    cols = cols.join(", "),
                    table = quote_ident(&s.table),
                    map = quote_ident(&self.map_table),
                    rid = quote_ident(&s.id),
                )
            })
            .collect();
        records.join("\n    union all\n")
    }

    /// The SQL of the golden records from `records` (as [`Identity::records_sql`] gives them):
    /// one row per id, each field picked by its survivorship rule.
    pub fn golden_select(&self, records: &str) -> String {
        let fields = self.golden_fields();
        let id = quote_ident(&self.id_column);
        let picks: Vec<String> = fields
            .iter()
            .map(|f| {
                let q = quote_ident(f);
                let rule = self
                    .survivorship
                    .iter()
                    .find(|(g, _)| g == f)
                    .map(|(_, s)| s.clone())
                    .unwrap_or(Survivorship::Prefer(Vec::new()));
                match rule {
                    Survivorship::Prefer(order) => {
                        let rank = self.preference_rank(&order);
                        format!("    first_value({q} order by {rank}, _source_id) filter (where {q} is not null) as {q}")
                    }
                    Survivorship::MostRecent => format!(
                        "    first_value({q} order by _updated_at desc nulls last, _source_rank, _source_id) filter (where {q} is not null) as {q}"
                    ),
                    Survivorship::Max => format!("    max({q}) as {q}"),
                    Survivorship::Min => format!("    min({q}) as {q}"),
                }
            })
            .collect();
        format!(
            "select\n    {id},\n{},\n    count(*) as record_count,\n    \
             array_to_string(array_sort(array_distinct(array_agg(_source))), ',') as sources\nfrom {records}\ngroup by {id}",
            picks.join(",\n")
        )
    }

    /// A SQL expression ranking a record by a source preference list (unlisted sources last, in
    /// declaration order).
    fn preference_rank(&self, order: &[String]) -> String {
        if order.is_empty() {
            return "_source_rank".to_string();
        }
        let mut case = String::from("case _source");
        for (i, s) in order.iter().enumerate() {
            case.push_str(&format!(" when '{}' then {i}", s.replace('\'', "''")));
        }
        case.push_str(&format!(" else {} + _source_rank end", order.len()));
        case
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record: id, e-mail, phone, name, postcode.
    type Row = [Option<String>; 5];

    /// A pseudo-random number below `n`.
    fn next(state: &mut u64, n: u64) -> u64 {
        *state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (*state >> 33) % n
    }

    /// A record of `table` whose e-mail, phone and name overlap with others' at random; one in
    /// fifty has no id when `ids_missing`.
    fn random_row(state: &mut u64, id: String, ids_missing: bool) -> Row {
        [
            (!ids_missing || next(state, 50) > 0).then_some(id),
            (next(state, 4) > 0).then(|| format!(" P{}@Mail.example ", next(state, 400))),
            (next(state, 3) > 0).then(|| format!("0{}", 30_000 + next(state, 300))),
            Some(format!("Name {}", next(state, 60))),
            (next(state, 2) > 0).then(|| format!("{}", 10_000 + next(state, 5))),
        ]
    }

    /// Register `rows` as table `name`.
    fn register(ctx: &SessionContext, name: &str, rows: &[Row]) {
        use datafusion::datasource::MemTable;
        let schema = Arc::new(Schema::new(
            ["id", "email", "phone", "name", "postcode"]
                .map(|c| Field::new(c, DataType::Utf8, true))
                .to_vec(),
        ));
        let arrays: Vec<ArrayRef> = (0..5)
            .map(|c| {
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r[c].clone()))) as ArrayRef
            })
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
        let t = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.deregister_table(name).unwrap();
        ctx.register_table(name, Arc::new(t)).unwrap();
    }

    /// Register a batch as table `name`.
    fn register_batch(ctx: &SessionContext, name: &str, batch: &RecordBatch) {
        use datafusion::datasource::MemTable;
        let t = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]]).unwrap();
        ctx.deregister_table(name).unwrap();
        ctx.register_table(name, Arc::new(t)).unwrap();
    }

    /// The rows of sources `a` (900) and `b` (700), made with `seed`.
    fn sample(seed: u64, ids_missing: bool) -> [Vec<Row>; 2] {
        let mut state = seed;
        [("a", 900), ("b", 700)].map(|(table, n)| {
            (0..n)
                .map(|i| random_row(&mut state, format!("{table}{i}"), ids_missing))
                .collect()
        })
    }

    /// The identity over tables `a` and `b`, matched by e-mail, phone, then name and postcode,
    /// with groups of more than six records ignored.
    fn identity_over_a_and_b() -> Identity {
        let fields: Vec<(String, String)> = ["email", "phone", "name", "postcode"]
            .iter()
            .map(|f| (f.to_string(), f.to_string()))
            .collect();
        let source = |name: &str| RecordSource {
            name: name.to_string(),
            table: name.to_string(),
            id: "id".to_string(),
            updated_at: None,
            fields: fields.clone(),
        };
        Identity {
            pipeline: "p".to_string(),
            entity: "customer".to_string(),
            map_table: "map".to_string(),
            golden_table: "golden".to_string(),
            id_column: "customer_id".to_string(),
            id_prefix: "C".to_string(),
            sources: vec![source("a"), source("b")],
            rules: vec![
                ("email".to_string(), vec!["email".to_string()]),
                ("phone".to_string(), vec!["phone".to_string()]),
                (
                    "name_postcode".to_string(),
                    vec!["name".to_string(), "postcode".to_string()],
                ),
            ],
            normalize: HashMap::from([
                ("email".to_string(), Normalizer::Email),
                ("phone".to_string(), Normalizer::Phone),
                ("name".to_string(), Normalizer::Name),
            ]),
            default_cc: "49".to_string(),
            survivorship: Vec::new(),
            max_group: 6,
        }
    }

    /// Two record sources whose e-mails, phones and names overlap at random, some keys shared
    /// by more records than `max_group`, some records without an id.
    fn overlapping_sources(ctx: &SessionContext) -> Identity {
        let [a, b] = sample(7, true);
        register(ctx, "a", &a);
        register(ctx, "b", &b);
        identity_over_a_and_b()
    }

    /// A batch's rows as text, each row's first `columns` columns (the key columns first),
    /// keyed by the first two.
    fn rows_by_record(
        batch: &RecordBatch,
        columns: usize,
    ) -> HashMap<(String, String), Vec<String>> {
        use arrow::util::display::{ArrayFormatter, FormatOptions};
        let options = FormatOptions::default().with_null("∅");
        let formatters: Vec<ArrayFormatter> = (0..columns)
            .map(|c| ArrayFormatter::try_new(batch.column(c).as_ref(), &options).unwrap())
            .collect();
        (0..batch.num_rows())
            .map(|i| {
                let row: Vec<String> = formatters.iter().map(|f| f.value(i).to_string()).collect();
                ((row[0].clone(), row[1].clone()), row)
            })
            .collect()
    }

    /// The day-1 resolution of `day1`; then, the context holding `day2` (`day1` with the rows
    /// of `added`), the whole resolution and the one of the added rows (and its `Since`).
    async fn resolved_on_day_two(
        identity: &Identity,
        day1: &[Vec<Row>; 2],
        day2: &[Vec<Row>; 2],
        added: &[Vec<Row>; 2],
    ) -> (Resolution, Resolution, Resolution, SessionContext, Since) {
        let ctx = SessionContext::new();
        register(&ctx, "a", &day1[0]);
        register(&ctx, "b", &day1[1]);
        let first = identity.resolve(&ctx, 1, None).await.unwrap();
        assert!(first.whole);
        let ctx = SessionContext::new();
        register(&ctx, "a", &day2[0]);
        register(&ctx, "b", &day2[1]);
        register(&ctx, "added_a", &added[0]);
        register(&ctx, "added_b", &added[1]);
        register_batch(&ctx, "map", &first.map);
        register_batch(&ctx, &identity.keys_table(), &first.keys);
        let whole = identity.resolve(&ctx, 2, None).await.unwrap();
        let since = Since {
            added: vec!["added_a".into(), "added_b".into()],
            rows_then: day1.iter().map(|r| r.len() as u64).collect(),
            rows_now: day2.iter().map(|r| r.len() as u64).collect(),
            last: Some(first.stats.last()),
        };
        let part = identity.resolve(&ctx, 2, Some(&since)).await.unwrap();
        assert!(whole.whole && !part.whole);
        (first, whole, part, ctx, since)
    }

    /// `part`, a resolution of the added rows after `first`, gives what `whole` gives: the same
    /// figures and regrouped ids; `first`'s tables with its rows merged in are `whole`'s; its
    /// map rows are those whose id or rule changed.
    fn assert_gives_the_whole(first: &Resolution, part: &Resolution, whole: &Resolution) {
        assert_eq!(part.stats.to_string(), whole.stats.to_string());
        assert_eq!(part.stats.last(), whole.stats.last());
        assert_eq!(part.regrouped, whole.regrouped);
        for (day1_rows, changes, all, columns) in [
            (&first.map, &part.map, &whole.map, 4),
            (
                &first.keys,
                &part.keys,
                &whole.keys,
                first.keys.num_columns(),
            ),
        ] {
            let mut merged = rows_by_record(day1_rows, columns);
            merged.extend(rows_by_record(changes, columns));
            assert_eq!(merged, rows_by_record(all, columns));
        }
        let before = rows_by_record(&first.map, 4);
        let moved: HashSet<(String, String)> = rows_by_record(&whole.map, 4)
            .into_iter()
            .filter(|(record, row)| before.get(record) != Some(row))
            .map(|(record, _)| record)
            .collect();
        assert!(!moved.is_empty());
        assert_eq!(
            rows_by_record(&part.map, 4)
                .into_keys()
                .collect::<HashSet<_>>(),
            moved
        );
    }

    /// Matching only the rows added since the last resolution, every other record's keys read
    /// from the match-key table, gives the ids, rules, keys and figures of matching every
    /// record again; a record gone makes it match every record.
    #[tokio::test]
    async fn matching_the_added_rows_gives_what_matching_every_record_gives() {
        let identity = identity_over_a_and_b();
        let day1 = sample(11, false);
        // Day 2: one record of `a` in nine gets another e-mail and phone, and 80 new records
        // join each source (new customers, and links that merge and split clusters).
        let mut state = 99u64;
        let mut day2 = day1.clone();
        let mut added: [Vec<Row>; 2] = Default::default();
        for (i, row) in day2[0].iter_mut().enumerate() {
            if i % 9 == 0 {
                let changed = random_row(&mut state, row[0].clone().unwrap_or_default(), false);
                row[1] = changed[1].clone();
                row[2] = changed[2].clone();
                added[0].push(row.clone());
            }
        }
        for (s, table) in ["a", "b"].iter().enumerate() {
            for i in 0..80 {
                let row = random_row(&mut state, format!("{table}new{i}"), false);
                day2[s].push(row.clone());
                added[s].push(row);
            }
        }
        let (first, whole, part, ctx, since) =
            resolved_on_day_two(&identity, &day1, &day2, &added).await;
        let stats = whole.stats.to_string();
        assert!(
            whole.stats.new_ids > 0 && whole.stats.merged_ids > 0,
            "{stats}"
        );
        assert!(stats.contains("oversized match keys ignored"), "{stats}");
        assert_gives_the_whole(&first, &part, &whole);
        // Without the last resolution's figures, every record is matched.
        let unrecorded = Since {
            last: None,
            ..since.clone()
        };
        let again = identity.resolve(&ctx, 2, Some(&unrecorded)).await.unwrap();
        assert!(again.whole);
        assert_eq!(again.stats.to_string(), stats);
        // A record removed from `b`: the tables no longer add up, every record is matched.
        let gone = Since {
            rows_now: vec![since.rows_now[0], since.rows_now[1] - 1],
            ..since
        };
        let again = identity.resolve(&ctx, 2, Some(&gone)).await.unwrap();
        assert!(again.whole);
        assert_eq!(again.stats.to_string(), stats);
    }

    /// Among many records, a few added rows reach few of them: only those are matched again,
    /// and what they give is still what matching every record gives, where a group grows past
    /// `max_group` and where one shrinks under it.
    #[tokio::test]
    async fn matching_the_added_rows_matches_only_the_records_they_reach() {
        let identity = identity_over_a_and_b();
        let row = |id: String, email: String, phone: Option<&str>| -> Row {
            [Some(id), Some(email), phone.map(str::to_string), None, None]
        };
        // Day 1: 1,500 pairs, a{i} and b{i} sharing e-mail e{i}; a0-a39 share a phone (a group
        // past `max_group`, ignored), and a100-a106 another (seven, one too many).
        let phone = |i: usize| match i {
            0..40 => Some("030 5550111"),
            100..107 => Some("030 5550333"),
            _ => None,
        };
        let day1: [Vec<Row>; 2] = [
            (0..1500)
                .map(|i| row(format!("a{i}"), format!("e{i}@mail.example"), phone(i)))
                .collect(),
            (0..1500)
                .map(|i| row(format!("b{i}"), format!("e{i}@mail.example"), None))
                .collect(),
        ];
        // Day 2: a5 takes a7's e-mail (b5 is left alone, a5 joins a7's id); a100 loses its
        // phone, so a101-a106 match by it; b1500 shares e9; a1500 joins the 40 of one phone;
        // a1501 and b1501 are a new pair.
        let mut day2 = day1.clone();
        day2[0][5][1] = Some("e7@mail.example".into());
        day2[0][100][2] = None;
        let new = [
            vec![
                row(
                    "a1500".into(),
                    "n0@mail.example".into(),
                    Some("030 5550111"),
                ),
                row("a1501".into(), "n1@mail.example".into(), None),
            ],
            vec![
                row("b1500".into(), "e9@mail.example".into(), None),
                row("b1501".into(), "n1@mail.example".into(), None),
            ],
        ];
        let mut added = [vec![day2[0][5].clone(), day2[0][100].clone()], Vec::new()];
        for s in 0..2 {
            day2[s].extend(new[s].iter().cloned());
            added[s].extend(new[s].iter().cloned());
        }
        let (first, whole, part, _, _) = resolved_on_day_two(&identity, &day1, &day2, &added).await;
        assert_gives_the_whole(&first, &part, &whole);
        let stats = whole.stats.to_string();
        // a7's id and five of a101-a106's go; a1500, and a1501 with b1501, get new ids. b5
        // keeps its id, which a5, a7 and b7 now have too: one customer.
        let expected = "identity customer: 3004 records -> 1496 customers (2 new, 6 merged)";
        assert!(stats.starts_with(expected), "{stats}");
        assert!(
            stats.ends_with("; 1 oversized match keys ignored"),
            "{stats}"
        );
        // The records reached: those of the ids of a0-a39 (phone 030 5550111, a5, a7 and a9
        // among them) and of a100-a106 (phone 030 5550333), two records each, and the four new.
        let reached = part.record_ids.source.len();
        assert_eq!(reached, 2 * (40 + 7) + 4, "{stats}");
        assert_eq!(whole.record_ids.source.len(), 3004);
        let a = |ids: &[&str]| ids.iter().map(|i| i.to_string()).collect::<HashSet<_>>();
        assert!(
            part.record_ids
                .ids_of(&[a(&["a5", "a100"]), a(&["b1500"])])
                .is_some()
        );
        assert_eq!(
            part.record_ids.ids_of(&[a(&["a600"]), HashSet::new()]),
            None
        );
    }

    /// Records loaded and grouped on several threads give the map and figures of one thread.
    #[tokio::test]
    async fn matching_side_by_side_gives_the_map_of_one_thread() {
        let mut maps = Vec::new();
        for threads in [1, 2, 3] {
            let config = datafusion::prelude::SessionConfig::new().with_target_partitions(threads);
            let ctx = SessionContext::new_with_config(config);
            let identity = overlapping_sources(&ctx);
            let r = identity.resolve(&ctx, 0, None).await.unwrap();
            maps.push((r.map, r.stats.to_string()));
        }
        let (one, stats) = &maps[0];
        assert!(stats.contains("oversized match keys ignored"), "{stats}");
        assert!(one.num_rows() > 1500, "{stats}");
        let ids = one.column(2).as_string::<i32>();
        let distinct: HashSet<&str> = ids.iter().flatten().collect();
        assert!(distinct.len() < one.num_rows() / 2, "{stats}");
        for (map, s) in &maps[1..] {
            assert_eq!(map, one);
            assert_eq!(s, stats);
        }
    }

    #[test]
    fn run_split_keeps_the_order_of_the_parts() {
        for threads in 1..5 {
            assert_eq!(run_split(7, threads, |i| i * i), [0, 1, 4, 9, 16, 25, 36]);
        }
        assert!(run_split(0, 2, |i| i).is_empty());
    }

    #[test]
    fn a_key_survives_its_two_stored_halves() {
        for key in [
            0,
            1,
            Key::MAX,
            1 << 63,
            1 << 64,
            (1 << 127) | 5,
            key_of(["x"].into_iter(), &mut String::new()),
        ] {
            let (hi, lo) = split_key(key);
            assert_eq!(join_key(hi, lo), key);
        }
    }

    #[test]
    fn union_find_joins_transitively() {
        let mut uf = UnionFind((0..5).collect());
        uf.union(0, 3);
        uf.union(3, 4);
        assert_eq!(uf.find(4), 0);
        assert_ne!(uf.find(1), uf.find(4));
    }

    #[test]
    fn regrouping_names_changed_and_vanished_ids() {
        let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        // Records 0-3 were C1, C1, C2, C3; C2's record joins C1, a new record starts C4.
        let now = ["C1", "C1", "C1", "C3", "C4"];
        let before = [Some("C1"), Some("C1"), Some("C2"), Some("C3"), None];
        let r = regrouped_ids(4, &now, before.into_iter()).expect("no record lost");
        assert_eq!(r.changed, set(&["C1", "C4"]));
        assert_eq!(r.gone, set(&["C2"]));
        // Nothing moved: nothing to rebuild.
        let same = regrouped_ids(2, &["C1", "C2"], [Some("C1"), Some("C2")].into_iter());
        assert_eq!(same, Some(Regrouped::default()));
        // A record the map held is gone: everything is rebuilt.
        assert_eq!(regrouped_ids(3, &["C1"], [Some("C1")].into_iter()), None);
    }
}
