//! The executive pack's content, read through the recipient's view of the warehouse: headline
//! figures against the previous as-of date, churn warnings, loyalty structure, purchasing power,
//! knowledge sources, the extract's own queries, and notes saying where the figures come from.
//!
//! Every aggregate is computed here from the per-customer cubes rather than read from the
//! precomputed rollups, so a recipient whose role filters rows sees totals over their rows only.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Date32Type, Field, Schema};
use chrono::NaiveDate;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::plan::extracts::Extract;
use crate::warehouse::Warehouse;
use sections::{Section, sections};

mod sections;

/// The cubes the pack reads, in the order their as-of dates are looked up.
const CUBES: &[&str] = &[
    "cube_churn_warning",
    "cube_loyalty",
    "cube_purchasing_power",
    "cube_knowledge_source",
];

/// How a headline figure is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FigureKind {
    /// A number of customers.
    Count,
    /// An amount of money.
    Money,
    /// A fraction shown as a percentage.
    Share,
}

/// One headline figure and its value at the previous as-of date.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What it is.
    pub label: String,
    /// How to show it.
    pub kind: FigureKind,
    /// Value as of the pack's date (`None`: not visible to the recipient).
    pub value: Option<f64>,
    /// Value as of the previous date in the cubes.
    pub previous: Option<f64>,
    /// Whether a rise is good news (revenue) or bad news (revenue at risk).
    pub higher_is_better: bool,
}

impl Figure {
    /// Change against the previous as-of date.
    pub fn change(&self) -> Option<f64> {
        Some(self.value? - self.previous?)
    }

    /// Relative change (for counts and money; shares change in points).
    pub fn change_ratio(&self) -> Option<f64> {
        let (v, p) = (self.value?, self.previous?);
        (self.kind != FigureKind::Share && p != 0.0).then(|| (v - p) / p.abs())
    }

    /// The value in words and digits, e.g. "1,581", "3,755,268", "42.0%".
    pub fn show(&self, v: Option<f64>) -> String {
        match v {
            None => "n/a".into(),
            Some(v) => match self.kind {
                FigureKind::Count | FigureKind::Money => group_digits(v),
                FigureKind::Share => format!("{:.1}%", v * 100.0),
            },
        }
    }

    /// The change in words, e.g. "+4.1% on 2025-09-30" or "-2.3 points".
    pub fn show_change(&self) -> Option<String> {
        let d = self.change()?;
        Some(match (self.kind, self.change_ratio()) {
            (FigureKind::Share, _) => format!("{:+.1} points", d * 100.0),
            (_, Some(r)) => format!("{}{} ({:+.1}%)", sign(d), group_digits(d.abs()), r * 100.0),
            (_, None) => format!("{}{}", sign(d), group_digits(d.abs())),
        })
    }
}

fn sign(d: f64) -> &'static str {
    if d < 0.0 { "-" } else { "+" }
}

/// A whole number with thousands separators: 3755267.6 → "3,755,268".
pub fn group_digits(v: f64) -> String {
    let r = v.round();
    let digits = format!("{}", r.abs() as u128);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if r < 0.0 { format!("-{out}") } else { out }
}

/// One table of the pack.
#[derive(Debug, Clone)]
pub struct PackTable {
    /// File and sheet name.
    pub name: String,
    /// Heading.
    pub title: String,
    /// The rows.
    pub batch: RecordBatch,
}

impl PackTable {
    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// A column's values as cells.
    pub fn cells(&self, col: usize) -> Vec<Cell> {
        cells(self.batch.column(col))
    }

    /// How a column is shown.
    pub fn kind(&self, col: usize) -> ColumnKind {
        let f = self.batch.schema_ref().field(col).clone();
        column_kind(f.name(), f.data_type())
    }

    /// The index of a column.
    pub fn col(&self, name: &str) -> Option<usize> {
        self.batch.schema_ref().index_of(name).ok()
    }
}

/// A value ready to write.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// No value.
    Null,
    /// Text.
    Text(String),
    /// A number.
    Number(f64),
    /// A date.
    Date(NaiveDate),
}

/// How a column is shown, from its name and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Text.
    Text,
    /// Whole numbers with separators.
    Integer,
    /// Money, no decimals.
    Money,
    /// A fraction shown as a percentage.
    Share,
    /// Two decimals.
    Decimal,
    /// A date.
    Date,
}

/// The display kind of a column.
pub fn column_kind(name: &str, t: &DataType) -> ColumnKind {
    match t {
        DataType::Date32 | DataType::Date64 => ColumnKind::Date,
        t if t.is_integer() => ColumnKind::Integer,
        t if t.is_numeric() => {
            let money = [
                "revenue",
                "spend",
                "clv",
                "monetary",
                "order_value",
                "amount",
            ];
            if name.ends_with("share") || name.starts_with("p_") || name.ends_with("_pct") {
                ColumnKind::Share
            } else if money.iter().any(|m| name.contains(m)) {
                ColumnKind::Money
            } else {
                ColumnKind::Decimal
            }
        }
        _ => ColumnKind::Text,
    }
}

fn cells(a: &ArrayRef) -> Vec<Cell> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let t = a.data_type();
    if matches!(t, DataType::Date32) {
        let d = a.as_primitive::<Date32Type>();
        return (0..a.len())
            .map(|i| {
                if d.is_null(i) {
                    Cell::Null
                } else {
                    d.value_as_date(i).map(Cell::Date).unwrap_or(Cell::Null)
                }
            })
            .collect();
    }
    if t.is_numeric()
        && let Ok(f) = arrow::compute::cast(a, &DataType::Float64)
    {
        let f = f.as_primitive::<arrow::datatypes::Float64Type>();
        return (0..f.len())
            .map(|i| {
                if f.is_null(i) || !f.value(i).is_finite() {
                    Cell::Null
                } else {
                    Cell::Number(f.value(i))
                }
            })
            .collect();
    }
    let options = FormatOptions::default();
    match ArrayFormatter::try_new(a.as_ref(), &options) {
        Ok(fmt) => (0..a.len())
            .map(|i| {
                if a.is_null(i) {
                    Cell::Null
                } else {
                    Cell::Text(fmt.value(i).to_string())
                }
            })
            .collect(),
        Err(_) => vec![Cell::Null; a.len()],
    }
}

/// The data tests of the run that committed the cubes read.
#[derive(Debug, Clone, Default)]
pub struct TestStatus {
    /// The run's id.
    pub run_id: Option<String>,
    /// (test, severity, failing rows, passed).
    pub results: Vec<(String, String, i64, bool)>,
}

/// Everything an extract's files show.
#[derive(Debug, Clone)]
pub struct Pack {
    /// Title.
    pub title: String,
    /// As-of date of the figures.
    pub as_of: NaiveDate,
    /// The previous as-of date in the cubes, compared against.
    pub previous: Option<NaiveDate>,
    /// Recipient role.
    pub role: Option<String>,
    /// Headline figures.
    pub headline: Vec<Figure>,
    /// Tables in the order shown (the headline and notes among them).
    pub tables: Vec<PackTable>,
    /// Sections left out, with why.
    pub omitted: Vec<(String, String)>,
    /// Versions of the tables the figures come from.
    pub versions: BTreeMap<String, u64>,
    /// Data tests of the run that built the cubes.
    pub tests: TestStatus,
}

impl Pack {
    /// A table by name.
    pub fn table(&self, name: &str) -> Option<&PackTable> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// The data tests recorded for the run that committed the newest cube version.
pub async fn test_status(
    wh: &Warehouse,
    base: &SessionContext,
    versions: &BTreeMap<String, u64>,
) -> Result<TestStatus> {
    let Some(cube) = CUBES.iter().find(|c| versions.contains_key(**c)) else {
        return Ok(TestStatus::default());
    };
    let run_id = wh.info(cube).await?.and_then(|i| i.last_run);
    let (Some(run), true) = (&run_id, versions.contains_key("kbcrm_test_results")) else {
        return Ok(TestStatus {
            run_id,
            results: Vec::new(),
        });
    };
    let sql = format!(
        "select test, severity, failures, passed from kbcrm_test_results \
         where run_id = '{}' order by pipeline, test",
        run.replace('\'', "''")
    );
    let b = collect(base, &sql).await?;
    let mut results = Vec::new();
    let (test, severity) = (cells(b.column(0)), cells(b.column(1)));
    let failures = cells(b.column(2));
    let passed = b.column(3).as_boolean();
    for i in 0..b.num_rows() {
        let text = |c: &Cell| match c {
            Cell::Text(t) => t.clone(),
            _ => String::new(),
        };
        let n = match failures[i] {
            Cell::Number(n) => n as i64,
            _ => 0,
        };
        results.push((
            text(&test[i]),
            text(&severity[i]),
            n,
            passed.is_valid(i) && passed.value(i),
        ));
    }
    Ok(TestStatus { run_id, results })
}

/// Read the pack through `ctx` (the recipient's view).
pub async fn gather(
    ctx: &SessionContext,
    x: &Extract,
    as_of: Option<NaiveDate>,
    versions: &BTreeMap<String, u64>,
    tests: TestStatus,
) -> Result<Pack> {
    let cubes = readable_cubes(ctx, x, versions)?;
    let dates = cube_dates(ctx, &cubes).await?;
    let as_of = pick_as_of(x, &dates, as_of)?;
    let previous = dates.iter().copied().filter(|d| *d < as_of).max();
    let d = format!("date '{as_of}'");

    let mut pack = Pack {
        title: x.title.clone(),
        as_of,
        previous,
        role: x.role.clone(),
        headline: Vec::new(),
        tables: Vec::new(),
        omitted: Vec::new(),
        versions: BTreeMap::new(),
        tests,
    };
    pack.headline = headline(ctx, &cubes, as_of, previous).await?;
    for c in &cubes {
        if let Some(v) = versions.get(*c) {
            pack.versions.insert(c.to_string(), *v);
        }
    }
    pack.tables.push(headline_table(&pack));

    add_sections(ctx, x, versions, sections(&d, x.top), &mut pack).await?;
    add_queries(ctx, x, &mut pack).await?;
    let notes = notes_table(&pack);
    pack.tables.push(notes);
    Ok(pack)
}

/// Whether the recipient's view holds table `t`.
fn readable(ctx: &SessionContext, t: &str) -> bool {
    ctx.table_exist(t).unwrap_or(false)
}

/// Why the recipient cannot read table `t`: the role may not, or the table was never built.
fn why_not(x: &Extract, versions: &BTreeMap<String, u64>, t: &str) -> String {
    if versions.contains_key(t) {
        format!(
            "role '{}' may not read {t}",
            x.role.as_deref().unwrap_or("(none)")
        )
    } else {
        format!("{t} is not in the warehouse; run the cubes pipeline")
    }
}

/// The cubes the recipient may read; an error saying why when it may read none.
fn readable_cubes(
    ctx: &SessionContext,
    x: &Extract,
    versions: &BTreeMap<String, u64>,
) -> Result<Vec<&'static str>> {
    let cubes: Vec<&'static str> = CUBES.iter().copied().filter(|c| readable(ctx, c)).collect();
    if cubes.is_empty() {
        return Err(Error::Usage(format!(
            "extract '{}': the executive pack reads the cubes ({}), and none can be read: {}",
            x.name,
            CUBES.join(", "),
            CUBES
                .iter()
                .map(|c| why_not(x, versions, c))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Ok(cubes)
}

/// The as-of dates the cubes hold, oldest first.
async fn cube_dates(ctx: &SessionContext, cubes: &[&str]) -> Result<Vec<NaiveDate>> {
    let dates_sql = cubes
        .iter()
        .map(|c| format!("select distinct as_of from {c}"))
        .collect::<Vec<_>>()
        .join(" union ");
    let dates = collect(
        ctx,
        &format!("select as_of from ({dates_sql}) order by as_of"),
    )
    .await?;
    Ok(cells(dates.column(0))
        .into_iter()
        .filter_map(|c| match c {
            Cell::Date(d) => Some(d),
            _ => None,
        })
        .collect())
}

/// The as-of date asked for (by the caller, else by the extract), which the cubes must hold;
/// the newest they hold when none is asked for.
fn pick_as_of(x: &Extract, dates: &[NaiveDate], as_of: Option<NaiveDate>) -> Result<NaiveDate> {
    match as_of.or(x.as_of) {
        Some(d) if dates.contains(&d) => Ok(d),
        Some(d) => Err(Error::Usage(format!(
            "extract '{}': the cubes hold nothing as of {d} (they are as of: {}); build \
             them with `kbcrm cubes --as-of {d}` or pick one of those dates",
            x.name,
            if dates.is_empty() {
                "none".into()
            } else {
                dates
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))),
        None => dates.last().copied().ok_or_else(|| {
            Error::Usage(format!(
                "extract '{}': the cubes have no rows{}; run the cubes pipeline first",
                x.name,
                x.role
                    .as_ref()
                    .map(|r| format!(" that role '{r}' may see"))
                    .unwrap_or_default()
            ))
        }),
    }
}

/// Adds each section whose tables the recipient may read, with those tables' versions; the
/// others are noted as left out, with why.
async fn add_sections(
    ctx: &SessionContext,
    x: &Extract,
    versions: &BTreeMap<String, u64>,
    sections: Vec<Section>,
    pack: &mut Pack,
) -> Result<()> {
    for (name, title, needs, sql) in sections {
        if let Some(t) = needs.iter().find(|t| !readable(ctx, t)) {
            pack.omitted
                .push((title.to_string(), why_not(x, versions, t)));
            continue;
        }
        let batch = collect(ctx, &sql).await.map_err(|e| {
            Error::Usage(format!(
                "extract '{}': the section '{name}' failed over the warehouse's tables ({e}); \
                 do {} have the cubes pipeline's columns?",
                x.name,
                needs.join(" and ")
            ))
        })?;
        for t in needs {
            if let Some(v) = versions.get(t) {
                pack.versions.insert(t.to_string(), *v);
            }
        }
        pack.tables.push(PackTable {
            name: name.into(),
            title: title.into(),
            batch,
        });
    }
    Ok(())
}

/// Adds a table for each of the extract's own queries.
async fn add_queries(ctx: &SessionContext, x: &Extract, pack: &mut Pack) -> Result<()> {
    for (name, sql) in &x.queries {
        let batch = collect(ctx, sql).await.map_err(|e| {
            Error::Usage(format!(
                "kbcrm.yaml: extracts.{}.queries.{name}: {e}",
                x.name
            ))
        })?;
        pack.tables.push(PackTable {
            name: name.clone(),
            title: name.replace('_', " "),
            batch,
        });
    }
    Ok(())
}

/// Run a read-only query and return its rows as one batch.
async fn collect(ctx: &SessionContext, sql: &str) -> Result<RecordBatch> {
    let df = ctx
        .sql_with_options(sql, crate::warehouse::query::read_only())
        .await
        .map_err(|e| Error::Usage(e.strip_backtrace()))?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df
        .collect()
        .await
        .map_err(|e| Error::Usage(e.strip_backtrace()))?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}

/// The headline figures as of `as_of` and `previous`.
async fn headline(
    ctx: &SessionContext,
    cubes: &[&str],
    as_of: NaiveDate,
    previous: Option<NaiveDate>,
) -> Result<Vec<Figure>> {
    let dates = match previous {
        Some(p) => format!("date '{as_of}', date '{p}'"),
        None => format!("date '{as_of}'"),
    };
    // (cube, label, kind, higher is better, aggregate)
    let wanted: &[(&str, &str, FigureKind, bool, &str)] = &[
        (
            "cube_loyalty",
            "Customers",
            FigureKind::Count,
            true,
            "count(*)",
        ),
        (
            "cube_purchasing_power",
            "Revenue, last 12 months",
            FigureKind::Money,
            true,
            "sum(cast(spend_12m as double))",
        ),
        (
            "cube_purchasing_power",
            "Predicted spend, next 12 months",
            FigureKind::Money,
            true,
            "sum(predicted_spend)",
        ),
        (
            "cube_churn_warning",
            "Revenue at risk",
            FigureKind::Money,
            false,
            "sum(revenue_at_risk)",
        ),
        (
            "cube_churn_warning",
            "Red warnings",
            FigureKind::Count,
            false,
            "sum(case when warning_level = 'red' then 1 else 0 end)",
        ),
        (
            "cube_churn_warning",
            "Amber warnings",
            FigureKind::Count,
            false,
            "sum(case when warning_level = 'amber' then 1 else 0 end)",
        ),
        (
            "cube_loyalty",
            "Champions' share of revenue",
            FigureKind::Share,
            true,
            "sum(case when tier = 'champion' then cast(monetary as double) else 0 end) \
             / nullif(sum(cast(monetary as double)), 0)",
        ),
    ];
    let mut out = Vec::new();
    for (cube, label, kind, better, agg) in wanted {
        let mut f = Figure {
            label: label.to_string(),
            kind: *kind,
            value: None,
            previous: None,
            higher_is_better: *better,
        };
        if cubes.contains(cube) {
            let b = collect(
                ctx,
                &format!(
                    "select as_of, cast({agg} as double) from {cube} \
                     where as_of in ({dates}) group by as_of"
                ),
            )
            .await?;
            let (ds, vs) = (cells(b.column(0)), cells(b.column(1)));
            for (d, v) in ds.iter().zip(vs) {
                let v = match v {
                    Cell::Number(n) => Some(n),
                    _ => None,
                };
                match d {
                    Cell::Date(d) if *d == as_of => f.value = v,
                    Cell::Date(d) if Some(*d) == previous => f.previous = v,
                    _ => {}
                }
            }
        }
        out.push(f);
    }
    Ok(out)
}

fn headline_table(pack: &Pack) -> PackTable {
    let h = &pack.headline;
    let num = |f: &dyn Fn(&Figure) -> Option<f64>| -> ArrayRef {
        Arc::new(h.iter().map(f).collect::<Float64Array>())
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("figure", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("previous", DataType::Float64, true),
        Field::new("change", DataType::Float64, true),
        Field::new("change_ratio", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(h.iter().map(|f| &f.label))),
            num(&|f| f.value),
            num(&|f| f.previous),
            num(&|f| f.change()),
            num(&|f| f.change_ratio()),
        ],
    )
    .expect("columns match the schema");
    PackTable {
        name: "headline".into(),
        title: "Headline figures".into(),
        batch,
    }
}

fn notes_table(pack: &Pack) -> PackTable {
    let mut rows: Vec<(String, String)> = vec![
        ("Title".into(), pack.title.clone()),
        ("As of".into(), pack.as_of.to_string()),
        (
            "Compared with".into(),
            pack.previous
                .map(|p| p.to_string())
                .unwrap_or_else(|| "nothing: the cubes hold no earlier as-of date".into()),
        ),
        (
            "Recipient role".into(),
            pack.role
                .clone()
                .unwrap_or_else(|| "none: every table, personal data masked".into()),
        ),
    ];
    for (section, why) in &pack.omitted {
        rows.push((format!("Left out: {section}"), why.clone()));
    }
    for (t, v) in &pack.versions {
        rows.push((format!("Table version: {t}"), v.to_string()));
    }
    let tests = &pack.tests;
    match &tests.run_id {
        None => rows.push(("Data tests".into(), "no run recorded".into())),
        Some(run) => {
            let failed: Vec<_> = tests.results.iter().filter(|r| !r.3).collect();
            rows.push((
                "Data tests".into(),
                format!(
                    "run {run}: {} of {} passed",
                    tests.results.len() - failed.len(),
                    tests.results.len()
                ),
            ));
            for (test, severity, n, _) in failed {
                rows.push((
                    format!("Failed test ({severity})"),
                    format!("{test}: {n} rows"),
                ));
            }
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("item", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1))),
        ],
    )
    .expect("columns match the schema");
    PackTable {
        name: "notes".into(),
        title: "Notes: where these figures come from".into(),
        batch,
    }
}

#[cfg(test)]
mod tests;
