//! Identity resolution: the records of one entity from several systems, matched by rules in
//! priority order into one id per real-world entity.
//!
//! Matching is transitive (union-find): records that agree on all fields of any rule, after
//! normalisation, are one entity. Ids are stable: a cluster keeps the smallest id any of its
//! records had before, so a customer resolved once keeps its id in every later run. The
//! merged ("golden") record is plain SQL generated from the survivorship rules, so it can be read
//! and is typed like its inputs.

pub mod normalize;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::prelude::SessionContext;

use crate::config::pipeline::{Normalizer, Survivorship};
use crate::config::types::UTC;
use crate::error::{Error, Result};
use crate::warehouse::{delta_compatible_batch, write::quote_ident};

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
    /// The map table's content.
    pub map: RecordBatch,
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

/// One record: its source (by index), its id and where its match fields are.
struct Rec {
    source: usize,
    id: Span,
    /// Index of its first field in [`Records::keys`].
    keys: usize,
}

/// Every record's id and normalised match fields, as spans of one text: hundreds of thousands
/// of records cost a few allocations instead of several each.
#[derive(Default)]
struct Records {
    text: String,
    recs: Vec<Rec>,
    /// Normalised match fields, one per `match_fields()` for each record, in that order.
    keys: Vec<Option<Span>>,
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

    /// Append the records of `part` (loaded on their own) after these.
    fn append(&mut self, part: Records) {
        let shift = self.text.len();
        let keys = self.keys.len();
        self.text.push_str(&part.text);
        self.keys.extend(
            part.keys
                .into_iter()
                .map(|k| k.map(|(a, b)| (a + shift, b + shift))),
        );
        self.recs.extend(part.recs.into_iter().map(|r| Rec {
            source: r.source,
            id: (r.id.0 + shift, r.id.1 + shift),
            keys: r.keys + keys,
        }));
    }

    fn id(&self, r: &Rec) -> &str {
        self.str(r.id)
    }

    fn field(&self, r: &Rec, f: usize) -> Option<&str> {
        self.keys[r.keys + f].map(|s| self.str(s))
    }

    /// The record's key under a rule over these fields (by index), when it has them all.
    fn rule_key(&self, r: &Rec, fields: &[usize]) -> Option<Cow<'_, str>> {
        match fields {
            [one] => self.field(r, *one).map(Cow::Borrowed),
            many => {
                let mut key = String::new();
                for (n, f) in many.iter().enumerate() {
                    if n > 0 {
                        key.push('\u{1f}');
                    }
                    key.push_str(self.field(r, *f)?);
                }
                Some(Cow::Owned(key))
            }
        }
    }
}

/// The existing map's rows, as read.
struct Existing {
    batches: Vec<RecordBatch>,
    /// Largest number among the ids made by this resolution.
    largest: u64,
}

/// One row of the existing map: (batch, row).
type MapRow = (usize, usize);

impl Existing {
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

/// The records' groups under one rule: each record's group (none without a key), and each
/// group's first record and size.
struct Grouping {
    group_of: Vec<Option<usize>>,
    groups: Vec<(usize, usize)>,
}

/// The groups of the records that agree on the fields `on` (by index).
fn group_by_key(records: &Records, on: &[usize]) -> Grouping {
    let mut group_of_key: FastMap<Cow<'_, str>, usize> = FastMap::default();
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let group_of = records
        .recs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let key = records.rule_key(r, on)?;
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

impl Identity {
    /// Fields used by match rules.
    fn match_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = self.rules.iter().flat_map(|(_, f)| f.clone()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every record's id and normalised match fields: the sources' queries run side by side,
    /// and each source's values are normalised on a thread of its own (up to `threads`).
    async fn load_records(&self, ctx: &SessionContext, threads: usize) -> Result<Records> {
        let fields = self.match_fields();
        let hows: Vec<Normalizer> = fields
            .iter()
            .map(|f| self.normalize.get(f).copied().unwrap_or(Normalizer::Text))
            .collect();
        let queries = self.sources.iter().map(|s| {
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
                quote_ident(&s.table)
            );
            async move { Ok::<_, Error>(ctx.sql(&sql).await?.collect().await?) }
        });
        let per_source = futures::future::try_join_all(queries).await?;
        let parts: Vec<Result<Records>> = run_split(per_source.len(), threads, |si| {
            self.source_records(si, &per_source[si], &hows)
        });
        let mut out = Records::default();
        for part in parts {
            out.append(part?);
        }
        Ok(out)
    }

    /// The records of source `si` in its query's batches, their match fields normalised.
    fn source_records(
        &self,
        si: usize,
        batches: &[RecordBatch],
        hows: &[Normalizer],
    ) -> Result<Records> {
        let mut out = Records::default();
        for batch in batches {
            let batch = delta_compatible_batch(batch)?;
            let ids = batch.column(0).as_string::<i32>();
            let values: Vec<&StringArray> = (1..batch.num_columns())
                .map(|i| batch.column(i).as_string::<i32>())
                .collect();
            for row in 0..batch.num_rows() {
                if ids.is_null(row) {
                    continue;
                }
                let id = out.push_text(ids.value(row));
                let keys = out.keys.len();
                for (col, how) in values.iter().zip(hows) {
                    let key = col
                        .is_valid(row)
                        .then(|| normalize::normalize(*how, col.value(row), &self.default_cc))
                        .flatten()
                        .map(|k| out.push_text(&k));
                    out.keys.push(key);
                }
                out.recs.push(Rec {
                    source: si,
                    id,
                    keys,
                });
            }
        }
        Ok(out)
    }

    /// The existing map's rows (none before the first run).
    async fn existing(&self, ctx: &SessionContext) -> Result<Existing> {
        let mut out = Existing {
            batches: Vec::new(),
            largest: 0,
        };
        if !ctx.table_exist(self.map_table.as_str())? {
            return Ok(out);
        }
        let sql = format!(
            "select source, source_id, {}, rule, matched_at from {}",
            quote_ident(&self.id_column),
            quote_ident(&self.map_table)
        );
        for batch in ctx.sql(&sql).await?.collect().await? {
            let batch = delta_compatible_batch(&batch)?;
            let id = batch.column(2).as_string::<i32>();
            for i in 0..batch.num_rows() {
                if let Some(n) = self.id_number(id.value(i)) {
                    out.largest = out.largest.max(n);
                }
            }
            out.batches.push(batch);
        }
        Ok(out)
    }

    /// The number in an id made by this resolution (`C00000042` -> 42).
    fn id_number(&self, id: &str) -> Option<u64> {
        id.strip_prefix(&self.id_prefix)
            .and_then(|n| n.parse::<u64>().ok())
    }

    /// Match every record and build the map table's content.
    pub async fn resolve(&self, ctx: &SessionContext, now_micros: i64) -> Result<Resolution> {
        let started = std::time::Instant::now();
        let threads = ctx.state().config().target_partitions().max(1);
        // The existing map is read while the records load.
        let (mut records, existing) =
            futures::future::try_join(self.load_records(ctx, threads), self.existing(ctx)).await?;
        tracing::debug!(
            records = records.recs.len(),
            seconds = started.elapsed().as_secs_f64(),
            "identity: records loaded"
        );
        // Deterministic order: by source priority, then id.
        let mut recs = std::mem::take(&mut records.recs);
        recs.sort_by(|a, b| (a.source, records.id(a)).cmp(&(b.source, records.id(b))));
        recs.dedup_by(|a, b| a.source == b.source && records.id(a) == records.id(b));
        records.recs = recs;
        let recs = &records.recs;
        let mut uf = UnionFind((0..recs.len()).collect());
        let mut rule_of: Vec<Option<usize>> = vec![None; recs.len()];
        let mut oversized = 0;
        let fields = self.match_fields();
        let rule_fields: Vec<Vec<usize>> = self
            .rules
            .iter()
            .map(|(_, on)| {
                on.iter()
                    .filter_map(|f| fields.iter().position(|g| g == f))
                    .collect()
            })
            .collect();
        // Each rule's groups are found on their own, side by side; records are then joined
        // rule by rule, in priority order.
        let groupings = run_split(rule_fields.len(), threads, |ri| {
            group_by_key(&records, &rule_fields[ri])
        });
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
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "identity: records matched"
        );
        let out = self.assign_ids(
            &records, &existing, &mut uf, &rule_of, oversized, now_micros,
        );
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "identity: ids assigned"
        );
        out
    }

    fn assign_ids(
        &self,
        records: &Records,
        existing: &Existing,
        uf: &mut UnionFind,
        rule_of: &[Option<usize>],
        oversized: usize,
        now: i64,
    ) -> Result<Resolution> {
        let recs = &records.recs;
        let index = existing.index(&self.sources);
        let known: Vec<Option<MapRow>> = recs
            .iter()
            .map(|r| index[r.source].get(records.id(r)).copied())
            .collect();
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
            entities: clusters.len(),
            oversized_groups: oversized,
            ..Default::default()
        };
        // Each cluster keeps the smallest id its records had, or gets a new one; new ids are
        // written into one text first, so that every record's id can be a slice.
        let mut new_ids = String::new();
        let mut chosen: Vec<Result<&str, Span>> = Vec::with_capacity(clusters.len());
        let mut next = existing.largest + 1;
        // Clusters are keyed by their smallest member, so this order is deterministic.
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
            index.iter().map(FastMap::len).sum(),
            &ids,
            known.iter().map(|k| k.map(|row| existing.id(row))),
        );
        let mut by_rule = vec![0usize; self.rules.len() + 1];
        let (mut src, mut sid, mut rule, mut at) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, r) in recs.iter().enumerate() {
            let rule_name = match rule_of[i] {
                Some(ri) => {
                    by_rule[ri] += 1;
                    self.rules[ri].0.as_str()
                }
                None => {
                    by_rule[self.rules.len()] += 1;
                    "unmatched"
                }
            };
            let matched_at = match known[i] {
                Some(row) if existing.id(row) == ids[i] && existing.rule(row) == rule_name => {
                    existing.matched_at(row)
                }
                _ => now,
            };
            src.push(self.sources[r.source].name.as_str());
            sid.push(records.id(r));
            rule.push(rule_name);
            at.push(matched_at);
        }
        stats.by_rule = self
            .rules
            .iter()
            .map(|(n, _)| n.clone())
            .chain(std::iter::once("unmatched".to_string()))
            .zip(by_rule)
            .collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(src)),
            Arc::new(StringArray::from(sid)),
            Arc::new(StringArray::from(ids)),
            Arc::new(StringArray::from(rule)),
            Arc::new(TimestampMicrosecondArray::from(at).with_timezone(UTC)),
        ];
        let map = RecordBatch::try_new(map_schema(&self.id_column), columns)
            .map_err(|e| Error::Internal(format!("identity map: {e}")))?;
        Ok(Resolution {
            map,
            stats,
            regrouped,
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
            "with records as (\n{}\n)\n\nselect\n    {id},\n{},\n    count(*) as record_count,\n    \
             array_to_string(array_sort(array_distinct(array_agg(_source))), ',') as sources\nfrom records\ngroup by {id}",
            records.join("\n    union all\n"),
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

    /// Two record sources whose e-mails, phones and names overlap at random, some keys shared
    /// by more records than `max_group`.
    fn overlapping_sources(ctx: &SessionContext) -> Identity {
        use datafusion::datasource::MemTable;
        let mut state = 7u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("email", DataType::Utf8, true),
            Field::new("phone", DataType::Utf8, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("postcode", DataType::Utf8, true),
        ]));
        for (table, rows) in [("a", 900), ("b", 700)] {
            let mut cols: [Vec<Option<String>>; 5] = Default::default();
            for i in 0..rows {
                cols[0].push((next(50) > 0).then(|| format!("{table}{i}")));
                cols[1].push((next(4) > 0).then(|| format!(" P{}@Mail.example ", next(400))));
                cols[2].push((next(3) > 0).then(|| format!("0{}", 30_000 + next(300))));
                cols[3].push(Some(format!("Name {}", next(60))));
                cols[4].push((next(2) > 0).then(|| format!("{}", 10_000 + next(5))));
            }
            let arrays: Vec<ArrayRef> = cols
                .into_iter()
                .map(|c| Arc::new(StringArray::from(c)) as ArrayRef)
                .collect();
            let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
            let t = MemTable::try_new(schema.clone(), vec![vec![batch]]).unwrap();
            ctx.register_table(table, Arc::new(t)).unwrap();
        }
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

    /// Records loaded and grouped on several threads give the map and figures of one thread.
    #[tokio::test]
    async fn matching_side_by_side_gives_the_map_of_one_thread() {
        let mut maps = Vec::new();
        for threads in [1, 2, 3] {
            let config = datafusion::prelude::SessionConfig::new().with_target_partitions(threads);
            let ctx = SessionContext::new_with_config(config);
            let identity = overlapping_sources(&ctx);
            let r = identity.resolve(&ctx, 0).await.unwrap();
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
