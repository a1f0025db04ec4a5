//! Identity resolution: the records of one entity from several systems, matched by rules in
//! priority order into one id per real-world entity.
//!
//! Matching is transitive (union-find): records that agree on all fields of any rule, after
//! normalisation, are one entity. Ids are stable: a cluster keeps the smallest id any of its
//! records had before, so a customer resolved once keeps its id in every later run. The
//! merged ("golden") record is plain SQL generated from the survivorship rules, so it can be read
//! and is typed like its inputs.

pub mod normalize;

use std::collections::{BTreeMap, HashMap};
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

struct Rec {
    source: usize,
    id: String,
    /// Normalised match fields, by field name.
    keys: HashMap<String, String>,
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

    async fn load_records(&self, ctx: &SessionContext) -> Result<Vec<Rec>> {
        let fields = self.match_fields();
        let mut out = Vec::new();
        for (si, s) in self.sources.iter().enumerate() {
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
            let batches = ctx.sql(&sql).await?.collect().await?;
            for batch in batches {
                let batch = delta_compatible_batch(&batch)?;
                let ids = batch.column(0).as_string::<i32>();
                let values: Vec<&StringArray> = (1..batch.num_columns())
                    .map(|i| batch.column(i).as_string::<i32>())
                    .collect();
                for row in 0..batch.num_rows() {
                    if ids.is_null(row) {
                        continue;
                    }
                    let mut keys = HashMap::new();
                    for (f, col) in fields.iter().zip(&values) {
                        if col.is_valid(row) {
                            let how = self.normalize.get(f).copied().unwrap_or(Normalizer::Text);
                            if let Some(v) =
                                normalize::normalize(how, col.value(row), &self.default_cc)
                            {
                                keys.insert(f.clone(), v);
                            }
                        }
                    }
                    out.push(Rec {
                        source: si,
                        id: ids.value(row).to_string(),
                        keys,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Existing map rows: (source, source_id) -> (id, rule, matched_at).
    async fn existing(
        &self,
        ctx: &SessionContext,
    ) -> Result<HashMap<(String, String), (String, String, i64)>> {
        let mut out = HashMap::new();
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
            let s = batch.column(0).as_string::<i32>();
            let sid = batch.column(1).as_string::<i32>();
            let id = batch.column(2).as_string::<i32>();
            let rule = batch.column(3).as_string::<i32>();
            let at = batch
                .column(4)
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            for i in 0..batch.num_rows() {
                out.insert(
                    (s.value(i).to_string(), sid.value(i).to_string()),
                    (
                        id.value(i).to_string(),
                        rule.value(i).to_string(),
                        at.value(i),
                    ),
                );
            }
        }
        Ok(out)
    }

    /// Match every record and build the map table's content.
    pub async fn resolve(
        &self,
        ctx: &SessionContext,
        now_micros: i64,
    ) -> Result<(RecordBatch, IdentityStats)> {
        let mut recs = self.load_records(ctx).await?;
        // Deterministic order: by source priority, then id.
        recs.sort_by(|a, b| (a.source, &a.id).cmp(&(b.source, &b.id)));
        recs.dedup_by(|a, b| a.source == b.source && a.id == b.id);
        let mut uf = UnionFind((0..recs.len()).collect());
        let mut rule_of: Vec<Option<usize>> = vec![None; recs.len()];
        let mut oversized = 0;
        for (ri, (_, fields)) in self.rules.iter().enumerate() {
            let mut groups: HashMap<Vec<&str>, Vec<usize>> = HashMap::new();
            for (i, r) in recs.iter().enumerate() {
                let key: Option<Vec<&str>> = fields
                    .iter()
                    .map(|f| r.keys.get(f).map(String::as_str))
                    .collect();
                if let Some(k) = key {
                    groups.entry(k).or_default().push(i);
                }
            }
            for members in groups.values() {
                if members.len() < 2 {
                    continue;
                }
                if members.len() > self.max_group {
                    oversized += 1;
                    continue;
                }
                for &m in members {
                    rule_of[m].get_or_insert(ri);
                    uf.union(members[0], m);
                }
            }
        }
        self.assign_ids(ctx, &recs, &mut uf, &rule_of, oversized, now_micros)
            .await
    }

    async fn assign_ids(
        &self,
        ctx: &SessionContext,
        recs: &[Rec],
        uf: &mut UnionFind,
        rule_of: &[Option<usize>],
        oversized: usize,
        now: i64,
    ) -> Result<(RecordBatch, IdentityStats)> {
        let existing = self.existing(ctx).await?;
        let mut clusters: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for i in 0..recs.len() {
            clusters.entry(uf.find(i)).or_default().push(i);
        }
        let number = |id: &str| {
            id.strip_prefix(&self.id_prefix)
                .and_then(|n| n.parse::<u64>().ok())
        };
        let mut next = existing
            .values()
            .filter_map(|(id, _, _)| number(id))
            .max()
            .unwrap_or(0)
            + 1;
        let mut ids: Vec<String> = vec![String::new(); recs.len()];
        let mut stats = IdentityStats {
            entity: self.entity.clone(),
            records: recs.len(),
            entities: clusters.len(),
            oversized_groups: oversized,
            ..Default::default()
        };
        // Clusters are keyed by their smallest member, so this order is deterministic.
        for members in clusters.values() {
            let mut old: Vec<&String> = members
                .iter()
                .filter_map(|&m| {
                    existing.get(&(
                        self.sources[recs[m].source].name.clone(),
                        recs[m].id.clone(),
                    ))
                })
                .map(|(id, _, _)| id)
                .collect();
            old.sort();
            old.dedup();
            let id = match old.first() {
                Some(id) => {
                    stats.merged_ids += old.len() - 1;
                    (*id).clone()
                }
                None => {
                    stats.new_ids += 1;
                    next += 1;
                    format!("{}{:08}", self.id_prefix, next - 1)
                }
            };
            for &m in members {
                ids[m] = id.clone();
            }
        }
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
            let source = &self.sources[r.source].name;
            let matched_at = match existing.get(&(source.clone(), r.id.clone())) {
                Some((old_id, old_rule, t)) if *old_id == ids[i] && old_rule == rule_name => *t,
                _ => now,
            };
            src.push(source.as_str());
            sid.push(r.id.as_str());
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
        let batch = RecordBatch::try_new(map_schema(&self.id_column), columns)
            .map_err(|e| Error::Internal(format!("identity map: {e}")))?;
        Ok((batch, stats))
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

    #[test]
    fn union_find_joins_transitively() {
        let mut uf = UnionFind((0..5).collect());
        uf.union(0, 3);
        uf.union(3, 4);
        assert_eq!(uf.find(4), 0);
        assert_ne!(uf.find(1), uf.find(4));
    }
}
