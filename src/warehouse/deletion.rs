//! Deletion vectors (Delta's merge-on-read): the rows of a data file that a table version no
//! longer holds, listed beside the file instead of rewriting it.
//!
//! A merge that replaces a few rows of a large file marks those rows deleted
//! (`write_deletion_vectors`) and adds their new versions in a file of their own; the file
//! keeps the rest. Every read of a table version applies the marks (`table_files` loads them,
//! the warehouse's file scan skips the rows).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, SortField};
use buoyant_kernel::actions::deletion_vector_writer::{
    KernelDeletionVector, StreamingDeletionVectorWriter,
};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::delta_datafusion::{DeltaScanConfig, DeltaScanNext};
use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use url::Url;

use crate::error::{Error, Result};

/// A data file of a table version, with the rows a deletion vector removed from it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFile {
    /// The file.
    pub url: Url,
    /// Rows of the file the table no longer holds; `None` when it holds all of them.
    pub deleted: Option<Arc<Deleted>>,
}

impl DataFile {
    /// A file all of whose rows are in the table.
    pub fn whole(url: Url) -> Self {
        DataFile { url, deleted: None }
    }
}

/// The rows a deletion vector removes from one data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Deleted {
    /// Positions of the removed rows in the file, ascending, each once.
    rows: Vec<u64>,
    /// Rows the file holds, the removed ones included.
    file_rows: u64,
}

impl Deleted {
    /// The rows at `rows` (any order, repeats allowed) of a file of `file_rows` rows.
    pub fn new(mut rows: Vec<u64>, file_rows: u64) -> Result<Self> {
        rows.sort_unstable();
        rows.dedup();
        if rows.last().is_some_and(|&r| r >= file_rows) {
            return Err(Error::warehouse(format!(
                "a deletion vector removes row {} of a file of {file_rows} rows",
                rows.last().copied().unwrap_or_default()
            )));
        }
        Ok(Deleted { rows, file_rows })
    }

    /// How many rows are removed.
    pub fn count(&self) -> u64 {
        self.rows.len() as u64
    }

    /// Positions of the removed rows, ascending.
    pub fn rows(&self) -> &[u64] {
        &self.rows
    }

    /// Rows the file holds, the removed ones included.
    pub fn file_rows(&self) -> u64 {
        self.file_rows
    }

    /// These rows and `more` (positions in the same file).
    pub fn with(&self, more: &[u64]) -> Result<Self> {
        let mut rows = self.rows.clone();
        rows.extend_from_slice(more);
        Deleted::new(rows, self.file_rows)
    }

    /// The rows a reader keeps, as a selection over the whole file.
    pub fn selection(&self) -> RowSelection {
        let mut selectors: Vec<RowSelector> = Vec::new();
        let mut push = |skip: bool, n: u64| {
            if n == 0 {
                return;
            }
            match selectors.last_mut() {
                Some(last) if last.skip == skip => last.row_count += n as usize,
                _ => selectors.push(if skip {
                    RowSelector::skip(n as usize)
                } else {
                    RowSelector::select(n as usize)
                }),
            }
        };
        let mut next = 0u64;
        for &r in &self.rows {
            push(false, r - next);
            push(true, 1);
            next = r + 1;
        }
        push(false, self.file_rows - next);
        RowSelection::from(selectors)
    }
}

/// The data files of a loaded table version (`url` is the table's folder), each with the rows
/// its deletion vector (as of that version) removes.
pub(crate) async fn table_files(table: &DeltaTable, url: &Url) -> Result<Vec<DataFile>> {
    let snapshot = table.snapshot()?;
    let mut files = Vec::new();
    let mut marked: Vec<(usize, u64)> = Vec::new();
    for f in snapshot.log_data().iter() {
        let file_url = super::write::file_url(url, &f.path());
        if f.deletion_vector_descriptor().is_some() {
            let rows = f.num_records().ok_or_else(|| {
                Error::warehouse(format!(
                    "file '{}' has rows deleted by a deletion vector but no row count in its \
                     statistics; rewrite the table in the tool that wrote it, or rebuild it \
                     with `kbcrm run --full-refresh`",
                    f.path()
                ))
            })?;
            marked.push((files.len(), rows as u64));
        }
        files.push(DataFile::whole(file_url));
    }
    if marked.is_empty() {
        return Ok(files);
    }
    let ctx = SessionContext::new();
    let state = ctx.state();
    table.update_datafusion_session(&state)?;
    let scan = DeltaScanNext::new(snapshot.snapshot().clone(), DeltaScanConfig::default())?;
    let masks: HashMap<String, Vec<bool>> = scan
        .deletion_vectors(&state)
        .await?
        .into_iter()
        .map(|s| (normalized(&s.filepath), s.keep_mask))
        .collect();
    for (i, file_rows) in marked {
        let file = &mut files[i];
        let mask = masks.get(&normalized(file.url.as_str())).ok_or_else(|| {
            Error::warehouse(format!(
                "the deletion vector of data file {} could not be read",
                file.url
            ))
        })?;
        let rows = mask
            .iter()
            .enumerate()
            .filter(|(_, keep)| !**keep)
            .map(|(i, _)| i as u64)
            .collect();
        file.deleted = Some(Arc::new(Deleted::new(rows, file_rows)?));
    }
    Ok(files)
}

/// A file URL as one string whichever way its path was escaped.
fn normalized(url: &str) -> String {
    Url::parse(url).map_or_else(|_| url.to_string(), |u| u.to_string())
}

/// The distinct values of some key columns, to find rows holding them.
pub(crate) struct KeySet {
    names: Vec<String>,
    types: Vec<DataType>,
    converter: RowConverter,
    keys: HashSet<Box<[u8]>>,
}

impl KeySet {
    /// The keys in `batches` (columns named as the table's key columns, in that order).
    pub(crate) fn new(names: &[String], batches: &[RecordBatch]) -> Result<Option<Self>> {
        let Some(first) = batches.first() else {
            return Ok(None);
        };
        let types: Vec<DataType> = (0..names.len())
            .map(|i| first.column(i).data_type().clone())
            .collect();
        let converter = RowConverter::new(types.iter().cloned().map(SortField::new).collect())?;
        let mut keys = HashSet::new();
        for b in batches {
            let rows = converter.convert_columns(&b.columns()[..names.len()])?;
            keys.extend(rows.iter().map(|r| Box::<[u8]>::from(r.as_ref())));
        }
        Ok(Some(KeySet {
            names: names.to_vec(),
            types,
            converter,
            keys,
        }))
    }

    /// Positions of the rows of the Parquet file at `path` (of `size` bytes, asked of the store
    /// when the log does not say) whose keys are in the set, counting every row the file holds
    /// (those a deletion vector already removed included), and the file's row count.
    pub(crate) async fn rows_in(
        &self,
        store: Arc<dyn ObjectStore>,
        path: StorePath,
        size: Option<u64>,
    ) -> Result<(Vec<u64>, u64)> {
        use datafusion::datasource::physical_plan::parquet::{
            DefaultParquetFileReaderFactory, ParquetFileReaderFactory,
        };
        use object_store::ObjectStoreExt;
        let size = match size {
            Some(size) => size,
            None => store.head(&path).await?.size,
        };
        let file = datafusion::datasource::listing::PartitionedFile::new(path.to_string(), size);
        let metrics = datafusion::physical_plan::metrics::ExecutionPlanMetricsSet::new();
        let reader: Box<dyn parquet::arrow::async_reader::AsyncFileReader> =
            DefaultParquetFileReaderFactory::new(store).create_reader(0, file, None, &metrics)?;
        let builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
        let mask = ProjectionMask::columns(
            builder.parquet_schema(),
            self.names.iter().map(String::as_str),
        );
        let mut stream = builder.with_projection(mask).build()?;
        let mut out = Vec::new();
        let mut position = 0u64;
        while let Some(batch) = stream.try_next().await? {
            let columns = self
                .names
                .iter()
                .zip(&self.types)
                .map(|(name, ty)| {
                    let column = batch.column_by_name(name).ok_or_else(|| {
                        Error::warehouse(format!("a data file has no key column '{name}'"))
                    })?;
                    Ok(arrow::compute::cast(column, ty)?)
                })
                .collect::<Result<Vec<ArrayRef>>>()?;
            let rows = self.converter.convert_columns(&columns)?;
            for (i, row) in rows.iter().enumerate() {
                if self.keys.contains(row.as_ref()) {
                    out.push(position + i as u64);
                }
            }
            position += batch.num_rows() as u64;
        }
        Ok((out, position))
    }
}

/// Write deletion vectors into one new file of the table at `table_url` (its `_delta_log`'s
/// folder): returns each vector's descriptor, in order.
pub(crate) async fn write_deletion_vectors(
    store: &Arc<dyn ObjectStore>,
    table_url: &Url,
    vectors: &[&Deleted],
) -> Result<Vec<DeletionVectorDescriptor>> {
    let mut bytes = Vec::new();
    let mut written = Vec::with_capacity(vectors.len());
    {
        let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
        for d in vectors {
            let mut dv = KernelDeletionVector::new();
            dv.add_deleted_row_indexes(d.rows().iter().copied());
            written.push(writer.write_deletion_vector(dv).map_err(kernel_error)?);
        }
        writer.finalize().map_err(kernel_error)?;
    }
    let uuid = uuid::Uuid::new_v4();
    let url = table_url
        .join(&format!("deletion_vector_{uuid}.bin"))
        .map_err(|e| Error::Internal(format!("deletion vector path: {e}")))?;
    let path = store_path(&url)?;
    use object_store::ObjectStoreExt;
    store.put(&path, bytes.into()).await?;
    let encoded = z85::encode(uuid.as_bytes());
    let descriptors = written
        .into_iter()
        .map(|w| DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: encoded.clone(),
            offset: Some(w.offset),
            size_in_bytes: w.size_in_bytes,
            cardinality: w.cardinality,
        })
        .collect();
    Ok(descriptors)
}

/// The store path of a file of the warehouse.
pub(crate) fn store_path(url: &Url) -> Result<StorePath> {
    StorePath::from_url_path(url.path())
        .map_err(|e| Error::warehouse_caused(format!("file {url}"), e))
}

fn kernel_error(e: buoyant_kernel::Error) -> Error {
    Error::warehouse_caused("writing a deletion vector", e)
}

/// The store path of the deletion vector file a descriptor of the table at `table_url` names,
/// or `None` for an inline one.
pub(crate) fn vector_file(table_url: &Url, dv: &DeletionVectorDescriptor) -> Option<StorePath> {
    let dv =
        buoyant_kernel::actions::deletion_vector::DeletionVectorDescriptor::try_from(dv.clone())
            .ok()?;
    store_path(&dv.absolute_path(table_url).ok()??).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_skips_exactly_the_deleted_rows() {
        let d = Deleted::new(vec![5, 0, 1, 9, 5], 10).expect("deleted");
        assert_eq!(d.rows(), &[0, 1, 5, 9]);
        let selectors: Vec<RowSelector> = d.selection().into();
        assert_eq!(
            selectors,
            vec![
                RowSelector::skip(2),
                RowSelector::select(3),
                RowSelector::skip(1),
                RowSelector::select(3),
                RowSelector::skip(1),
            ]
        );
        assert!(Deleted::new(vec![10], 10).is_err());
        let more = d.with(&[2, 9]).expect("union");
        assert_eq!(more.rows(), &[0, 1, 2, 5, 9]);
    }
}
