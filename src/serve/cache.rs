//! `serve.cache`: the decoded columns of the tables queries read, kept in memory under a byte
//! budget, so that a query on an unchanged table neither reads nor decodes its Parquet files
//! again.
//!
//! A column is cached per table version. The first query that reads columns not yet cached is
//! answered from the files as before, and starts loading those columns in the background (one
//! load at a time, server-wide); the next query reading only cached columns is answered from
//! memory. A new table version is a new key: the old version's columns are dropped when the
//! server serves the new one. When the budget is full, the columns used longest ago make room;
//! columns that do not fit the budget at all are left to the files.
//!
//! Every column of a table version is cut into the same chunks (one per batch the Parquet
//! reader returns, file by file in the table's order), so columns loaded by different queries
//! line up row for row. A scan from the cache keeps the files' statistics, so the plan (join
//! order, build sides) is the one the files would get.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Statistics;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{
    Boundedness, ChildrenPropertiesMode, EmissionType, ReplaceChildrenOptions,
};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};
use futures::StreamExt;

use crate::warehouse::DataFile;

/// The columns kept, shared by every role session of a server.
pub struct ColumnCache {
    budget: usize,
    keep: Duration,
    state: Mutex<State>,
    /// One load at a time: loading decodes whole columns, and queries come first.
    loads: tokio::sync::Semaphore,
}

#[derive(Default)]
struct State {
    columns: HashMap<Key, Column>,
    /// Rows of each chunk of a table version; every cached column of it is cut alike.
    layouts: HashMap<(String, u64), Arc<Vec<usize>>>,
    used: usize,
    clock: u64,
    /// Being loaded now.
    pending: HashSet<Key>,
    /// Larger than the budget, or failed to load: left to the files.
    refused: HashSet<Key>,
    /// Found no room when last tried (every held column in use): not tried again before the
    /// held ones may go.
    deferred: HashMap<Key, Instant>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    table: String,
    version: u64,
    column: String,
}

impl Key {
    fn new(table: &str, version: u64, column: &str) -> Key {
        Key {
            table: table.to_string(),
            version,
            column: column.to_string(),
        }
    }
}

struct Column {
    chunks: Arc<Vec<ArrayRef>>,
    bytes: usize,
    last_used: u64,
    touched: Instant,
}

/// What the cache holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Columns (of one table version each).
    pub columns: usize,
    /// Their decoded size.
    pub bytes: usize,
}

/// Cached columns of one table version, in the order asked for.
type Found = (Arc<Vec<usize>>, Vec<Arc<Vec<ArrayRef>>>);

impl State {
    /// Drop the columns of `key`s `gone` says, giving their bytes back.
    fn drop_where(&mut self, gone: impl Fn(&Key) -> bool) {
        let mut freed = 0;
        self.columns.retain(|k, c| {
            if gone(k) {
                freed += c.bytes;
                return false;
            }
            true
        });
        self.used -= freed;
    }

    /// Drop columns not used within `keep` (the one used longest ago first) until `bytes` more
    /// fit `budget`; whether they do.
    fn make_room(&mut self, bytes: usize, budget: usize, keep: Duration) -> bool {
        if bytes > budget {
            return false;
        }
        while self.used + bytes > budget {
            let Some(oldest) = self
                .columns
                .iter()
                .filter(|(_, c)| c.touched.elapsed() >= keep)
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(c) = self.columns.remove(&oldest) {
                self.used -= c.bytes;
            }
        }
        self.used + bytes <= budget
    }
}

impl fmt::Debug for ColumnCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.held();
        write!(
            f,
            "ColumnCache({} columns, {} of {} bytes)",
            held.columns, held.bytes, self.budget
        )
    }
}

/// How long a column used by a query is kept from being evicted for another's: when the
/// columns queries read in turn outgrow the cache, it keeps the ones it holds instead of
/// loading and evicting on every query.
pub const KEEP_USED_FOR: Duration = Duration::from_secs(300);

impl ColumnCache {
    /// A cache holding at most `budget` bytes of decoded columns (0: none).
    pub fn new(budget: usize) -> ColumnCache {
        ColumnCache::keeping(budget, KEEP_USED_FOR)
    }

    /// [`ColumnCache::new`], a column used within `keep` not evicted for another.
    pub fn keeping(budget: usize, keep: Duration) -> ColumnCache {
        ColumnCache {
            budget,
            keep,
            state: Mutex::new(State::default()),
            loads: tokio::sync::Semaphore::new(1),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Columns and bytes held.
    pub fn held(&self) -> Held {
        let s = self.state();
        Held {
            columns: s.columns.len(),
            bytes: s.used,
        }
    }

    /// Drop the columns of table versions other than `versions` (the ones served now).
    pub fn retain(&self, versions: &BTreeMap<String, u64>) {
        let mut s = self.state();
        let current = |table: &str, version: u64| versions.get(table) == Some(&version);
        s.drop_where(|k| !current(&k.table, k.version));
        s.layouts.retain(|(t, v), _| current(t, *v));
        s.refused.retain(|k| current(&k.table, k.version));
        s.deferred.retain(|k, _| current(&k.table, k.version));
    }

    /// `columns` of a table version when all of them are held.
    fn get(&self, table: &str, version: u64, columns: &[String]) -> Option<Found> {
        let mut s = self.state();
        let layout = s.layouts.get(&(table.to_string(), version))?.clone();
        s.clock += 1;
        let now = s.clock;
        let keys: Vec<Key> = columns
            .iter()
            .map(|c| Key::new(table, version, c))
            .collect();
        if !keys.iter().all(|k| s.columns.contains_key(k)) {
            return None;
        }
        let mut found = Vec::with_capacity(keys.len());
        for k in &keys {
            let column = s.columns.get_mut(k)?;
            column.last_used = now;
            column.touched = Instant::now();
            found.push(column.chunks.clone());
        }
        Some((layout, found))
    }

    /// Of `columns`, the ones to load now (neither held, nor loading, nor refused); they are
    /// marked as loading.
    fn claim(&self, table: &str, version: u64, columns: &[String]) -> Vec<String> {
        let mut s = self.state();
        let mut claimed = Vec::new();
        for c in columns {
            let key = Key::new(table, version, c);
            let deferred = s
                .deferred
                .get(&key)
                .is_some_and(|t| t.elapsed() < self.keep);
            if s.columns.contains_key(&key)
                || s.pending.contains(&key)
                || s.refused.contains(&key)
                || deferred
            {
                continue;
            }
            s.deferred.remove(&key);
            s.pending.insert(key);
            claimed.push(c.clone());
        }
        claimed
    }

    /// Drop the columns used longest ago until `bytes` more fit the budget; whether they do.
    /// A load calls it as it reads, so the cache and the columns being loaded stay within the
    /// budget together.
    fn make_room(&self, bytes: usize) -> bool {
        self.state().make_room(bytes, self.budget, self.keep)
    }

    /// No room for `columns` now: tried again once the held columns may go.
    fn defer(&self, table: &str, version: u64, columns: &[String]) {
        let mut s = self.state();
        for c in columns {
            let key = Key::new(table, version, c);
            s.pending.remove(&key);
            s.deferred.insert(key, Instant::now());
        }
    }

    /// Loading `columns` failed or they do not fit: leave them to the files.
    fn refuse(&self, table: &str, version: u64, columns: &[String]) {
        let mut s = self.state();
        for c in columns {
            let key = Key::new(table, version, c);
            s.pending.remove(&key);
            s.refused.insert(key);
        }
    }

    /// Keep the loaded `columns` (cut into chunks of `layout` rows), making room by dropping the
    /// columns used longest ago; their bytes when kept.
    fn insert(
        &self,
        table: &str,
        version: u64,
        layout: Vec<usize>,
        columns: Vec<(String, Vec<ArrayRef>)>,
    ) -> Option<usize> {
        let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
        let sized: Vec<(String, Vec<ArrayRef>, usize)> = columns
            .into_iter()
            .map(|(n, chunks)| {
                let bytes = chunks.iter().map(|a| a.get_array_memory_size()).sum();
                (n, chunks, bytes)
            })
            .collect();
        let bytes: usize = sized.iter().map(|(_, _, b)| b).sum();
        if bytes > self.budget {
            self.refuse(table, version, &names);
            return None;
        }
        let mut s = self.state();
        let id = (table.to_string(), version);
        // Another cut (it cannot happen for the same files and reader; should it, the columns
        // held would no longer line up with the new ones, so they go).
        if s.layouts.get(&id).is_some_and(|l| **l != layout) {
            s.drop_where(|k| k.table == table && k.version == version);
        }
        s.layouts.insert(id, Arc::new(layout));
        if !s.make_room(bytes, self.budget, self.keep) {
            drop(s);
            self.defer(table, version, &names);
            return None;
        }
        s.clock += 1;
        let now = s.clock;
        for (name, chunks, size) in sized {
            let key = Key::new(table, version, &name);
            s.pending.remove(&key);
            s.columns.insert(
                key,
                Column {
                    chunks: Arc::new(chunks),
                    bytes: size,
                    last_used: now,
                    touched: Instant::now(),
                },
            );
            s.used += size;
        }
        Some(bytes)
    }
}

/// A served table whose scans come from the cache when every column they read is held.
#[derive(Debug)]
pub struct CachedTable {
    name: String,
    version: u64,
    files: Arc<Vec<DataFile>>,
    inner: Arc<dyn TableProvider>,
    cache: Arc<ColumnCache>,
}

impl CachedTable {
    /// `inner` (the table's files at `version`) read through `cache`.
    pub fn new(
        name: &str,
        version: u64,
        files: &[DataFile],
        inner: Arc<dyn TableProvider>,
        cache: Arc<ColumnCache>,
    ) -> CachedTable {
        CachedTable {
            name: name.to_string(),
            version,
            files: Arc::new(files.to_vec()),
            inner,
            cache,
        }
    }

    /// Load `columns` in the background, after any load already running.
    fn start_load(&self, state: &dyn Session, columns: Vec<String>) {
        let Some(state) = state.as_any().downcast_ref::<SessionState>().cloned() else {
            self.cache.refuse(&self.name, self.version, &columns);
            return;
        };
        let (name, version) = (self.name.clone(), self.version);
        let (files, schema, cache) = (self.files.clone(), self.schema(), self.cache.clone());
        tokio::spawn(async move {
            let Ok(_turn) = cache.loads.acquire().await else {
                return;
            };
            match load(&state, &files, &schema, &columns, &cache).await {
                Ok(Loaded::Columns(layout, loaded)) => {
                    let bytes = cache.insert(&name, version, layout, loaded);
                    tracing::debug!(table = %name, version, ?columns, ?bytes, "columns cached");
                }
                Ok(Loaded::NoRoom) => {
                    tracing::debug!(table = %name, version, ?columns, "no room in serve.cache now; read from the files");
                    cache.defer(&name, version, &columns);
                }
                Ok(Loaded::TooLarge) => {
                    tracing::debug!(table = %name, version, ?columns, "columns larger than serve.cache; read from the files");
                    cache.refuse(&name, version, &columns);
                }
                Err(e) => {
                    tracing::warn!(table = %name, version, "caching columns failed, the files are read instead: {e}");
                    cache.refuse(&name, version, &columns);
                }
            }
        });
    }
}

/// What loading columns came to.
enum Loaded {
    /// The rows of each chunk, and the chunks of each column.
    Columns(Vec<usize>, Vec<(String, Vec<ArrayRef>)>),
    /// Larger than the whole cache.
    TooLarge,
    /// Every held column was in use: no room now.
    NoRoom,
}

/// `columns` of the table of `files`, read file by file. Held columns not in use make room as
/// the load grows.
async fn load(
    state: &SessionState,
    files: &[DataFile],
    schema: &SchemaRef,
    columns: &[String],
    cache: &ColumnCache,
) -> Result<Loaded> {
    let projection = columns
        .iter()
        .map(|c| schema.index_of(c))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut layout = Vec::new();
    let mut chunks: Vec<Vec<ArrayRef>> = vec![Vec::new(); columns.len()];
    let mut bytes = 0usize;
    for file in files {
        let provider =
            crate::warehouse::table_files_provider(std::slice::from_ref(file), schema.clone())
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let plan = provider.scan(state, Some(&projection), &[], None).await?;
        // The file's rows in their order: partition after partition (one, unless the scan
        // was split by byte ranges, which come in file order).
        for partition in 0..plan.properties().partitioning.partition_count() {
            let mut stream = plan.execute(partition, state.task_ctx())?;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                bytes += batch.get_array_memory_size();
                if bytes > cache.budget {
                    return Ok(Loaded::TooLarge);
                }
                if !cache.make_room(bytes) {
                    return Ok(Loaded::NoRoom);
                }
                layout.push(batch.num_rows());
                for (i, column) in batch.columns().iter().enumerate() {
                    chunks[i].push(column.clone());
                }
            }
        }
    }
    Ok(Loaded::Columns(
        layout,
        columns.iter().cloned().zip(chunks).collect(),
    ))
}

#[async_trait::async_trait]
impl TableProvider for CachedTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // A scan from the cache does not filter: the filter stays above every scan.
        Ok(self
            .inner
            .supports_filters_pushdown(filters)?
            .into_iter()
            .map(|p| match p {
                TableProviderFilterPushDown::Exact => TableProviderFilterPushDown::Inexact,
                other => other,
            })
            .collect())
    }

    fn statistics(&self) -> Option<Statistics> {
        self.inner.statistics()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let files = self.inner.scan(state, projection, filters, limit).await?;
        let schema = files.schema();
        let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        if columns.is_empty() || self.cache.budget == 0 {
            return Ok(files);
        }
        if let Some((layout, found)) = self.cache.get(&self.name, self.version, &columns) {
            let statistics =
                StatisticsContext::new().compute(files.as_ref(), &StatisticsArgs::new())?;
            let partitions = state.config().target_partitions();
            return Ok(Arc::new(CachedScan::new(
                schema, &layout, &found, statistics, partitions,
            )?));
        }
        let missing = self.cache.claim(&self.name, self.version, &columns);
        if !missing.is_empty() {
            self.start_load(state, missing);
        }
        Ok(files)
    }
}

/// A scan of cached chunks, spread over partitions in turn, with the files' statistics.
#[derive(Debug)]
struct CachedScan {
    partitions: Vec<Vec<RecordBatch>>,
    schema: SchemaRef,
    statistics: Arc<Statistics>,
    properties: Arc<PlanProperties>,
}

impl CachedScan {
    fn new(
        schema: SchemaRef,
        layout: &[usize],
        columns: &[Arc<Vec<ArrayRef>>],
        statistics: Arc<Statistics>,
        partitions: usize,
    ) -> Result<CachedScan> {
        let partitions = partitions.clamp(1, layout.len().max(1));
        let mut out = vec![Vec::new(); partitions];
        for (i, rows) in layout.iter().enumerate() {
            if *rows == 0 {
                continue;
            }
            let arrays = columns.iter().map(|c| c[i].clone()).collect();
            out[i % partitions].push(RecordBatch::try_new(schema.clone(), arrays)?);
        }
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(CachedScan {
            partitions: out,
            schema,
            statistics,
            properties: Arc::new(properties),
        })
    }
}

impl DisplayAs for CachedScan {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let batches: usize = self.partitions.iter().map(Vec::len).sum();
        write!(
            f,
            "CachedScan: partitions={}, batches={batches}",
            self.partitions.len()
        )
    }
}

impl ExecutionPlan for CachedScan {
    fn name(&self) -> &str {
        "CachedScan"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let batches = self.partitions.get(partition).cloned().ok_or_else(|| {
            DataFusionError::Internal(format!("CachedScan has no partition {partition}"))
        })?;
        Ok(Box::pin(MemoryStream::try_new(
            batches,
            self.schema.clone(),
            None,
        )?))
    }

    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        Ok(match args.partition() {
            None => self.statistics.clone(),
            Some(_) => Arc::new(Statistics::new_unknown(&self.schema)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;

    /// One column of `chunks` chunks of 1,000 rows.
    fn column(chunks: usize) -> Vec<ArrayRef> {
        (0..chunks)
            .map(|i| {
                Arc::new(Int64Array::from_iter_values(
                    i as i64 * 1000..(i as i64 + 1) * 1000,
                )) as ArrayRef
            })
            .collect()
    }

    fn names(cache: &ColumnCache) -> Vec<String> {
        let mut out: Vec<String> = cache
            .state()
            .columns
            .keys()
            .map(|k| format!("{}@{}.{}", k.table, k.version, k.column))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_columns_used_longest_ago_make_room() {
        let one = column(2)
            .iter()
            .map(|a| a.get_array_memory_size())
            .sum::<usize>();
        let cache = ColumnCache::keeping(3 * one, Duration::ZERO);
        for c in ["a", "b", "c"] {
            assert_eq!(cache.claim("t", 1, &[c.to_string()]), vec![c.to_string()]);
            cache.insert("t", 1, vec![1000, 1000], vec![(c.to_string(), column(2))]);
        }
        assert_eq!(
            cache.held(),
            Held {
                columns: 3,
                bytes: 3 * one
            }
        );
        // `a` is read again, so `b` is the one used longest ago.
        assert!(cache.get("t", 1, &["a".into()]).is_some());
        cache.insert("t", 1, vec![1000, 1000], vec![("d".into(), column(2))]);
        assert_eq!(names(&cache), ["t@1.a", "t@1.c", "t@1.d"]);
        assert!(cache.get("t", 1, &["a".into(), "b".into()]).is_none());
        // Held, loading or refused columns are not claimed again.
        assert!(cache.claim("t", 1, &["a".into()]).is_empty());
        assert_eq!(cache.claim("t", 1, &["e".into()]), vec!["e".to_string()]);
        assert!(cache.claim("t", 1, &["e".into()]).is_empty());
        // A column larger than the budget is refused for good, and evicts nothing.
        cache.insert("t", 1, vec![1000; 8], vec![("e".into(), column(8))]);
        assert_eq!(names(&cache), ["t@1.a", "t@1.c", "t@1.d"]);
        assert!(cache.claim("t", 1, &["e".into()]).is_empty());
        // A load growing to two columns' size makes room as it reads: the cache and the load
        // stay within the budget together.
        assert!(cache.make_room(2 * one));
        assert_eq!(names(&cache), ["t@1.d"]);
        assert!(!cache.make_room(3 * one + 1));
    }

    #[test]
    fn columns_in_use_are_not_evicted_for_others() {
        let one = column(2)
            .iter()
            .map(|a| a.get_array_memory_size())
            .sum::<usize>();
        let cache = ColumnCache::keeping(2 * one, Duration::from_secs(3600));
        for c in ["a", "b"] {
            cache.claim("t", 1, &[c.to_string()]);
            cache.insert("t", 1, vec![1000, 1000], vec![(c.to_string(), column(2))]);
        }
        // Queries reading more than the cache holds, in turn: what it holds stays, the rest is
        // read from the files and not tried again for a while.
        assert_eq!(cache.claim("t", 1, &["c".into()]), vec!["c".to_string()]);
        assert!(!cache.make_room(one));
        cache.insert("t", 1, vec![1000, 1000], vec![("c".into(), column(2))]);
        assert_eq!(names(&cache), ["t@1.a", "t@1.b"]);
        assert!(cache.claim("t", 1, &["c".into()]).is_empty());
        // Once they are no longer in use, they make room.
        let cache = ColumnCache::keeping(2 * one, Duration::ZERO);
        for c in ["a", "b", "c"] {
            cache.insert("t", 1, vec![1000, 1000], vec![(c.to_string(), column(2))]);
        }
        assert_eq!(names(&cache), ["t@1.b", "t@1.c"]);
    }

    #[test]
    fn a_new_version_replaces_the_old_ones_columns() {
        let cache = ColumnCache::new(1 << 30);
        cache.insert("t", 1, vec![1000, 1000], vec![("a".into(), column(2))]);
        cache.insert("u", 4, vec![1000], vec![("a".into(), column(1))]);
        cache.insert("t", 2, vec![1000], vec![("a".into(), column(1))]);
        cache.retain(&BTreeMap::from([
            ("t".to_string(), 2),
            ("u".to_string(), 4),
        ]));
        assert_eq!(names(&cache), ["t@2.a", "u@4.a"]);
        let bytes = column(1)[0].get_array_memory_size();
        assert_eq!(
            cache.held(),
            Held {
                columns: 2,
                bytes: 2 * bytes
            }
        );
        // Columns of one version cut otherwise would not line up: the old cut goes.
        cache.insert("t", 2, vec![500, 500], vec![("b".into(), column(1))]);
        assert_eq!(names(&cache), ["t@2.b", "u@4.a"]);
        let (layout, found) = cache.get("t", 2, &["b".into()]).unwrap();
        assert_eq!((layout.as_slice(), found.len()), ([500, 500].as_slice(), 1));
    }

    #[test]
    fn a_scan_of_cached_chunks_spreads_them_over_the_partitions() {
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let chunks = Arc::new(column(5));
        let statistics = Arc::new(Statistics::new_unknown(&schema));
        let scan = CachedScan::new(schema.clone(), &[1000; 5], &[chunks], statistics, 2).unwrap();
        let rows: Vec<usize> = scan
            .partitions
            .iter()
            .map(|p| p.iter().map(RecordBatch::num_rows).sum())
            .collect();
        assert_eq!(rows, [3000, 2000]);
        // More partitions than chunks: one per chunk.
        let one = CachedScan::new(
            schema.clone(),
            &[1000],
            &[Arc::new(column(1))],
            Arc::new(Statistics::new_unknown(&schema)),
            8,
        )
        .unwrap();
        assert_eq!(one.partitions.len(), 1);
    }
}
