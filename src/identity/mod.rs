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

mod assign;
mod golden;
pub mod normalize;
mod records;
mod since;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::prelude::SessionContext;

use crate::config::types::UTC;
use crate::error::{Error, Result};
use crate::plan::{Identity, RecordSource};
use crate::plan::{Normalizer, Survivorship};
use crate::sql::{column_list, quote_ident};
use crate::warehouse::delta_compatible_batch;
use records::*;
use since::{Scan, group_sizes, kept_records, rows_of_ids, touched_ids};

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
        let (last, added, existing) = match self.read_since(ctx, since, threads, started).await? {
            Ok(read) => read,
            Err(reason) => return Ok(Err(reason)),
        };
        let loaded = added.recs.len();
        let rules = self.rules.len();
        let source_index = self.source_index();
        let rule_index = self.rule_index();
        let Scan {
            held,
            mut rules_then,
            old_of_added,
        } = match self.scan_keys_table(&existing, &added, &source_index, &rule_index) {
            Ok(scan) => scan,
            Err(reason) => return Ok(Err(reason)),
        };
        if let Err(reason) = self.check_row_counts(since, &added, &old_of_added, &held) {
            return Ok(Err(reason));
        }
        // The ids the added rows reach; then every record of those ids, in the table's order.
        let ids = touched_ids(&existing, &added, &old_of_added, rules);
        let rows = rows_of_ids(&existing, &ids);
        let sizes = group_sizes(&existing, &added, &old_of_added, &rows, rules);
        let Some(oversized_now) = self.oversized_now(last, &sizes) else {
            return Ok(Err(
                "the recorded figures do not fit the match-key table".into()
            ));
        };
        let (mut records, mut known) = kept_records(
            &existing,
            &source_index,
            &rows,
            &old_of_added,
            rules,
            loaded,
        );
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
}
