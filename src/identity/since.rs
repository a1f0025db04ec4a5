//! The parts of a resolution of added rows (`Identity::resolve_since`): the match-key table
//! read and checked against the record tables, and the records an added row can affect.

use super::*;

/// What one pass over the match-key table found.
pub(super) struct Scan {
    /// Rows per record source.
    pub(super) held: Vec<usize>,
    /// Rows per rule, "unmatched" last.
    pub(super) rules_then: Vec<usize>,
    /// The row of each added record that had one (the old version of a changed record).
    pub(super) old_of_added: Vec<Option<MapRow>>,
}

impl Identity {
    /// The last resolution's figures, the records of the rows added since, and the match-key
    /// table (read side by side); or why a resolution of added rows cannot be made from them.
    pub(super) async fn read_since(
        &self,
        ctx: &SessionContext,
        since: &Since,
        threads: usize,
        started: std::time::Instant,
    ) -> Result<std::result::Result<(LastFigures, Records, Existing), String>> {
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
        Ok(Ok((last, added, existing)))
    }

    /// Each record source's index, by name.
    pub(super) fn source_index(&self) -> HashMap<&str, usize> {
        self.sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect()
    }

    /// Each rule's index, by name, "unmatched" last.
    pub(super) fn rule_index(&self) -> HashMap<&str, usize> {
        self.rules
            .iter()
            .map(|(name, _)| name.as_str())
            .chain(std::iter::once("unmatched"))
            .enumerate()
            .map(|(i, name)| (name, i))
            .collect()
    }

    /// Every row of the match-key table: its source counted, its rule counted, and the rows of
    /// added records (new versions of changed ones) found; or why the table does not fit the
    /// declared sources and rules.
    pub(super) fn scan_keys_table(
        &self,
        existing: &Existing,
        added: &Records,
        source_index: &HashMap<&str, usize>,
        rule_index: &HashMap<&str, usize>,
    ) -> std::result::Result<Scan, String> {
        let added_at: FastMap<(usize, &str), usize> = added
            .recs
            .iter()
            .enumerate()
            .map(|(j, r)| ((r.source, added.id(r)), j))
            .collect();
        let mut held = vec![0usize; self.sources.len()];
        let mut rules_then = vec![0usize; self.rules.len() + 1];
        let mut old_of_added: Vec<Option<MapRow>> = vec![None; added.recs.len()];
        for (b, batch) in existing.batches.iter().enumerate() {
            let source = batch.column(0).as_string::<i32>();
            let record = batch.column(1).as_string::<i32>();
            let rule = batch.column(3).as_string::<i32>();
            for i in 0..batch.num_rows() {
                let Some(&si) = source_index.get(source.value(i)) else {
                    return Err(format!(
                        "the match-key table holds records of source '{}', which is not declared",
                        source.value(i)
                    ));
                };
                let Some(&ri) = rule_index.get(rule.value(i)) else {
                    return Err(format!(
                        "the match-key table holds rule '{}', which is not declared",
                        rule.value(i)
                    ));
                };
                held[si] += 1;
                rules_then[ri] += 1;
                if let Some(&j) = added_at.get(&(si, record.value(i))) {
                    old_of_added[j] = Some((b, i));
                }
            }
        }
        Ok(Scan {
            held,
            rules_then,
            old_of_added,
        })
    }

    /// Whether the record tables hold exactly the records the match-key table holds plus the
    /// new ones (a record that went would otherwise keep its id); why not, when they do not.
    pub(super) fn check_row_counts(
        &self,
        since: &Since,
        added: &Records,
        old_of_added: &[Option<MapRow>],
        held: &[usize],
    ) -> std::result::Result<(), String> {
        for (si, s) in self.sources.iter().enumerate() {
            let new = added
                .recs
                .iter()
                .zip(old_of_added)
                .filter(|(r, old)| r.source == si && old.is_none())
                .count();
            if since.rows_then[si] != held[si] as u64
                || since.rows_now[si] != (held[si] + new) as u64
            {
                return Err(format!(
                    "table '{}' held {} rows and holds {} now, but the map had {} of its records \
                     and {new} are new (a record was removed, or rows repeat an id or have none)",
                    s.table, since.rows_then[si], since.rows_now[si], held[si]
                ));
            }
        }
        Ok(())
    }

    /// The groups past `max_group` in the whole table now: the last resolution's, changed by
    /// these keys' groups; `None` when the recorded figures do not fit.
    pub(super) fn oversized_now(
        &self,
        last: LastFigures,
        sizes: &[FastMap<Key, (usize, usize)>],
    ) -> Option<usize> {
        // Groups past `max_group` before and after: only these keys' groups changed size.
        let oversized = |then: bool| {
            sizes
                .iter()
                .flat_map(|keys| keys.values())
                .filter(|&&(before, after)| (if then { before } else { after }) > self.max_group)
                .count()
        };
        (last.oversized_groups + oversized(false)).checked_sub(oversized(true))
    }
}

/// The ids an added row can affect: those of every record sharing a key, old or new, with an
/// added record, and of the added records' old rows.
pub(super) fn touched_ids<'e>(
    existing: &'e Existing,
    added: &Records,
    old_of_added: &[Option<MapRow>],
    rules: usize,
) -> FastSet<&'e str> {
    // The keys whose groups change: the added records' keys and their old rows' keys.
    let mut touched: Vec<FastSet<Key>> = vec![FastSet::default(); rules];
    for (j, r) in added.recs.iter().enumerate() {
        for (ri, keys) in touched.iter_mut().enumerate() {
            keys.extend(added.key(r, ri));
            keys.extend(old_of_added[j].and_then(|row| existing.key(row, ri)));
        }
    }
    // The ids of every record in those groups, and of the added records' old rows.
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
    ids
}

/// Every record of `ids`, in the match-key table's order.
pub(super) fn rows_of_ids(existing: &Existing, ids: &FastSet<&str>) -> Vec<MapRow> {
    let mut rows: Vec<MapRow> = Vec::new();
    for (b, batch) in existing.batches.iter().enumerate() {
        let id = batch.column(2).as_string::<i32>();
        rows.extend(
            (0..batch.num_rows())
                .filter(|&i| ids.contains(id.value(i)))
                .map(|i| (b, i)),
        );
    }
    rows
}

/// The size of the groups of the keys of `rows` and of the added records, old and new, over
/// the whole match-key table: (before, after) the added rows.
pub(super) fn group_sizes(
    existing: &Existing,
    added: &Records,
    old_of_added: &[Option<MapRow>],
    rows: &[MapRow],
    rules: usize,
) -> Vec<FastMap<Key, (usize, usize)>> {
    let mut sizes: Vec<FastMap<Key, (usize, usize)>> = vec![FastMap::default(); rules];
    for (ri, keys) in sizes.iter_mut().enumerate() {
        for &row in rows {
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
    sizes
}

/// The records of `rows` to match again with the added ones, and each one's row: the old rows
/// of added records are left out, replaced by their new rows (which keep their old row, for
/// their id). Room is kept for the `loaded` added records' rows.
pub(super) fn kept_records(
    existing: &Existing,
    source_index: &HashMap<&str, usize>,
    rows: &[MapRow],
    old_of_added: &[Option<MapRow>],
    rules: usize,
    loaded: usize,
) -> (Records, Vec<Option<MapRow>>) {
    let replaced: FastSet<MapRow> = old_of_added.iter().flatten().copied().collect();
    let mut records = Records::default();
    let mut known: Vec<Option<MapRow>> = Vec::with_capacity(rows.len() + loaded);
    for &row in rows {
        if replaced.contains(&row) {
            continue;
        }
        let (b, i) = row;
        let si = source_index[existing.batches[b].column(0).as_string::<i32>().value(i)];
        let record = existing.batches[b].column(1).as_string::<i32>().value(i);
        records.push(si, record, (0..rules).map(|ri| existing.key(row, ri)));
        known.push(Some(row));
    }
    (records, known)
}
