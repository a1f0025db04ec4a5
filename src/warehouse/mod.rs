//! The warehouse: one Delta table per folder under the warehouse URL.
//!
//! Reads go through the committed table versions. Writes are staged first (data files written,
//! nothing committed, see [`mod@write`]) and committed together at the end of a pipeline run through
//! a run manifest, so that a failed run changes no table and a run killed while committing is
//! completed by the next command that opens the warehouse ([`Warehouse::recover`]).
//!
//! A stage: owns the Delta tables, staged writes and commits, the run history and state, and
//! read-only queries over committed tables ([`query`]). May import `engine`, `plan`, `config`
//! and the leaves; never `sources`, `identity` or anything above.

mod commit;
pub mod deletion;
mod digest;
pub mod history;
pub mod query;
pub mod scd2;
mod schema;
pub mod state;
pub mod upkeep;
pub mod write;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::empty::EmptyTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use url::Url;

use crate::error::{Error, Result};
use crate::storage::store_for;

pub use commit::{RUN_ID_KEY, commit_run};
pub use deletion::DataFile;
pub use upkeep::{TableFiles, Vacuumed};

/// Passes a served table's provider through: its name, version, files and the provider.
pub type Wrap<'a> =
    dyn Fn(&str, u64, &[DataFile], Arc<dyn TableProvider>) -> Arc<dyn TableProvider> + Sync + 'a;
pub use schema::{conform_batch, delta_compatible, delta_compatible_batch};
pub(crate) use write::file_url;
pub use write::{Staged, WriteMetrics};

/// Folder of kbcrm's own bookkeeping inside the warehouse.
pub const META_DIR: &str = "_kbcrm";

/// An opened warehouse.
#[derive(Debug, Clone)]
pub struct Warehouse {
    url: Url,
    store: Arc<dyn ObjectStore>,
    /// The store path of the warehouse root.
    root: StorePath,
    /// Tables loaded through this handle, kept when it was opened for a run
    /// ([`Warehouse::with_table_cache`]).
    tables: Option<Arc<Mutex<HashMap<String, Slot>>>>,
    /// Whether merges may mark replaced rows deleted (deletion vectors) instead of rewriting
    /// their files ([`Warehouse::copy_on_write`]).
    deletion_vectors: bool,
}

/// Where a handle opened for a run keeps one table: pipelines starting together wait for the
/// one that loads it instead of each reading its log.
type Slot = Arc<tokio::sync::Mutex<Option<Kept>>>;

/// A table kept by a handle opened for a run.
#[derive(Debug)]
struct Kept {
    table: DeltaTable,
    /// No commit through this handle since the table was loaded or brought up to date: it is
    /// the latest version, for no other process commits while the run lock is held.
    latest: bool,
}

/// What `kbcrm tables` shows about one table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table name.
    pub name: String,
    /// Current Delta version.
    pub version: u64,
    /// Rows in the current version (from file statistics).
    pub rows: u64,
    /// Bytes of data files in the current version.
    pub bytes: u64,
    /// Data files in the current version.
    pub files: usize,
    /// Run that wrote the current version, when kbcrm wrote it.
    pub last_run: Option<String>,
    /// When the current version was committed (ms since epoch).
    pub committed_at: Option<i64>,
}

impl Warehouse {
    /// Open the warehouse at `url` (a local folder is created when missing).
    pub fn open(url: &Url) -> Result<Self> {
        if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|_| Error::Usage(format!("warehouse '{url}' is not a local folder")))?;
            std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        crate::storage::register_delta_schemes();
        crate::storage::check_commit_safety(url)?;
        let store = store_for(url)?;
        let root = StorePath::from_url_path(url.path())
            .map_err(|e| Error::Usage(format!("warehouse '{url}': {e}")))?;
        Ok(Warehouse {
            url: url.clone(),
            store,
            root,
            tables: None,
            deletion_vectors: true,
        })
    }

    /// This handle keeps every table it loads and later brings it up to date by reading only
    /// the commits made since (a Delta log only grows), instead of reading each log again; a
    /// table not committed through the handle since is taken as it is. For a run, which holds
    /// the run lock: its pipelines load and commit the same tables many times, and no other
    /// kbcrm process commits meanwhile.
    pub fn with_table_cache(mut self) -> Self {
        self.tables = Some(Arc::default());
        self
    }

    /// Writes through this handle rewrite the files that hold replaced rows, and the tables it
    /// creates do not allow deletion vectors: for a project whose SQL runs on a Ballista
    /// cluster, which reads data files as plain Parquet.
    pub fn copy_on_write(mut self) -> Self {
        self.deletion_vectors = false;
        self
    }

    /// Whether writes through this handle may use deletion vectors.
    pub(crate) fn allows_deletion_vectors(&self) -> bool {
        self.deletion_vectors
    }

    /// The place of table `name` in the handle's keeping, made when `create`; `None` when
    /// the handle keeps no tables.
    fn slot(&self, name: &str, create: bool) -> Option<Slot> {
        let mut tables = self.tables.as_ref()?.lock().ok()?;
        match create {
            true => Some(tables.entry(name.to_string()).or_default().clone()),
            false => tables.get(name).cloned(),
        }
    }

    /// A commit to `name` is under way: the kept table is brought up to date when next loaded.
    pub(crate) async fn committing(&self, name: &str) {
        if let Some(slot) = self.slot(name, false)
            && let Some(kept) = slot.lock().await.as_mut()
        {
            kept.latest = false;
        }
    }

    /// The kept table, when it was loaded at exactly `version` (commits start from it).
    pub(crate) async fn cached_at(&self, name: &str, version: u64) -> Option<DeltaTable> {
        let slot = self.slot(name, false)?;
        let kept = slot.lock().await;
        kept.as_ref()
            .map(|k| k.table.clone())
            .filter(|t| t.version() == Some(version))
    }

    /// The warehouse URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The store holding the warehouse.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Store path of something under the warehouse root.
    pub(crate) fn path(&self, rel: &str) -> StorePath {
        let mut p = self.root.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    /// URL of a table's folder.
    pub fn table_url(&self, name: &str) -> Url {
        self.url
            .join(&format!("{name}/"))
            .expect("table names are valid URL segments")
    }

    /// Folders under the warehouse root that may hold tables (not kbcrm's own `_kbcrm`).
    async fn folders(&self) -> Result<Vec<(String, StorePath)>> {
        let listing = self.store.list_with_delimiter(Some(&self.root)).await?;
        Ok(listing
            .common_prefixes
            .into_iter()
            .filter_map(|dir| {
                let name = dir.filename()?.to_string();
                (!name.starts_with(['_', '.'])).then_some((name, dir))
            })
            .collect())
    }

    /// Names of the tables in the warehouse (folders holding a `_delta_log`).
    pub async fn table_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (name, dir) in self.folders().await? {
            let log = dir.join("_delta_log");
            let mut entries = self.store.list(Some(&log));
            if entries.try_next().await?.is_some() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Load a table's latest version; `None` when it does not exist yet.
    pub async fn load(&self, name: &str) -> Result<Option<DeltaTable>> {
        let Some(slot) = self.slot(name, true) else {
            return self.read_log(name).await;
        };
        let mut kept = slot.lock().await;
        if let Some(k) = kept.as_mut() {
            if k.latest {
                return Ok(Some(k.table.clone()));
            }
            match k.table.update_incremental(None).await {
                Ok(()) => {
                    k.latest = true;
                    return Ok(Some(k.table.clone()));
                }
                Err(e) => {
                    tracing::debug!(table = name, error = %e, "reading the table's log again");
                }
            }
        }
        let table = self.read_log(name).await?;
        *kept = table.as_ref().map(|t| Kept {
            table: t.clone(),
            latest: true,
        });
        Ok(table)
    }

    /// A table's latest version read from its log; `None` when it does not exist yet.
    async fn read_log(&self, name: &str) -> Result<Option<DeltaTable>> {
        let log = self.path(&format!("{name}/_delta_log"));
        if self.store.list(Some(&log)).try_next().await?.is_none() {
            return Ok(None);
        }
        let url = self.table_url(name);
        let mut table = deltalake::DeltaTableBuilder::from_url(url)?.build()?;
        match table.load().await {
            Ok(()) => Ok(Some(table)),
            Err(deltalake::DeltaTableError::NotATable(_)) => Ok(None),
            Err(deltalake::DeltaTableError::InvalidTableLocation(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Register every committed table in `ctx` under its name. Returns each table's version.
    pub async fn register_all(&self, ctx: &SessionContext) -> Result<HashMap<String, Option<u64>>> {
        let mut versions = HashMap::new();
        for name in self.table_names().await? {
            let table = self.load(&name).await?;
            if let Some(t) = &table {
                self.register(ctx, &name, t).await?;
            }
            versions.insert(name, table.and_then(|t| t.version()));
        }
        Ok(versions)
    }

    /// Register every table's current version as a plain Parquet listing of its active files:
    /// the fastest way to scan a version that does not change (the server's snapshots).
    /// Returns each table's version.
    pub async fn register_snapshots(&self, ctx: &SessionContext) -> Result<BTreeMap<String, u64>> {
        self.register_listings(Some(ctx), None, None).await
    }

    /// [`Warehouse::register_snapshots`] with each table's provider passed through `wrap` (its
    /// name, version and files, and the provider), e.g. to keep its columns in memory.
    pub async fn register_snapshots_wrapped(
        &self,
        ctx: &SessionContext,
        wrap: &Wrap<'_>,
    ) -> Result<BTreeMap<String, u64>> {
        self.register_listings(Some(ctx), None, Some(wrap)).await
    }

    /// [`Warehouse::register_snapshots`] with DataFusion's own listing tables, which a Ballista
    /// cluster can be sent (a scan does not first check that every file is still there).
    pub async fn register_for_cluster(
        &self,
        ctx: &SessionContext,
    ) -> Result<BTreeMap<String, u64>> {
        self.register_listings(None, Some(ctx), None).await
    }

    /// The same table versions twice, read once: as [`Warehouse::register_snapshots`] in
    /// `local` and as [`Warehouse::register_for_cluster`] in `cluster` (a server answering
    /// from both must not mix versions).
    pub async fn register_snapshots_and_for_cluster(
        &self,
        local: &SessionContext,
        cluster: &SessionContext,
        wrap: Option<&Wrap<'_>>,
    ) -> Result<BTreeMap<String, u64>> {
        self.register_listings(Some(local), Some(cluster), wrap)
            .await
    }

    async fn register_listings(
        &self,
        checked: Option<&SessionContext>,
        plain: Option<&SessionContext>,
        wrap: Option<&Wrap<'_>>,
    ) -> Result<BTreeMap<String, u64>> {
        let mut versions = BTreeMap::new();
        for name in self.table_names().await? {
            let Some(table) = self.load(&name).await? else {
                continue;
            };
            let Some(version) = table.version() else {
                continue;
            };
            let files = deletion::table_files(&table, &self.table_url(&name))
                .await
                .map_err(|e| with_table(e, &name))?;
            let schema = table.table_provider().await?.schema();
            if let Some(ctx) = checked {
                table.update_datafusion_session(&ctx.state())?;
                ctx.deregister_table(name.as_str())?;
                let mut provider = table_files_provider(&files, schema.clone()).await?;
                if let Some(wrap) = wrap {
                    provider = wrap(&name, version, &files, provider);
                }
                ctx.register_table(name.as_str(), provider)?;
            }
            if let Some(ctx) = plain {
                table.update_datafusion_session(&ctx.state())?;
                ctx.deregister_table(name.as_str())?;
                let provider = listing(&files, schema).map_err(|e| with_table(e, &name))?;
                ctx.register_table(name.as_str(), provider)?;
            }
            versions.insert(name, version);
        }
        Ok(versions)
    }

    /// A table's data files at a version (the latest when `None`), with the rows deletion
    /// vectors removed from them as of that version.
    pub async fn files_at(&self, name: &str, version: Option<u64>) -> Result<Vec<DataFile>> {
        let table = self.table_at(name, version).await?;
        deletion::table_files(&table, &self.table_url(name))
            .await
            .map_err(|e| with_table(e, name))
    }

    /// A table at a version (the latest when `None`).
    async fn table_at(&self, name: &str, version: Option<u64>) -> Result<DeltaTable> {
        let kept = match version {
            Some(v) => self.cached_at(name, v).await,
            None => self.load(name).await?,
        };
        Ok(match kept {
            Some(table) => table,
            None => {
                let url = self.table_url(name);
                let mut table = deltalake::DeltaTableBuilder::from_url(url)?.build()?;
                match version {
                    Some(v) => table.load_version(v).await?,
                    None => table.load().await?,
                }
                table
            }
        })
    }

    /// The rows of a table version (the latest when `None`) as its log counts them: each
    /// file's record count less the rows its deletion vector removes. `None` when a file's count
    /// is not recorded.
    pub async fn live_rows(&self, name: &str, version: Option<u64>) -> Result<Option<u64>> {
        let table = self.table_at(name, version).await?;
        let mut rows = 0u64;
        for f in table.snapshot()?.log_data().iter() {
            let Some(n) = f.num_records() else {
                return Ok(None);
            };
            let deleted = f.deletion_vector_descriptor().map_or(0, |d| d.cardinality);
            rows += (n as u64).saturating_sub(deleted.max(0) as u64);
        }
        Ok(Some(rows))
    }

    /// The row count the log records for each data file of a table at a version (the latest
    /// when `None`), before deletion vectors; files without one are left out.
    pub async fn record_counts(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<HashMap<Url, u64>> {
        let table = self.table_at(name, version).await?;
        let url = self.table_url(name);
        Ok(table
            .snapshot()?
            .log_data()
            .iter()
            .filter_map(|f| {
                let rows = f.num_records()?;
                Some((write::file_url(&url, &f.path()), rows as u64))
            })
            .collect())
    }

    /// The current data files of a table that a merge tagged as holding rows unchanged since
    /// an earlier version, with that version.
    pub async fn files_unchanged_since(&self, name: &str) -> Result<HashMap<Url, u64>> {
        let url = self.table_url(name);
        let Some(table) = self.load(name).await? else {
            return Ok(HashMap::new());
        };
        let mut out = HashMap::new();
        for f in table.snapshot()?.log_data().iter() {
            // The tags are only reachable through the whole action.
            #[allow(deprecated)]
            let add = f.add_action();
            if let Some(v) = write::unchanged_since(&add) {
                out.insert(write::file_url(&url, &f.path()), v);
            }
        }
        Ok(out)
    }

    /// Register one committed table version in `ctx`.
    pub async fn register(
        &self,
        ctx: &SessionContext,
        name: &str,
        table: &DeltaTable,
    ) -> Result<()> {
        table.update_datafusion_session(&ctx.state())?;
        let provider = self.provider(name, table).await?;
        ctx.deregister_table(name)?;
        ctx.register_table(name, provider)?;
        Ok(())
    }

    /// A provider of one committed table version: Delta's own, or for a table with rows
    /// deleted by deletion vectors, a scan of its files that skips those rows (Delta's reads
    /// such a table on one thread and without filters on the Parquet scan).
    pub async fn provider(&self, name: &str, table: &DeltaTable) -> Result<Arc<dyn TableProvider>> {
        let marked = table
            .snapshot()?
            .log_data()
            .iter()
            .any(|f| f.deletion_vector_descriptor().is_some());
        let delta = table.table_provider().await?;
        if !marked {
            return Ok(delta);
        }
        let files = deletion::table_files(table, &self.table_url(name))
            .await
            .map_err(|e| with_table(e, name))?;
        table_files_provider(&files, delta.schema()).await
    }

    /// Facts about one table.
    pub async fn info(&self, name: &str) -> Result<Option<TableInfo>> {
        let Some(table) = self.load(name).await? else {
            return Ok(None);
        };
        let snapshot = table.snapshot()?;
        let (mut rows, mut bytes, mut files) = (0u64, 0u64, 0usize);
        for f in snapshot.log_data().iter() {
            let deleted = f.deletion_vector_descriptor().map_or(0, |d| d.cardinality);
            rows += (f.num_records().unwrap_or(0) as u64).saturating_sub(deleted.max(0) as u64);
            bytes += f.size() as u64;
            files += 1;
        }
        let last = table.history(Some(1)).try_next().await?;
        let last_run = last
            .as_ref()
            .and_then(|c| c.info.get(RUN_ID_KEY))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok(Some(TableInfo {
            name: name.to_string(),
            version: snapshot.version(),
            rows,
            bytes,
            files,
            last_run,
            committed_at: last.and_then(|c| c.timestamp),
        }))
    }

    /// The newest committed version of every table, read from the `_delta_log` listings only
    /// (cheap enough to poll).
    pub async fn latest_versions(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for (name, dir) in self.folders().await? {
            let log = dir.join("_delta_log");
            let entries: Vec<_> = self.store.list(Some(&log)).try_collect().await?;
            let newest = entries
                .iter()
                .filter_map(|m| m.location.filename())
                .filter_map(|f| f.strip_suffix(".json"))
                .filter_map(|v| v.parse::<u64>().ok())
                .max();
            if let Some(v) = newest {
                out.insert(name, v);
            }
        }
        Ok(out)
    }

    /// Current versions of the named tables (`None` for a table that does not exist).
    pub async fn versions(&self, names: &[String]) -> Result<HashMap<String, Option<u64>>> {
        let mut out = HashMap::new();
        for n in names {
            let v = self.load(n).await?.and_then(|t| t.version());
            out.insert(n.clone(), v);
        }
        Ok(out)
    }
}

/// `e` with the table it is about.
fn with_table(e: Error, table: &str) -> Error {
    match e {
        Error::Warehouse { message, cause } => Error::Warehouse {
            message: format!("table '{table}': {message}"),
            cause,
        },
        other => other,
    }
}

/// A provider reading exactly the given Parquet files, all of their rows (files a write has
/// just made).
///
/// Every scan first checks that each file is still there: a listing over a file's URL that
/// finds nothing would otherwise read a removed file as zero rows.
pub(crate) async fn files_provider(
    files: &[Url],
    schema: arrow::datatypes::SchemaRef,
) -> Result<Arc<dyn TableProvider>> {
    let files: Vec<DataFile> = files.iter().cloned().map(DataFile::whole).collect();
    table_files_provider(&files, schema).await
}

/// A provider reading a table state: exactly the given Parquet files, less the rows their
/// deletion vectors remove (a committed version, or a staged one not yet committed).
pub(crate) async fn table_files_provider(
    files: &[DataFile],
    schema: arrow::datatypes::SchemaRef,
) -> Result<Arc<dyn TableProvider>> {
    if files.is_empty() {
        return Ok(Arc::new(EmptyTable::new(schema)));
    }
    let urls = urls(files)?;
    let deleted = urls
        .iter()
        .zip(files)
        .filter_map(|(u, f)| Some((u.prefix().clone(), f.deleted.clone()?)))
        .collect();
    Ok(Arc::new(ExactFiles {
        inner: listing_table(urls.clone(), schema)?,
        files: urls,
        deleted,
    }))
}

/// A plain listing table over exactly these Parquet files (one a Ballista cluster can read).
///
/// Refused for a file with rows deleted by a deletion vector: the listing reads a file as
/// plain Parquet and would bring those rows back.
pub(crate) fn listing(
    files: &[DataFile],
    schema: arrow::datatypes::SchemaRef,
) -> Result<Arc<dyn TableProvider>> {
    if let Some(f) = files.iter().find(|f| f.deleted.is_some()) {
        return Err(Error::warehouse(format!(
            "file '{}' has rows deleted by a deletion vector: a Ballista cluster reads a table's \
             files as plain Parquet and would return those rows. Rebuild the table with \
             `kbcrm run --full-refresh` (a project with `engine.cluster` writes no deletion \
             vectors), or rewrite it without them in the tool that wrote it (e.g. Delta's \
             REORG TABLE ... APPLY (PURGE))",
            f.url
        )));
    }
    if files.is_empty() {
        return Ok(Arc::new(EmptyTable::new(schema)));
    }
    Ok(Arc::new(listing_table(urls(files)?, schema)?))
}

fn urls(files: &[DataFile]) -> Result<Vec<ListingTableUrl>> {
    Ok(files
        .iter()
        .map(|f| ListingTableUrl::parse(f.url.as_str()))
        .collect::<datafusion::error::Result<Vec<_>>>()?)
}

/// One Parquet file whose rows are sorted by `order` (ascending, nulls last), declared so:
/// plans over it use that order instead of sorting again.
pub(crate) fn sorted_file(
    file: &Url,
    schema: arrow::datatypes::SchemaRef,
    order: &[String],
) -> Result<Arc<dyn TableProvider>> {
    use datafusion::prelude::ident;
    let sort = order.iter().map(|c| ident(c).sort(true, false)).collect();
    let options = parquet_options().with_file_sort_order(vec![sort]);
    Ok(Arc::new(listing_table_with(
        urls(&[DataFile::whole(file.clone())])?,
        schema,
        options,
    )?))
}

fn parquet_options() -> ListingOptions {
    ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet")
}

fn listing_table(
    urls: Vec<ListingTableUrl>,
    schema: arrow::datatypes::SchemaRef,
) -> Result<ListingTable> {
    listing_table_with(urls, schema, parquet_options())
}

fn listing_table_with(
    urls: Vec<ListingTableUrl>,
    schema: arrow::datatypes::SchemaRef,
    options: ListingOptions,
) -> Result<ListingTable> {
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    Ok(ListingTable::try_new(config)?)
}

/// [`ListingTable`] over named files that fails a scan when one of them is missing, and skips
/// the rows deletion vectors removed from them.
#[derive(Debug)]
struct ExactFiles {
    files: Vec<ListingTableUrl>,
    inner: ListingTable,
    /// The files with removed rows, by store path.
    deleted: HashMap<StorePath, Arc<deletion::Deleted>>,
}

impl ExactFiles {
    /// `plan` (the listing's scan) with each file's removed rows skipped, and its row counts
    /// marked inexact (they count the removed rows).
    fn skip_deleted(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::datasource::physical_plan::parquet::ParquetRowSelection;
        use datafusion::datasource::physical_plan::{
            FileGroup, FileScanConfig, FileScanConfigBuilder,
        };
        use datafusion::datasource::source::DataSourceExec;
        let mut found = false;
        let plan = plan.transform_up(|node| {
            let any: &dyn std::any::Any = node.as_ref();
            let Some(exec) = any.downcast_ref::<DataSourceExec>() else {
                return Ok(Transformed::no(node));
            };
            let source: &dyn std::any::Any = exec.data_source().as_ref();
            let Some(config) = source.downcast_ref::<FileScanConfig>() else {
                return Ok(Transformed::no(node));
            };
            found = true;
            let statistics = config.statistics().to_inexact();
            let groups = config
                .file_groups
                .iter()
                .map(|group| {
                    let files = group
                        .iter()
                        .map(|f| {
                            let mut f = f.clone();
                            if let Some(d) = self.deleted.get(&f.object_meta.location) {
                                f = f.with_extension(ParquetRowSelection::new(d.selection()));
                                f.statistics = f
                                    .statistics
                                    .map(|s| Arc::new(s.as_ref().clone().to_inexact()));
                            }
                            f
                        })
                        .collect();
                    let mut out = FileGroup::new(files);
                    if let Some(s) = group.file_statistics(None) {
                        out = out.with_statistics(Arc::new(s.clone().to_inexact()));
                    }
                    out
                })
                .collect();
            let config = FileScanConfigBuilder::from(config.clone())
                .with_file_groups(groups)
                .with_statistics(statistics)
                .build();
            Ok(Transformed::yes(DataSourceExec::from_data_source(config)
                as Arc<dyn datafusion::physical_plan::ExecutionPlan>))
        })?;
        if !found {
            return Err(datafusion::error::DataFusionError::Internal(
                "a scan of files with deleted rows is not a Parquet file scan".into(),
            ));
        }
        Ok(plan.data)
    }

    async fn check(&self, state: &dyn Session) -> datafusion::error::Result<()> {
        for chunk in self.files.chunks(32) {
            let mut heads = Vec::with_capacity(chunk.len());
            for url in chunk {
                let store = state.runtime_env().object_store(url.object_store())?;
                heads.push(present(store, url));
            }
            futures::future::try_join_all(heads).await?;
        }
        Ok(())
    }
}

/// `Ok` when the file at `url` exists.
async fn present(
    store: Arc<dyn ObjectStore>,
    url: &ListingTableUrl,
) -> datafusion::error::Result<()> {
    use object_store::ObjectStoreExt;
    match store.head(url.prefix()).await {
        Ok(_) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => {
            Err(datafusion::error::DataFusionError::Execution(format!(
                "data file {} is missing: it was removed after this step started reading the \
                 table; nothing was written, run the command again",
                url.as_str()
            )))
        }
        Err(e) => Err(e.into()),
    }
}

#[async_trait::async_trait]
impl TableProvider for ExactFiles {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::logical_expr::Expr],
    ) -> datafusion::error::Result<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<datafusion::common::Statistics> {
        self.inner.statistics()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        self.check(state).await?;
        if self.deleted.is_empty() {
            return self.inner.scan(state, projection, filters, limit).await;
        }
        // The limit is applied above the scan: a listing stops taking files once their
        // row counts (removed rows included) reach it.
        let plan = self.inner.scan(state, projection, filters, None).await?;
        self.skip_deleted(plan)
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: datafusion::catalog::ScanArgs<'a>,
    ) -> datafusion::error::Result<datafusion::catalog::ScanResult> {
        self.check(state).await?;
        if self.deleted.is_empty() {
            return self.inner.scan_with_args(state, args).await;
        }
        let args = args.with_limit(None);
        let result = self.inner.scan_with_args(state, args).await?;
        Ok(datafusion::catalog::ScanResult::new(
            self.skip_deleted(result.into_inner())?,
        ))
    }
}

#[cfg(test)]
mod tests;
