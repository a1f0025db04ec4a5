//! Type-2 slowly changing dimensions: a change to a tracked column closes the current version
//! and opens a new one; a change to any other column updates the current version in place;
//! unchanged rows write nothing.
//!
//! The versions to write are computed in SQL and then merged by version key (the surrogate key,
//! or the business keys plus `valid_from`), so only the files holding touched versions are
//! rewritten.

use datafusion::prelude::SessionContext;

use super::write::{
    NewData, Operation, delete_files, latest_per_key, new_rows_at, stage, write_frame,
};
use super::{Staged, Warehouse};
use crate::error::Result;
use crate::plan::{Scd2, Write};
use crate::sql::{column_list, quote_ident};

const EPOCH_START: &str = "1900-01-01T00:00:00Z";
/// Open versions end here: far off, and inside the range of nanosecond timestamps so that any
/// timestamp comparison in SQL works.
const OPEN_END: &str = "2199-12-31T23:59:59Z";

/// Up to this many new rows, the versions of their keys are read once and held in memory.
const MAX_HELD_ROWS: u64 = 500_000;

fn ts(lit: &str) -> String {
    format!("arrow_cast('{lit}', 'Timestamp(Microsecond, Some(\"UTC\"))')")
}

fn ts_expr(e: &str) -> String {
    format!("arrow_cast({e}, 'Timestamp(Microsecond, Some(\"UTC\"))')")
}

/// Stage a type-2 write of `new` (one row per key) into its table.
pub async fn stage_scd2(
    wh: &Warehouse,
    ctx: &SessionContext,
    new: NewData,
    opts: &Scd2,
    run_micros: i64,
) -> Result<Staged> {
    let keys = &opts.keys;
    let new = latest_per_key(wh, ctx, new, keys).await?;
    let table = new.table.clone();
    let url = wh.table_url(&table);
    let new_name = format!("__kbcrm_scd_new_{table}");
    let cur_name = format!("__kbcrm_scd_cur_{table}");
    let held_name = format!("__kbcrm_scd_touched_{table}");
    ctx.register_table(&new_name, new_rows_at(&url, &new).await?)?;
    let current = wh.load(&table).await?;
    if let Some(t) = &current {
        t.update_datafusion_session(&ctx.state())?;
        ctx.register_table(&cur_name, wh.provider(&table, t).await?)?;
    }
    let cols: Vec<String> = new
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let run_ts = chrono::DateTime::from_timestamp_micros(run_micros)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let sql = async {
        if current.is_none() {
            return Ok(initial_sql(&new_name, &cols, keys, opts));
        }
        let max_sk = match &opts.surrogate_key {
            Some(sk) => max_key(ctx, &cur_name, sk).await?,
            None => 0,
        };
        // The versions the new rows can touch are those of their keys: read from the table
        // once, they are what the joins below read (the current versions are otherwise
        // scanned once per join). A batch too large to hold is joined with the whole table.
        let touched = match new.rows <= MAX_HELD_ROWS {
            true => {
                let sql = format!(
                    "select c.* from {cur_name} c left semi join {new_name} n on {} where c.is_current",
                    keys_eq(keys, "c", "n")
                );
                let held = ctx.sql(&sql).await?.cache().await?;
                ctx.register_table(&held_name, held.into_view())?;
                held_name.as_str()
            }
            false => cur_name.as_str(),
        };
        Ok::<_, crate::error::Error>(changes_sql(
            &new_name, touched, &cols, keys, opts, &run_ts, max_sk,
        ))
    }
    .await;
    // Only the write is tried again with sort-merge joins; whatever happened, the tables
    // registered here go and `new`'s files are deleted.
    let result = match sql {
        Ok(sql) => {
            crate::engine::spill_joins_on_retry(ctx, &table, || async {
                write_frame(wh, &table, ctx.sql(&sql).await?, &[], None).await
            })
            .await
        }
        Err(e) => Err(e),
    };
    ctx.deregister_table(&new_name)?;
    if current.is_some() {
        ctx.deregister_table(&cur_name)?;
        ctx.deregister_table(&held_name)?;
    }
    delete_files(wh, &url, &new.adds).await?;
    let versions = result?;
    let mut version_keys: Vec<String> = match &opts.surrogate_key {
        Some(sk) => vec![sk.clone()],
        None => keys.to_vec(),
    };
    if opts.surrogate_key.is_none() {
        version_keys.push("valid_from".to_string());
    }
    let write = if current.is_some() {
        Write::Merge { keys: version_keys }
    } else {
        Write::Overwrite
    };
    // Each version written differs from the table's version of its keys, if any: a closed
    // version in its end, one updated in place in an untracked column, a new one in its key.
    let versions = NewData {
        all_changes: true,
        ..versions
    };
    let mut staged = stage(wh, ctx, versions, &write).await?;
    staged.operation = Operation::Scd2;
    Ok(staged)
}

async fn max_key(ctx: &SessionContext, cur: &str, sk: &str) -> Result<i64> {
    let sql = format!(
        "select cast(coalesce(max({}), 0) as bigint) from {cur}",
        quote_ident(sk)
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    Ok(batches
        .first()
        .map(|b| {
            use arrow::array::AsArray;
            b.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0)
        })
        .unwrap_or(0))
}

fn list(cols: &[String], prefix: &str) -> String {
    cols.iter()
        .map(|c| format!("{prefix}{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn keys_eq(keys: &[String], a: &str, b: &str) -> String {
    keys.iter()
        .map(|k| format!("{a}.{k} = {b}.{k}", k = quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// A condition: the columns of the rows aliased `a` equal those of `b` (NULL equal to NULL).
pub(super) fn same(cols: &[String], a: &str, b: &str) -> String {
    if cols.is_empty() {
        return "true".to_string();
    }
    cols.iter()
        .map(|c| format!("({a}.{c} is not distinct from {b}.{c})", c = quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// First load: every row is a current version valid since 1900.
fn initial_sql(new: &str, cols: &[String], keys: &[String], opts: &Scd2) -> String {
    let sk = match &opts.surrogate_key {
        Some(sk) => format!(
            "cast(row_number() over (order by {}) as bigint) as {}, ",
            column_list(keys),
            quote_ident(sk)
        ),
        None => String::new(),
    };
    format!(
        "select {sk}{cols}, {start} as valid_from, {end} as valid_to, true as is_current from {new}",
        cols = list(cols, ""),
        start = ts(EPOCH_START),
        end = ts(OPEN_END),
    )
}

/// Later loads: closed versions, in-place updates and new versions.
fn changes_sql(
    new: &str,
    cur: &str,
    cols: &[String],
    keys: &[String],
    opts: &Scd2,
    run_ts: &str,
    max_sk: i64,
) -> String {
    let other: Vec<String> = cols
        .iter()
        .filter(|c| !keys.contains(c) && !opts.tracked.contains(c))
        .cloned()
        .collect();
    let change_at = |alias: &str| match &opts.valid_from {
        Some(c) => ts_expr(&format!("{alias}.{}", quote_ident(c))),
        None => ts(run_ts),
    };
    let (sk_col, sk_sel_c, sk_sel_m, sk_new) = match &opts.surrogate_key {
        Some(sk) => {
            let q = quote_ident(sk);
            (
                format!("c.{q} as __sk, "),
                format!("c.{q}, "),
                format!("__sk as {q}, "),
                format!(
                    "cast({max_sk} + row_number() over (order by {}) as bigint) as {q}, ",
                    column_list(keys)
                ),
            )
        }
        None => (String::new(), String::new(), String::new(), String::new()),
    };
    let ncols = list(cols, "n.");
    let plain = list(cols, "");
    format!(
        "with cur as (select * from {cur} where is_current),\n\
         matched as (\n  select {ncols}, {sk_col}c.valid_from as __old_from,\n    ({tracked_same}) as __same_tracked,\n    ({other_same}) as __same_other\n  from {new} n join cur c on {on_nc}\n),\n\
         new_keys as (select {ncols} from {new} n left anti join cur c on {on_nc}),\n\
         changed as (select {plain} from matched where not __same_tracked),\n\
         closed as (\n  select {sk_sel_c}{ccols}, c.valid_from, {change_n} as valid_to, false as is_current\n  from cur c join changed n on {on_cn}\n),\n\
         in_place as (\n  select {sk_sel_m}{plain}, __old_from as valid_from, {end} as valid_to, true as is_current\n  from matched where __same_tracked and not __same_other\n),\n\
         fresh as (\n  select {ncols}, {change_n} as valid_from from changed n\n  union all\n  select {ncols}, {start} as valid_from from new_keys n\n)\n\
         select * from closed\nunion all select * from in_place\nunion all\n\
         select {sk_new}{plain}, valid_from, {end} as valid_to, true as is_current from fresh",
        tracked_same = same(&opts.tracked, "n", "c"),
        other_same = same(&other, "n", "c"),
        on_nc = keys_eq(keys, "n", "c"),
        on_cn = keys_eq(keys, "c", "n"),
        ccols = list(cols, "c."),
        change_n = change_at("n"),
        start = ts(EPOCH_START),
        end = ts(OPEN_END),
    )
}
