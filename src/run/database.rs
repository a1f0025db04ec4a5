//! Loading a database source: check the declared columns, read what is new (in key ranges at
//! once when asked), mark rows deleted at the source, stage.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, BooleanArray, TimestampMicrosecondArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::info;

use super::progress::Step;
use super::source::{CursorFilter, ReadTotals};
use super::{RunState, Runner, StepFigures};
use crate::config::types::{ColumnType, UTC};
use crate::error::{Error, Result};
use crate::plan::{DELETED_AT, Database, DatabaseKind, Deletes, Incremental, Source, Write};
use crate::sources::FileOutput;
use crate::sources::convert::declared_schema;
use crate::sources::database::{self, ReadQuery};
use crate::sources::mysql;
use crate::sources::postgres;
use crate::sql::quote_ident;
use crate::warehouse::Staged;
use crate::warehouse::write::{NewData, TableWriter, delete_files, stage};

/// The database of a source: its connection and its columns' types, PostgreSQL or MySQL.
#[derive(Clone)]
enum Remote {
    Pg(
        Arc<postgres::Connection>,
        Arc<Vec<tokio_postgres::types::Type>>,
    ),
    My(Arc<mysql::Connection>, Arc<Vec<mysql::Kind>>),
}

/// An open session with the database.
enum Session {
    Pg(tokio_postgres::Client),
    My(mysql_async::Conn),
}

impl Remote {
    /// Connect, check the declared columns, and keep the session for the first read.
    async fn open(source: &Source, db: &Database) -> Result<(Remote, Session)> {
        match db.kind {
            DatabaseKind::Mysql => {
                let conn = mysql::connection(source, db)?;
                let mut session = conn.connect(source).await?;
                let kinds = mysql::describe(source, db, &mut session, &conn).await?;
                Ok((
                    Remote::My(Arc::new(conn), Arc::new(kinds)),
                    Session::My(session),
                ))
            }
            DatabaseKind::Postgres => {
                let conn = postgres::connection(source, db)?;
                let client = conn.connect(source).await?;
                let types = postgres::describe(source, db, &client, &conn).await?;
                Ok((
                    Remote::Pg(Arc::new(conn), Arc::new(types)),
                    Session::Pg(client),
                ))
            }
        }
    }

    async fn session(&self, source: &Source) -> Result<Session> {
        Ok(match self {
            Remote::Pg(c, _) => Session::Pg(c.connect(source).await?),
            Remote::My(c, _) => Session::My(c.connect(source).await?),
        })
    }

    fn display(&self) -> &str {
        match self {
            Remote::Pg(c, _) => &c.display,
            Remote::My(c, _) => &c.display,
        }
    }

    fn cursor_condition(
        &self,
        source: &Source,
        idx: usize,
        watermark: &str,
        overlap: Option<std::time::Duration>,
    ) -> String {
        let col = &source.columns[idx];
        match self {
            Remote::Pg(_, types) => postgres::cursor_condition(
                &col.source_name,
                col.ty,
                &types[idx],
                watermark,
                overlap,
            ),
            Remote::My(_, kinds) => {
                mysql::cursor_condition(&col.source_name, col.ty, kinds[idx], watermark, overlap)
            }
        }
    }

    async fn bounds(
        &self,
        session: &mut Session,
        source: &Source,
        db: &Database,
        column: &str,
        condition: Option<&str>,
    ) -> Result<Option<(i64, i64)>> {
        match session {
            Session::Pg(c) => postgres::bounds(source, c, db, column, condition).await,
            Session::My(c) => mysql::bounds(source, c, db, column, condition).await,
        }
    }

    /// The conditions of the key ranges read at once, each on its own connection, within
    /// `condition`; only `condition` when the source is not read in parts.
    async fn key_ranges(
        &self,
        session: &mut Session,
        source: &Source,
        db: &Database,
        condition: Option<&str>,
    ) -> Result<Vec<Option<String>>> {
        Ok(match &db.partition {
            Some((column, n)) if *n > 1 => {
                let col = source
                    .columns
                    .iter()
                    .find(|c| &c.name == column)
                    .map_or(column.as_str(), |c| c.source_name.as_str());
                match self.bounds(session, source, db, col, condition).await? {
                    Some((lo, hi)) => database::ranges(col, lo, hi, *n)
                        .into_iter()
                        .map(|r| Some(and(condition, &r)))
                        .collect(),
                    None => vec![condition.map(str::to_string)],
                }
            }
            _ => vec![condition.map(str::to_string)],
        })
    }

    /// Run the query's SQL, sending its rows to the query's channel.
    async fn read(&self, session: Session, query: ReadQuery<'_>) -> Result<()> {
        match (self, session) {
            (Remote::Pg(_, types), Session::Pg(c)) => postgres::copy_out(query, &c, types).await,
            (Remote::My(_, kinds), Session::My(mut c)) => {
                let r = mysql::read(query, &mut c, kinds).await;
                let _ = c.disconnect().await;
                r
            }
            _ => Err(Error::Internal("session of another database".into())),
        }
    }

    /// Every key at the source, read on a session of its own.
    async fn all_keys(
        &self,
        source: &Source,
        db: &Database,
        key_idx: &[usize],
    ) -> Result<Vec<RecordBatch>> {
        let columns: Vec<crate::plan::Column> = key_idx
            .iter()
            .map(|&i| crate::plan::Column {
                required: false,
                ..source.columns[i].clone()
            })
            .collect();
        let schema = declared_schema(&columns);
        let probe = Source {
            columns,
            ..source.clone()
        };
        let keys_only = match self {
            Remote::Pg(c, types) => Remote::Pg(
                c.clone(),
                Arc::new(key_idx.iter().map(|&i| types[i].clone()).collect()),
            ),
            Remote::My(c, kinds) => Remote::My(
                c.clone(),
                Arc::new(key_idx.iter().map(|&i| kinds[i]).collect()),
            ),
        };
        let session = keys_only.session(source).await?;
        let sql = database::select_sql(&probe, db, None);
        let (tx, mut rx) = mpsc::channel(4);
        let query = ReadQuery {
            source: &probe,
            sql: &sql,
            schema,
            label: "keys",
            keys: &[],
            tx,
        };
        let read = keys_only.read(session, query);
        let collect = async {
            let mut batches = Vec::new();
            while let Some(out) = rx.recv().await {
                batches.extend(out?.batches);
            }
            Ok::<_, Error>(batches)
        };
        let (read, batches) = tokio::join!(read, collect);
        read?;
        batches
    }
}

fn and(a: Option<&str>, b: &str) -> String {
    match a {
        Some(a) => format!("({a}) AND {b}"),
        None => b.to_string(),
    }
}

/// Add `_deleted_at` to a batch of declared columns: null, or when the soft-delete column says
/// the row is deleted, that column's time (a timestamp or date), or for a boolean the cursor's
/// time, or else `now`.
fn with_deleted_at(
    source: &Source,
    db: &Database,
    batch: &RecordBatch,
    schema: &SchemaRef,
    now: i64,
) -> Result<RecordBatch> {
    if db.deletes.is_none() {
        return crate::warehouse::conform_batch(batch, schema);
    }
    let n = batch.num_rows();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    let ts_type = DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC)));
    let as_ts = |a: &ArrayRef| -> Result<TimestampMicrosecondArray> {
        let c = cast(a, &ts_type)?;
        Ok(c.as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .cloned()
            .unwrap_or_else(|| TimestampMicrosecondArray::new_null(n)))
    };
    let deleted: ArrayRef = match &db.deletes {
        Some(Deletes::SoftColumn(c)) => {
            let idx = source
                .columns
                .iter()
                .position(|x| &x.name == c)
                .unwrap_or(0);
            let col = batch.column(idx);
            match source.columns[idx].ty {
                ColumnType::Bool => {
                    let flags = col.as_any().downcast_ref::<BooleanArray>().ok_or_else(|| {
                        Error::Internal("soft delete column is not boolean".into())
                    })?;
                    let when = match &source.incremental {
                        Some(Incremental::Cursor(cur)) => {
                            let ci = source.columns.iter().position(|x| &x.name == cur);
                            match ci.map(|i| (i, source.columns[i].ty)) {
                                Some((i, ColumnType::Timestamp | ColumnType::Date)) => {
                                    Some(as_ts(batch.column(i))?)
                                }
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    let values: TimestampMicrosecondArray = (0..n)
                        .map(|i| {
                            (flags.is_valid(i) && flags.value(i)).then(|| match &when {
                                Some(w) if w.is_valid(i) => w.value(i),
                                _ => now,
                            })
                        })
                        .collect();
                    Arc::new(values.with_timezone(UTC))
                }
                _ => Arc::new(as_ts(col)?.with_timezone(UTC)),
            }
        }
        _ => Arc::new(TimestampMicrosecondArray::new_null(n).with_timezone(UTC)),
    };
    columns.push(deleted);
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(
            schema
                .fields()
                .iter()
                .zip(&columns)
                .map(|(f, c)| Field::new(f.name(), c.data_type().clone(), true))
                .collect::<Vec<_>>(),
        )),
        columns,
    )?;
    crate::warehouse::conform_batch(&batch, schema)
}

impl Runner {
    pub(super) async fn load_database_source(
        &self,
        source: &Source,
        db: &Database,
        ctx: &SessionContext,
        state: &mut RunState,
    ) -> Result<()> {
        let started = Instant::now();
        let full = self.options.full_refresh;
        let (remote, mut session) = Remote::open(source, db).await?;
        let origin = source.origin();
        let bar = self.progress.step(&format!("load {}", source.table));
        let declared = declared_schema(&source.columns);
        let schema = crate::sources::table_schema(source);
        let now = chrono::Utc::now().timestamp_micros();

        // What is new: rows past the watermark, less the overlap.
        let (mut cursor, condition) =
            cursor_and_condition(source, db, &remote, &declared, state, full)?;

        // Key ranges read at once, each on its own connection.
        let parts = remote
            .key_ranges(&mut session, source, db, condition.as_deref())
            .await?;
        let key_idx = key_positions(source);
        let reading = Reading {
            source,
            db,
            schema: &schema,
            key_idx: &key_idx,
            now,
        };
        let (mut rx, mut tasks) =
            spawn_reads(&reading, &remote, &declared, parts, session, &origin);

        let url = self.wh.table_url(&source.table);
        let mut writer = TableWriter::new(&url, schema.clone())?;
        let received =
            receive_rows(&reading, state, &mut rx, &mut writer, &mut cursor, &bar).await?;
        if let Some(e) = received.failure {
            tasks.shutdown().await;
            let (adds, _) = writer.finish().await?;
            delete_files(&self.wh, &url, &adds).await?;
            return Err(e);
        }
        while tasks.join_next().await.is_some() {}

        // Rows gone at the source, marked deleted.
        let marked = self
            .mark_gone(
                &reading,
                ctx,
                state,
                &remote,
                received.new_keys,
                &mut writer,
            )
            .await?;

        let ReadTotals {
            rows_read,
            rejected,
            bytes_read,
        } = received.totals;
        let (adds, rows) = writer.finish().await?;
        self.settle_read(
            source,
            state,
            &url,
            &adds,
            (rows_read, rejected),
            cursor.as_ref(),
        )
        .await?;
        info!(
            rows_read,
            rejected,
            bytes_read,
            marked_deleted = marked,
            rows_kept = rows,
            database = %remote.display(),
            "database source read"
        );
        if rows == 0 && !full && source.write != Write::Overwrite {
            bar.finish();
            self.skip(state, &source.table, "source", "no new rows");
            return Ok(());
        }
        let staged = self.stage_read(source, ctx, schema, adds, rows).await?;
        bar.finish();
        self.record(
            ctx,
            state,
            staged,
            StepFigures {
                kind: "source",
                rows_in: rows_read,
                rows_rejected: rejected,
                started,
            },
        )
        .await
    }

    /// Stage the files written as the source's new rows, in place of the whole table on a
    /// full refresh.
    async fn stage_read(
        &self,
        source: &Source,
        ctx: &SessionContext,
        schema: SchemaRef,
        adds: Vec<deltalake::kernel::Add>,
        rows: u64,
    ) -> Result<Staged> {
        let full = self.options.full_refresh;
        let new = NewData {
            table: source.table.clone(),
            schema,
            adds,
            source_files: Vec::new(),
            rows,
            cluster_by: Vec::new(),
            files_by: None,
            keys_unique: false,
            all_changes: false,
        };
        let write = match full {
            true => Write::Overwrite,
            false => source.write.clone(),
        };
        stage(&self.wh, ctx, new, &write)
            .await
            .map_err(|e| super::in_pipeline(e, &source.pipeline))
    }

    /// With deletes that compare keys, when a comparison is due (never on a full refresh): the
    /// rows gone at the source, written marked deleted; how many there were.
    async fn mark_gone(
        &self,
        reading: &Reading<'_>,
        ctx: &SessionContext,
        state: &mut RunState,
        remote: &Remote,
        mut new_keys: Vec<RecordBatch>,
        writer: &mut TableWriter,
    ) -> Result<u64> {
        let (source, db, now) = (reading.source, reading.db, reading.now);
        let full = self.options.full_refresh;
        let compare_key = (
            source.pipeline.clone(),
            source.name.clone(),
            "keys_compared".to_string(),
        );
        let mut marked = 0u64;
        if let Some(Deletes::CompareKeys(every)) = &db.deletes {
            let due = match (every, state.state_before.get(&compare_key)) {
                (Some(every), Some(last)) if !full => last
                    .parse::<i64>()
                    .map(|last| now - last >= every.as_micros() as i64)
                    .unwrap_or(true),
                _ => true,
            };
            if due && !full {
                let mut kept = remote.all_keys(source, db, reading.key_idx).await?;
                kept.append(&mut new_keys);
                let gone = self
                    .gone_rows(source, ctx, reading.schema, reading.key_idx, kept, now)
                    .await?;
                for b in &gone {
                    marked += b.num_rows() as u64;
                    writer.write(b).await?;
                }
                // The time is kept only when it decides the next comparison, so that a run with
                // nothing new commits nothing.
                if every.is_some() {
                    state.state_after.insert(compare_key, now.to_string());
                }
            }
        }
        Ok(marked)
    }

    /// Rows of the table not yet marked deleted whose keys are not among `kept` (the keys at the
    /// source and those of the rows just read), with `_deleted_at` set to `now`.
    async fn gone_rows(
        &self,
        source: &Source,
        ctx: &SessionContext,
        schema: &SchemaRef,
        key_idx: &[usize],
        kept: Vec<RecordBatch>,
        now: i64,
    ) -> Result<Vec<RecordBatch>> {
        let Some(table) = self.wh.load(&source.table).await? else {
            return Ok(Vec::new());
        };
        let key_schema: SchemaRef = Arc::new(schema.project(key_idx)?);
        let conform = |b: &RecordBatch| crate::warehouse::conform_batch(b, &key_schema);
        let mut keys: Vec<RecordBatch> = Vec::new();
        for b in &kept {
            keys.push(conform(b)?);
        }
        let suffix = format!("{}_{}", source.pipeline, source.name);
        let (t_name, k_name) = (
            format!("__kbcrm_del_t_{suffix}"),
            format!("__kbcrm_del_k_{suffix}"),
        );
        table.update_datafusion_session(&ctx.state())?;
        ctx.register_table(&t_name, self.wh.provider(&source.table, &table).await?)?;
        ctx.register_table(
            &k_name,
            Arc::new(MemTable::try_new(key_schema, vec![keys])?),
        )?;
        let cols: Vec<String> = schema
            .fields()
            .iter()
            .filter(|f| f.name() != DELETED_AT)
            .map(|f| format!("t.{}", quote_ident(f.name())))
            .collect();
        let on: Vec<String> = source
            .write
            .keys()
            .iter()
            .map(|k| format!("k.{k} = t.{k}", k = quote_ident(k)))
            .collect();
        let sql = format!(
            "SELECT {}, to_timestamp_micros({now}) AS {} \
             FROM {t_name} t WHERE t.{} IS NULL \
             AND NOT EXISTS (SELECT 1 FROM {k_name} k WHERE {})",
            cols.join(", "),
            quote_ident(DELETED_AT),
            quote_ident(DELETED_AT),
            on.join(" AND ")
        );
        let result = match ctx.sql(&sql).await {
            Ok(df) => df.collect().await,
            Err(e) => Err(e),
        };
        ctx.deregister_table(&t_name)?;
        ctx.deregister_table(&k_name)?;
        let mut out = Vec::new();
        for b in result? {
            out.push(crate::warehouse::conform_batch(&b, schema)?);
        }
        Ok(out)
    }
}

/// What reading a database source's rows into its table needs.
struct Reading<'a> {
    source: &'a Source,
    db: &'a Database,
    /// The table's columns: the declared ones, and `_deleted_at` when it tracks deletes.
    schema: &'a SchemaRef,
    /// The positions of the write's key columns among the declared ones.
    key_idx: &'a [usize],
    /// The time of the load, µs since the epoch: rows marked deleted without a time get it.
    now: i64,
}

/// The positions of the write's key columns among the source's columns.
fn key_positions(source: &Source) -> Vec<usize> {
    source
        .write
        .keys()
        .iter()
        .filter_map(|k| source.columns.iter().position(|c| &c.name == k))
        .collect()
}

/// A cursor source's filter, from the watermark of the loads before unless on a full refresh,
/// and the condition that reads only the rows past that watermark, less the overlap.
fn cursor_and_condition(
    source: &Source,
    db: &Database,
    remote: &Remote,
    declared: &SchemaRef,
    state: &RunState,
    full: bool,
) -> Result<(Option<CursorFilter>, Option<String>)> {
    let cursor_key = (
        source.pipeline.clone(),
        source.name.clone(),
        "cursor".to_string(),
    );
    let watermark = (!full)
        .then(|| state.state_before.get(&cursor_key).cloned())
        .flatten();
    let mut cursor = None;
    let mut condition = None;
    if let Some(Incremental::Cursor(c)) = &source.incremental {
        let idx = source
            .columns
            .iter()
            .position(|x| &x.name == c)
            .unwrap_or(0);
        let mut filter = CursorFilter::new(idx, declared.field(idx).data_type(), None)?;
        if let Some(w) = &watermark {
            filter.seed(w)?;
            condition = Some(remote.cursor_condition(source, idx, w, db.overlap));
        }
        cursor = Some(filter);
    }
    Ok((cursor, condition))
}

/// Start reading each part's rows (each part by its condition) in a task of its own: the
/// first on `session`, the others each on a session of its own. The channel the rows and
/// failures come on, and the tasks.
fn spawn_reads(
    reading: &Reading<'_>,
    remote: &Remote,
    declared: &SchemaRef,
    parts: Vec<Option<String>>,
    session: Session,
    origin: &str,
) -> (mpsc::Receiver<Result<FileOutput>>, JoinSet<()>) {
    let (source, db) = (reading.source, reading.db);
    let (tx, rx) = mpsc::channel(2 * parts.len() + 2);
    let mut tasks = JoinSet::new();
    let mut first = Some(session);
    for (i, cond) in parts.into_iter().enumerate() {
        let sql = database::select_sql(source, db, cond.as_deref());
        let (source, remote, declared, tx, key_idx) = (
            source.clone(),
            remote.clone(),
            declared.clone(),
            tx.clone(),
            reading.key_idx.to_vec(),
        );
        let label = if i == 0 && first.is_some() {
            origin.to_string()
        } else {
            format!("{origin} part {}", i + 1)
        };
        let given = first.take();
        tasks.spawn(async move {
            let session = match given {
                Some(s) => s,
                None => match remote.session(&source).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
            };
            let query = ReadQuery {
                source: &source,
                sql: &sql,
                schema: declared,
                label: &label,
                keys: &key_idx,
                tx: tx.clone(),
            };
            let r = remote.read(session, query).await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    drop(tx);
    (rx, tasks)
}

/// What the reads sent: their totals, the keys of the rows read (when deletes compare keys),
/// and the failure that ended them, when one did.
struct Received {
    totals: ReadTotals,
    new_keys: Vec<RecordBatch>,
    failure: Option<Error>,
}

/// Write the rows the reads send (with `_deleted_at`), the cursor seeing each, until the reads
/// end or one fails; their rejected rows go to the run.
async fn receive_rows(
    reading: &Reading<'_>,
    state: &mut RunState,
    rx: &mut mpsc::Receiver<Result<FileOutput>>,
    writer: &mut TableWriter,
    cursor: &mut Option<CursorFilter>,
    bar: &Step,
) -> Result<Received> {
    let Reading {
        source,
        db,
        schema,
        key_idx,
        now,
    } = *reading;
    let (mut rows_read, mut rejected, mut bytes_read) = (0u64, 0u64, 0u64);
    let mut new_keys: Vec<RecordBatch> = Vec::new();
    let failure = loop {
        let Some(out) = rx.recv().await else {
            break None;
        };
        let out = match out {
            Ok(o) => o,
            Err(e) => break Some(e),
        };
        rows_read += out.rows_read;
        bytes_read += out.bytes_read;
        rejected += out.rejects.len() as u64;
        for b in &out.batches {
            if let Some(c) = cursor.as_mut() {
                c.apply(b)?;
            }
            if matches!(db.deletes, Some(Deletes::CompareKeys(_))) {
                new_keys.push(b.project(key_idx)?);
            }
            writer
                .write(&with_deleted_at(source, db, b, schema, now)?)
                .await?;
        }
        bar.inc(out.rows_read, out.bytes_read);
        state
            .rejects
            .extend(out.rejects.into_iter().map(|r| (source.name.clone(), r)));
    };
    Ok(Received {
        totals: ReadTotals {
            rows_read,
            rejected,
            bytes_read,
        },
        new_keys,
        failure,
    })
}
