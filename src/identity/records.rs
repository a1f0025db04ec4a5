//! The records of a resolution in flat storage, their match keys, the map read back, and the
//! union-find that joins them.

use super::*;

/// A span of [`Records::text`].
pub(super) type Span = (usize, usize);

/// One record: its source (by index), its id and where its keys are.
pub(super) struct Rec {
    pub(super) source: usize,
    pub(super) id: Span,
    /// Index of its key under the first rule in [`Records::keys`].
    pub(super) keys: usize,
}

/// A record's key under one rule: the 128-bit xxh3 hash of its normalised fields. Records
/// agree on a rule when their keys are equal; two different field values share a hash with odds
/// of about n²/2¹²⁹ among n values (1 in 10²² for 10⁹ values).
pub(super) type Key = u128;

/// A key as the two 64-bit halves the match-key table stores.
pub(super) fn split_key(key: Key) -> (i64, i64) {
    ((key >> 64) as u64 as i64, key as u64 as i64)
}

/// The key of the two halves [`split_key`] made.
pub(super) fn join_key(hi: i64, lo: i64) -> Key {
    ((hi as u64 as Key) << 64) | lo as u64 as Key
}

/// The two halves of rule `rule`'s keys in a batch of the match-key table.
pub(super) fn key_halves(
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
pub(super) fn key_at(
    (hi, lo): (&arrow::array::Int64Array, &arrow::array::Int64Array),
    i: usize,
) -> Option<Key> {
    (hi.is_valid(i) && lo.is_valid(i)).then(|| join_key(hi.value(i), lo.value(i)))
}

/// The key of normalised field values (joined by a unit separator when a rule has several).
pub(super) fn key_of<'a>(mut values: impl Iterator<Item = &'a str>, buf: &mut String) -> Key {
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
pub(super) struct Records {
    pub(super) text: String,
    pub(super) recs: Vec<Rec>,
    /// Keys, one per rule for each record, in rule order (`None`: a field is missing).
    pub(super) keys: Vec<Option<Key>>,
    /// Rows skipped for having no id.
    pub(super) without_id: usize,
}

impl Records {
    pub(super) fn push_text(&mut self, s: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(s);
        (start, self.text.len())
    }

    pub(super) fn str(&self, (start, end): Span) -> &str {
        &self.text[start..end]
    }

    /// Add a record of source `si` with these keys.
    pub(super) fn push(
        &mut self,
        si: usize,
        id: &str,
        keys: impl IntoIterator<Item = Option<Key>>,
    ) {
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
    pub(super) fn append(&mut self, part: Records) {
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

    pub(super) fn id(&self, r: &Rec) -> &str {
        self.str(r.id)
    }

    /// The record's key under rule `rule`.
    pub(super) fn key(&self, r: &Rec, rule: usize) -> Option<Key> {
        self.keys[r.keys + rule]
    }

    /// Sort by source priority, then id; a source's id repeated keeps its first record.
    pub(super) fn sort_and_dedup(&mut self) {
        let mut recs = std::mem::take(&mut self.recs);
        recs.sort_by(|a, b| (a.source, self.id(a)).cmp(&(b.source, self.id(b))));
        recs.dedup_by(|a, b| a.source == b.source && self.id(a) == self.id(b));
        self.recs = recs;
    }
}

/// Rows of an earlier resolution: the map's (source, source_id, id, rule, matched_at), or the
/// match-key table's (source, source_id, id, rule, then a key per rule).
pub(super) struct Existing {
    pub(super) batches: Vec<RecordBatch>,
    /// Largest number among the ids made by this resolution.
    pub(super) largest: u64,
}

/// One row of the existing map: (batch, row).
pub(super) type MapRow = (usize, usize);

impl Existing {
    /// The rows of `sql` (none when `table` does not exist), noting the largest id number.
    pub(super) async fn read(
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

    pub(super) fn text(&self, (b, i): MapRow, column: usize) -> &str {
        self.batches[b].column(column).as_string::<i32>().value(i)
    }

    pub(super) fn id(&self, row: MapRow) -> &str {
        self.text(row, 2)
    }

    pub(super) fn rule(&self, row: MapRow) -> &str {
        self.text(row, 3)
    }

    pub(super) fn matched_at(&self, (b, i): MapRow) -> i64 {
        self.batches[b]
            .column(4)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .value(i)
    }

    /// A row's key of rule `rule`, when `self` is the match-key table.
    pub(super) fn key(&self, (b, i): MapRow, rule: usize) -> Option<Key> {
        key_at(key_halves(&self.batches[b], rule), i)
    }

    /// Per record source (by index): record id -> its row. Records of a source no longer
    /// declared keep no id.
    pub(super) fn index(&self, sources: &[RecordSource]) -> Vec<FastMap<&str, MapRow>> {
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
pub(super) type FastMap<K, V> = datafusion::common::HashMap<K, V>;

/// DataFusion's hash set, as [`FastMap`].
pub(super) type FastSet<T> = datafusion::common::HashSet<T>;

/// The records' groups under one rule: each record's group (none without a key), and each
/// group's first record and size.
pub(super) struct Grouping {
    pub(super) group_of: Vec<Option<usize>>,
    pub(super) groups: Vec<(usize, usize)>,
}

/// The groups of the records that agree on rule `rule`.
pub(super) fn group_by_key(records: &Records, rule: usize) -> Grouping {
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
pub(super) fn run_split<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
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

pub(super) struct UnionFind(pub(super) Vec<usize>);

impl UnionFind {
    pub(super) fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }

    pub(super) fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.0[hi] = lo;
        }
    }
}

/// A text column of `value` at each of `rows`.
pub(super) fn strings<'a>(rows: &[usize], value: impl Fn(usize) -> &'a str) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(
        rows.iter().map(|&i| value(i)),
    ))
}
