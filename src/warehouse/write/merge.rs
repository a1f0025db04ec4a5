//! Merges by key: the keys that come again looked up, the rows they replace rewritten or marked
//! in deletion vectors, the new rows written beside.

use super::*;

/// The column of a row's source file position while repeated keys are resolved.
pub(super) const SOURCE_FILE_COLUMN: &str = "__kbcrm_source_file";

pub(super) const FILE_COLUMN: &str = "__kbcrm_file";

pub(super) async fn merge(
    wh: &Warehouse,
    ctx: &SessionContext,
    url: Url,
    current: &DeltaTable,
    new: NewData,
    keys: &[String],
    gone: Option<RecordBatch>,
) -> Result<Staged> {
    let old = current_files(&url, current).await?;
    let new_name = format!("__kbcrm_new_{}", new.table);
    let target_name = format!("__kbcrm_target_{}", new.table);
    ctx.register_table(&new_name, new_rows_at(&url, &new).await?)?;
    current.update_datafusion_session(&ctx.state())?;
    let target = current
        .table_provider()
        .with_file_column(FILE_COLUMN)
        .await?;
    ctx.register_table(&target_name, target)?;
    // New rows whose keys the table does not hold yet are added as they were written: only the
    // target's key columns are read to find out. In a table of several files, the files holding
    // those keys are found too, and the merge then reads only them: a batch that changes rows
    // of a few files (this year's open invoices) does not read the others again.
    let started = std::time::Instant::now();
    let (any_known, with_keys) = look_up_keys(
        ctx,
        current,
        &new.table,
        keys,
        (new_name.as_str(), target_name.as_str()),
        gone.as_ref(),
        old.len(),
    )
    .await?;
    step_done(&new.table, "merge: keys looked up", started);
    if !matches!(any_known, Ok(true)) {
        ctx.deregister_table(&new_name)?;
        ctx.deregister_table(&target_name)?;
        if let Err(e) = any_known {
            delete_files(wh, &url, &new.adds).await?;
            return Err(e);
        }
        let mut staged = append(url, current, new).await?;
        staged.operation = Operation::Merge;
        return Ok(staged);
    }
    // Tried again with sort-merge joins when a hash join does not fit; `new`'s files are deleted
    // only after.
    let gone_name = format!("__kbcrm_gone_{}", new.table);
    if let Some(gone) = gone {
        let table = MemTable::try_new(gone.schema(), vec![vec![gone]])?;
        ctx.register_table(&gone_name, Arc::new(table))?;
    }
    let removing = ctx.table_exist(gone_name.as_str())?;
    // Files the merge may mark rows of instead of rewriting them, with their sizes.
    let markable = markable_files(wh, current, &old)?;
    let result = crate::engine::spill_joins_on_retry(ctx, &new.table, || {
        let gone = removing.then_some(gone_name.as_str());
        let names = (new_name.as_str(), target_name.as_str(), gone);
        let job = MergeJob {
            url: &url,
            new: &new,
            keys,
            names,
            read_version: current.version(),
            markable: &markable,
            with_keys: with_keys.as_deref(),
        };
        merge_sql(wh, ctx, job)
    })
    .await;
    if removing {
        ctx.deregister_table(&gone_name)?;
    }
    ctx.deregister_table(&new_name)?;
    ctx.deregister_table(&target_name)?;
    delete_files(wh, &url, &new.adds).await?;
    let merged = result?;
    merged_write(current, url, new, old, merged)
}

/// Whether the table holds any key of the new rows, and which files do when looked up.
async fn look_up_keys(
    ctx: &SessionContext,
    current: &DeltaTable,
    table: &str,
    keys: &[String],
    (new_name, target_name): (&str, &str),
    gone: Option<&RecordBatch>,
    old_files: usize,
) -> Result<(Result<bool>, Option<Vec<String>>)> {
    // The files holding any key of the new rows, when they were looked up.
    let mut with_keys: Option<Vec<String>> = None;
    let any_known = match gone {
        Some(_) => Ok(true),
        None if old_files > 1 => {
            let files = crate::engine::spill_joins_on_retry(ctx, table, || {
                files_with_keys(ctx, keys, new_name, target_name)
            })
            .await;
            match files {
                Ok(files) if !files.is_empty() && files.len() < old_files => {
                    ctx.deregister_table(target_name)?;
                    let only = current
                        .table_provider()
                        .with_file_column(FILE_COLUMN)
                        .with_file_paths(files.clone())
                        .await?;
                    ctx.register_table(target_name, only)?;
                    with_keys = Some(files);
                    Ok(true)
                }
                Ok(files) => {
                    let any = !files.is_empty();
                    with_keys = Some(files);
                    Ok(any)
                }
                Err(e) => Err(e),
            }
        }
        None => {
            crate::engine::spill_joins_on_retry(ctx, table, || {
                known_keys(ctx, keys, new_name, target_name)
            })
            .await
        }
    };
    Ok((any_known, with_keys))
}

/// The files a merge may mark rows of instead of rewriting them, by URL, with their sizes.
fn markable_files<'a>(
    wh: &Warehouse,
    current: &DeltaTable,
    old: &'a [(DataFile, Remove)],
) -> Result<HashMap<String, (&'a DataFile, Option<u64>)>> {
    Ok(if marks_rows(wh, current)? {
        old.iter()
            .map(|(f, r)| {
                let size = r.size.and_then(|s| u64::try_from(s).ok());
                (f.url.to_string(), (f, size))
            })
            .collect()
    } else {
        HashMap::new()
    })
}

/// The staged merge: the table's files after it and the actions that get there.
fn merged_write(
    current: &DeltaTable,
    url: Url,
    new: NewData,
    old: Vec<(DataFile, Remove)>,
    merged: Merged,
) -> Result<Staged> {
    // A file with rows marked deleted is removed and added again with its new deletion vector.
    let mut marked_adds = marked_file_adds(current, &url, &merged.marked)?;
    let mut files = Vec::with_capacity(old.len() + merged.adds.len());
    let mut actions = Vec::new();
    let mut removed = 0;
    for (file, remove) in old {
        let key = file.url.to_string();
        if merged.rewritten.contains(&key) {
            actions.push(Action::Remove(remove));
            removed += 1;
        } else if let Some((deleted, _)) = merged.marked.get(&key) {
            let add = marked_adds
                .remove(&key)
                .ok_or_else(|| Error::Internal(format!("no add action for {key}")))?;
            actions.push(Action::Remove(remove));
            actions.push(Action::Add(add));
            files.push(DataFile {
                url: file.url,
                deleted: Some(deleted.clone()),
            });
        } else {
            files.push(file);
        }
    }
    files.extend(
        merged
            .adds
            .iter()
            .map(|a| DataFile::whole(file_url(&url, &a.path))),
    );
    let mut metrics = add_metrics(&merged.adds, new.rows);
    metrics.files_removed = removed;
    metrics.rows_written = merged.changed_rows;
    actions.extend(merged.adds.into_iter().map(Action::Add));
    Ok(Staged {
        table: new.table,
        url,
        read_version: current.version(),
        actions,
        operation: Operation::Merge,
        metrics,
        schema: new.schema,
        files,
    })
}

/// Whether any key of the new rows is already in the target table.
pub(super) async fn known_keys(
    ctx: &SessionContext,
    keys: &[String],
    new_name: &str,
    target_name: &str,
) -> Result<bool> {
    let on = same(keys, "n", "t");
    let sql = format!("select 1 from {target_name} t join {new_name} n on {on} limit 1");
    let batches = crate::engine::collect(ctx.sql(&sql).await?, "known keys").await?;
    Ok(batches.iter().any(|b| b.num_rows() > 0))
}

/// The data files (as the scan names them) of the target rows whose keys the new rows have.
pub(super) async fn files_with_keys(
    ctx: &SessionContext,
    keys: &[String],
    new_name: &str,
    target_name: &str,
) -> Result<Vec<String>> {
    let on = same(keys, "n", "t");
    let key_list = column_list(keys);
    let sql = format!(
        "select distinct t.{FILE_COLUMN} from {target_name} t \
         join (select distinct {key_list} from {new_name}) n on {on}"
    );
    collect_strings(&crate::engine::collect(ctx.sql(&sql).await?, "files with keys").await?)
}

/// What a merge wrote.
pub(super) struct Merged {
    /// The files it rewrote (their URLs): their kept rows are in `adds`.
    pub(super) rewritten: HashSet<String>,
    /// The files it wrote.
    pub(super) adds: Vec<Add>,
    /// The files it marked rows of (their URLs): all their marked rows, and the descriptor of
    /// the deletion vector that lists them.
    pub(super) marked: HashMap<String, (Arc<Deleted>, DeletionVectorDescriptor)>,
    /// New or changed rows.
    pub(super) changed_rows: u64,
}

/// The `Add` actions that bring back each file of `marked` with its new deletion vector.
pub(super) fn marked_file_adds(
    current: &DeltaTable,
    url: &Url,
    marked: &HashMap<String, (Arc<Deleted>, DeletionVectorDescriptor)>,
) -> Result<HashMap<String, Add>> {
    let mut out = HashMap::new();
    if marked.is_empty() {
        return Ok(out);
    }
    for f in current.snapshot()?.log_data().iter() {
        let key = file_url(url, &f.path()).to_string();
        let Some((_, dv)) = marked.get(&key) else {
            continue;
        };
        // The tags are only reachable through the whole action.
        #[allow(deprecated)]
        let mut add = f.add_action();
        add.deletion_vector = Some(dv.clone());
        add.data_change = true;
        // The file's statistics still count the marked rows: its bounds are no longer tight.
        if let Some(stats) = &add.stats
            && let Ok(serde_json::Value::Object(mut map)) =
                serde_json::from_str::<serde_json::Value>(stats)
        {
            map.insert("tightBounds".into(), serde_json::Value::Bool(false));
            add.stats = Some(serde_json::Value::Object(map).to_string());
        }
        out.insert(key, add);
    }
    Ok(out)
}

/// At most this share of a file's rows may be marked deleted; a file that would have more is
/// rewritten.
pub(super) const MAX_MARKED_SHARE: f64 = 0.5;

/// Files of fewer rows are rewritten rather than marked: rewriting them costs little, and a
/// deletion vector is one more file for every later read to fetch (bookkeeping tables change a
/// few of their rows on every run).
pub(super) const MIN_MARKED_FILE_ROWS: u64 = 1024;

/// What one merge works on.
pub(super) struct MergeJob<'a> {
    /// The table.
    pub(super) url: &'a Url,
    /// The rows to merge, written as files already.
    pub(super) new: &'a NewData,
    /// The merge keys.
    pub(super) keys: &'a [String],
    /// The session's names of the new rows, the table, and the rows gone at the source.
    pub(super) names: (&'a str, &'a str, Option<&'a str>),
    /// The table's version the merge reads.
    pub(super) read_version: Option<u64>,
    /// The files that may get a deletion vector instead of being rewritten, by URL.
    pub(super) markable: &'a HashMap<String, (&'a DataFile, Option<u64>)>,
    /// The files holding keys that come again, when they were looked up from the files.
    pub(super) with_keys: Option<&'a [String]>,
}

/// Run the merge: the files it rewrites or marks rows of, the files it writes, and the number
/// of new or changed rows. The files of `markable` (by URL) keep their rows and get a deletion
/// vector for the replaced ones, unless that would mark more than half of their rows.
pub(super) async fn merge_sql(
    wh: &Warehouse,
    ctx: &SessionContext,
    job: MergeJob<'_>,
) -> Result<Merged> {
    let MergeJob {
        url,
        new,
        keys,
        names: (new_name, target_name, gone_name),
        read_version,
        markable,
        with_keys,
    } = job;
    let cols = column_list(new.schema.fields().iter().map(|f| f.name()));
    let on = same(keys, "c", "t");
    let t_cols = target_columns(new);
    let started = std::time::Instant::now();
    let (changed_df, changed_rows) =
        find_changed(ctx, new, keys, (new_name, target_name), &cols, &t_cols).await?;
    step_done(&new.table, "merge: changed rows found", started);
    let started = std::time::Instant::now();
    if changed_rows == 0 && gone_name.is_none() {
        return Ok(Merged {
            rewritten: HashSet::new(),
            adds: Vec::new(),
            marked: HashMap::new(),
            changed_rows: 0,
        });
    }
    ctx.register_table("__kbcrm_changed", changed_df.clone().into_view())?;
    // Rows of removed keys go, with the files that hold them.
    let (touched_gone, keep_gone) = gone_clauses(gone_name, target_name, &on);
    let touched_sql = format!(
        "select distinct t.{FILE_COLUMN} from {target_name} t join __kbcrm_changed c on {on}{touched_gone}"
    );
    // When every new row is a change (keys are unique among them), the changed keys are the
    // new rows' keys, whose files were looked up already.
    let touched = match with_keys {
        Some(files) if gone_name.is_none() && changed_rows == new.rows => Ok(files.to_vec()),
        _ => match ctx.sql(&touched_sql).await {
            Ok(df) => crate::engine::collect(df, "touched files").await,
            Err(e) => Err(e.into()),
        }
        .and_then(|b| collect_strings(&b)),
    };
    let touched = match touched {
        Ok(t) => t,
        Err(e) => {
            ctx.deregister_table("__kbcrm_changed")?;
            return Err(e);
        }
    };
    step_done(&new.table, "merge: touched files found", started);
    let started = std::time::Instant::now();
    let marks = match mark_rows(wh, ctx, url, keys, gone_name, &touched, markable).await {
        Ok(m) => m,
        Err(e) => {
            ctx.deregister_table("__kbcrm_changed")?;
            return Err(e);
        }
    };
    step_done(&new.table, "merge: rows to mark found", started);
    let started = std::time::Instant::now();
    let touched: Vec<&String> = touched
        .iter()
        .filter(|p| !marks.contains_key(&normalize_file(url, p)))
        .collect();
    let touched_urls: HashSet<String> = touched.iter().map(|p| normalize_file(url, p)).collect();
    let list = quoted_list(&touched);
    // The new and changed rows, and the rows kept from the touched files, go to files of their
    // own, each laid out as the table declares: the kept rows' files are tagged with the
    // version they are unchanged since, so that a model reading only what changed skips them.
    let kept_sql = (!touched.is_empty()).then(|| {
        format!(
            "select {t_cols} from {target_name} t where t.{FILE_COLUMN} in ({list}) \
                 and not exists (select 1 from __kbcrm_changed c where {on}){keep_gone}"
        )
    });
    let result = write_merged(wh, ctx, url, new, kept_sql, read_version, marks).await;
    step_done(&new.table, "merge: files rewritten", started);
    ctx.deregister_table("__kbcrm_changed")?;
    let (adds, marked) = result?;
    Ok(Merged {
        rewritten: touched_urls,
        adds,
        marked,
        changed_rows,
    })
}

/// The new rows' columns, read from the table as `t`.
fn target_columns(new: &NewData) -> String {
    new.schema
        .fields()
        .iter()
        .map(|f| format!("t.{}", quote_ident(f.name())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The new rows that change the table, and how many they are.
async fn find_changed(
    ctx: &SessionContext,
    new: &NewData,
    keys: &[String],
    (new_name, target_name): (&str, &str),
    cols: &str,
    t_cols: &str,
) -> Result<(datafusion::dataframe::DataFrame, u64)> {
    // Only target rows whose keys come again can be equal to new rows.
    let key_list = column_list(keys);
    let on_kt = same(keys, "k", "t");
    // Rows known to be changes are the new rows as written; others are compared with the table.
    Ok(match new.all_changes {
        true => (
            ctx.sql(&format!("select {cols} from {new_name}")).await?,
            new.rows,
        ),
        false => {
            let changed = format!(
                "select {cols} from {new_name} except \
                 select {t_cols} from (select distinct {key_list} from {new_name}) k join {target_name} t on {on_kt}"
            );
            let df = ctx.sql(&changed).await?.cache().await?;
            let rows = df.clone().count().await? as u64;
            (df, rows)
        }
    })
}

/// The SQL added for rows of removed keys: to the touched files, and to the kept rows.
fn gone_clauses(gone_name: Option<&str>, target_name: &str, on: &str) -> (String, String) {
    match gone_name {
        Some(g) => (
            format!(
                " union select distinct t.{FILE_COLUMN} from {target_name} t join {g} c on {on}"
            ),
            format!(" and not exists (select 1 from {g} c where {on})"),
        ),
        None => (String::new(), String::new()),
    }
}

/// The files as an SQL list of quoted strings.
fn quoted_list(files: &[&String]) -> String {
    files
        .iter()
        .map(|p| format!("'{}'", p.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Write the changed rows, the kept rows (`kept_sql`) and the deletion vectors of `marks`.
async fn write_merged(
    wh: &Warehouse,
    ctx: &SessionContext,
    url: &Url,
    new: &NewData,
    kept_sql: Option<String>,
    read_version: Option<u64>,
    marks: HashMap<String, Arc<Deleted>>,
) -> Result<(
    Vec<Add>,
    HashMap<String, (Arc<Deleted>, DeletionVectorDescriptor)>,
)> {
    let (mut adds, _) = write_like(ctx, url, new, "select * from __kbcrm_changed").await?;
    if let Some(kept_sql) = kept_sql {
        let (kept, _) = match write_like(ctx, url, new, &kept_sql).await {
            Ok(kept) => kept,
            Err(e) => {
                delete_files(wh, url, &adds).await?;
                return Err(e);
            }
        };
        adds.extend(
            kept.into_iter()
                .map(|add| tag_unchanged_since(add, read_version)),
        );
    }
    if marks.is_empty() {
        return Ok((adds, HashMap::new()));
    }
    let vectors: Vec<&Deleted> = marks.values().map(Arc::as_ref).collect();
    match super::super::deletion::write_deletion_vectors(wh.store(), url, &vectors).await {
        Ok(descriptors) => {
            let marked = marks
                .into_iter()
                .zip(descriptors)
                .map(|((u, d), dv)| (u, (d, dv)))
                .collect();
            Ok((adds, marked))
        }
        Err(e) => {
            delete_files(wh, url, &adds).await?;
            Err(e)
        }
    }
}

/// All the rows of `file` (its URL `url`) to mark deleted once the rows of the keys in `set`
/// are, or `None` when that would be more than [`MAX_MARKED_SHARE`] of its rows or the file is
/// smaller than [`MIN_MARKED_FILE_ROWS`].
pub(super) async fn rows_to_mark(
    wh: &Warehouse,
    set: &KeySet,
    url: &str,
    (file, size): (&DataFile, Option<u64>),
) -> Result<(String, Option<Arc<Deleted>>)> {
    let path = super::super::deletion::store_path(&file.url)?;
    let (rows, file_rows) = set.rows_in(wh.store().clone(), path, size).await?;
    let deleted = match &file.deleted {
        Some(d) => d.with(&rows)?,
        None => Deleted::new(rows, file_rows)?,
    };
    let keep = deleted.file_rows() >= MIN_MARKED_FILE_ROWS
        && deleted.count() as f64 <= MAX_MARKED_SHARE * deleted.file_rows() as f64;
    Ok((url.to_string(), keep.then(|| Arc::new(deleted))))
}

/// The files of `touched` (paths as the scan names them) that keep their rows, with all the
/// rows to mark deleted in each (those already marked included): the rows of the changed and
/// removed keys. Only files of `markable` qualify (see [`rows_to_mark`]).
pub(super) async fn mark_rows(
    wh: &Warehouse,
    ctx: &SessionContext,
    url: &Url,
    keys: &[String],
    gone_name: Option<&str>,
    touched: &[String],
    markable: &HashMap<String, (&DataFile, Option<u64>)>,
) -> Result<HashMap<String, Arc<Deleted>>> {
    let candidates: Vec<(String, (&DataFile, Option<u64>))> = touched
        .iter()
        .filter_map(|p| {
            let u = normalize_file(url, p);
            markable.get(&u).map(|f| (u, *f))
        })
        .collect();
    if candidates.is_empty() {
        return Ok(HashMap::new());
    }
    let key_list = column_list(keys);
    let mut sql = format!("select distinct {key_list} from __kbcrm_changed");
    if let Some(g) = gone_name {
        sql.push_str(&format!(" union select {key_list} from {g}"));
    }
    let batches = crate::engine::collect(ctx.sql(&sql).await?, "keys to mark").await?;
    let Some(set) = KeySet::new(keys, &batches)? else {
        return Ok(HashMap::new());
    };
    let mut found = Vec::with_capacity(candidates.len());
    for chunk in candidates.chunks(4) {
        let reads = chunk
            .iter()
            .map(|(u, file)| rows_to_mark(wh, &set, u, *file));
        found.extend(futures::future::try_join_all(reads).await?);
    }
    Ok(found
        .into_iter()
        .filter_map(|(u, d)| Some((u, d?)))
        .collect())
}
