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
}
