//! Joining the records rule by rule into clusters and giving each its id.

use super::*;

impl Identity {
    /// Join the records rule by rule and give each cluster its id: the smallest its records had
    /// (`known`: each record's row of `existing`), or a new one. With `narrowed`, `existing`
    /// is the match-key table, the records are those an added row can affect (from the first
    /// index given on, the added ones), each key's group has the size given (over every
    /// record), and the map and key rows returned are only those that change; the figures are
    /// then those of these records. Otherwise `existing` is the map and both tables are
    /// returned whole.
    pub(super) fn assign(
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
        let (mut uf, rule_of, oversized) =
            self.match_records(&records, narrowed.map(|(_, sizes)| sizes), threads)?;
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "identity: records matched"
        );
        let clusters = clusters_of(&mut uf, recs.len());
        let mut stats = IdentityStats {
            entity: self.entity.clone(),
            records: recs.len(),
            oversized_groups: oversized,
            ..Default::default()
        };
        let mut new_ids = String::new();
        let chosen = self.choose_ids(&clusters, existing, &known, &mut new_ids, &mut stats);
        // Distinct ids: the pieces of a cluster that split keep its id, and are one entity.
        let kept: FastSet<&str> = chosen.iter().filter_map(|c| c.ok()).collect();
        stats.entities = kept.len() + stats.new_ids;
        drop(kept);
        let ids = ids_by_record(&clusters, &chosen, &new_ids, recs.len());
        let regrouped = regrouped_ids(
            records_before,
            &ids,
            known.iter().map(|k| k.map(|row| existing.id(row))),
        );
        let (rule_names, by_rule) = self.rule_names(&rule_of);
        stats.by_rule = by_rule;
        let assigned = Assigned {
            records: &records,
            existing,
            known: &known,
            ids: &ids,
            rule_names: &rule_names,
            rules: self.rules.len(),
        };
        let (map_rows, key_rows) = assigned.rows_to_write(first_added);
        let map = self.map_batch(&assigned, &map_rows, first_added, now)?;
        let keys = self.keys_batch(&assigned, &key_rows)?;
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

    /// Join the records rule by rule: the sets they form, the rule each record first joined
    /// by, and the number of groups past `max_group`. With `sizes`, each key's group has the
    /// size given (over every record) rather than its size among these records.
    fn match_records(
        &self,
        records: &Records,
        sizes: Option<&[FastMap<Key, usize>]>,
        threads: usize,
    ) -> Result<(UnionFind, Vec<Option<usize>>, usize)> {
        let recs = &records.recs;
        let mut uf = UnionFind((0..recs.len()).collect());
        let mut rule_of: Vec<Option<usize>> = vec![None; recs.len()];
        let mut oversized = 0;
        // Each rule's groups are found on their own, side by side; records are then joined
        // rule by rule, in priority order.
        let mut groupings = run_split(self.rules.len(), threads, |ri| group_by_key(records, ri));
        if let Some(sizes) = sizes {
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
        Ok((uf, rule_of, oversized))
    }

    /// Each cluster's id: the smallest id its records had, or a new one (its span of
    /// `new_ids`), counting the ids merged and made in `stats`.
    ///
    /// New ids are written into one text first, so that every record's id can be a slice. A
    /// cluster without an old id holds only new records; the added ones come sorted by source
    /// and id, so new ids are numbered as a whole resolution numbers them.
    fn choose_ids<'e>(
        &self,
        clusters: &[Vec<usize>],
        existing: &'e Existing,
        known: &[Option<MapRow>],
        new_ids: &mut String,
        stats: &mut IdentityStats,
    ) -> Vec<std::result::Result<&'e str, Span>> {
        let mut chosen: Vec<std::result::Result<&str, Span>> = Vec::with_capacity(clusters.len());
        let mut next = existing.largest + 1;
        for members in clusters {
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
        chosen
    }

    /// Each record's rule name ("unmatched" when no rule joined it), and the number of records
    /// under each rule, in rule order, "unmatched" last.
    fn rule_names(&self, rule_of: &[Option<usize>]) -> (Vec<&str>, Vec<(String, usize)>) {
        let mut by_rule = vec![0usize; self.rules.len() + 1];
        let rule_names: Vec<&str> = rule_of
            .iter()
            .map(|rule| match *rule {
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
        let by_rule: Vec<(String, usize)> = self
            .rules
            .iter()
            .map(|(n, _)| n.clone())
            .chain(std::iter::once("unmatched".to_string()))
            .zip(by_rule)
            .collect();
        (rule_names, by_rule)
    }

    /// The source name of each of `rows`.
    fn source_names(&self, recs: &[Rec], rows: &[usize]) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            rows.iter()
                .map(|&i| self.sources[recs[i].source].name.as_str()),
        ))
    }

    /// The map's rows of records `rows`: a record that kept its id and rule keeps its time of
    /// matching in a whole resolution; every other is matched `now`.
    fn map_batch(
        &self,
        a: &Assigned<'_>,
        rows: &[usize],
        first_added: Option<usize>,
        now: i64,
    ) -> Result<RecordBatch> {
        let (records, recs) = (a.records, &a.records.recs);
        let matched_at =
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|&i| {
                match (first_added, a.known[i]) {
                    (None, Some(row)) if !a.moved(i) => a.existing.matched_at(row),
                    _ => now,
                }
            }))
            .with_timezone(UTC);
        RecordBatch::try_new(
            map_schema(&self.id_column),
            vec![
                self.source_names(recs, rows),
                strings(rows, |i| records.id(&recs[i])),
                strings(rows, |i| a.ids[i]),
                strings(rows, |i| a.rule_names[i]),
                Arc::new(matched_at),
            ],
        )
        .map_err(|e| Error::Internal(format!("identity map: {e}")))
    }

    /// The match-key table's rows of records `rows`: the map's columns, then each rule's key
    /// in two halves.
    fn keys_batch(&self, a: &Assigned<'_>, rows: &[usize]) -> Result<RecordBatch> {
        let (records, recs) = (a.records, &a.records.recs);
        let mut key_columns = vec![
            self.source_names(recs, rows),
            strings(rows, |i| records.id(&recs[i])),
            strings(rows, |i| a.ids[i]),
            strings(rows, |i| a.rule_names[i]),
        ];
        for ri in 0..self.rules.len() {
            let halves: Vec<Option<(i64, i64)>> = rows
                .iter()
                .map(|&i| records.key(&recs[i], ri).map(split_key))
                .collect();
            for half in [|(hi, _): (i64, i64)| hi, |(_, lo): (i64, i64)| lo] {
                key_columns.push(Arc::new(arrow::array::Int64Array::from_iter(
                    halves.iter().map(|h| h.map(half)),
                )));
            }
        }
        RecordBatch::try_new(self.keys_schema(), key_columns)
            .map_err(|e| Error::Internal(format!("identity match keys: {e}")))
    }
}

/// The clusters of the joined records, each a list of its records. A set's root is its
/// smallest member, so clusters come in order of first record.
fn clusters_of(uf: &mut UnionFind, n: usize) -> Vec<Vec<usize>> {
    let mut cluster_of: Vec<usize> = vec![usize::MAX; n];
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        let root = uf.find(i);
        if cluster_of[root] == usize::MAX {
            cluster_of[root] = clusters.len();
            clusters.push(Vec::new());
        }
        clusters[cluster_of[root]].push(i);
    }
    clusters
}

/// Each of `n` records' id: its cluster's, an old id or a span of `new_ids`.
fn ids_by_record<'a>(
    clusters: &[Vec<usize>],
    chosen: &[std::result::Result<&'a str, Span>],
    new_ids: &'a str,
    n: usize,
) -> Vec<&'a str> {
    let mut ids: Vec<&str> = vec![""; n];
    for (members, id) in clusters.iter().zip(chosen) {
        let id = match *id {
            Ok(id) => id,
            Err((start, end)) => &new_ids[start..end],
        };
        for &m in members {
            ids[m] = id;
        }
    }
    ids
}

/// The records with their ids and rules as assigned, and what they had before.
struct Assigned<'a> {
    records: &'a Records,
    existing: &'a Existing,
    known: &'a [Option<MapRow>],
    ids: &'a [&'a str],
    rule_names: &'a [&'a str],
    /// The number of rules.
    rules: usize,
}

impl Assigned<'_> {
    /// Whether record `i` is new, or its id or rule changed.
    fn moved(&self, i: usize) -> bool {
        match self.known[i] {
            Some(row) => {
                self.existing.id(row) != self.ids[i]
                    || self.existing.rule(row) != self.rule_names[i]
            }
            None => true,
        }
    }

    /// Whether record `i` is new, or one of its keys changed.
    fn rekeyed(&self, i: usize) -> bool {
        match self.known[i] {
            Some(row) => (0..self.rules).any(|ri| {
                self.existing.key(row, ri) != self.records.key(&self.records.recs[i], ri)
            }),
            None => true,
        }
    }

    /// The records to write to the map and to the match-key table: every record, or with
    /// `first_added`, those whose id or rule changed and, for the key table, the added ones
    /// whose keys changed too (an edited record whose match fields stayed keeps its row).
    fn rows_to_write(&self, first_added: Option<usize>) -> (Vec<usize>, Vec<usize>) {
        let n = self.records.recs.len();
        match first_added {
            None => ((0..n).collect(), (0..n).collect()),
            Some(first) => (
                (0..n).filter(|&i| self.moved(i)).collect(),
                (0..n)
                    .filter(|&i| self.moved(i) || (i >= first && self.rekeyed(i)))
                    .collect(),
            ),
        }
    }
}
