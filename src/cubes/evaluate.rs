//! `kbcrm cubes evaluate --holdout 90d`: how good are the predictions and the churn warning on
//! the user's own data? The cubes are built as of (last date − holdout) and scored on what
//! happened in the holdout: predicted against actual purchases per customer, and the ROC AUC,
//! precision and recall of the red and amber warnings against customers who in fact bought
//! nothing in the holdout.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::NaiveDate;

use crate::error::{Error, Result};
use crate::plan::{Project, Write};
use crate::warehouse::state::stage_batch;
use crate::warehouse::{Warehouse, commit_run};

/// The pipeline that builds the cubes.
pub const CUBES_PIPELINE: &str = "cubes";
/// The table the scores go to.
pub const EVALUATION_TABLE: &str = "model_evaluation";

/// One evaluation.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The cubes' as-of date (last date − holdout).
    pub as_of: NaiveDate,
    /// Holdout length in days.
    pub holdout_days: i64,
    /// (metric, value), in report order.
    pub metrics: Vec<(&'static str, f64)>,
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cubes as of {} scored on the {} days after it",
            self.as_of, self.holdout_days
        )?;
        for (m, v) in &self.metrics {
            writeln!(f, "  {m:<34} {v:>12.4}")?;
        }
        Ok(())
    }
}

/// Parse "90d", "12w" or "90".
pub fn parse_days(s: &str) -> Result<i64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('d') => (&t[..t.len() - 1], 1),
        Some('w') => (&t[..t.len() - 1], 7),
        _ => (t, 1),
    };
    num.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .map(|n| n * mult)
        .ok_or_else(|| {
            Error::Usage(format!(
                "'{s}' is not a number of days; write e.g. 90d or 12w"
            ))
        })
}

const METRICS_SQL: &str = "
with params as (select * from model_params where as_of = date 'AS_OF'),
rfm as (select * from cube_customer_rfm where as_of = date 'AS_OF'),
warn as (select customer_id, risk_score, warning_level from cube_churn_warning where as_of = date 'AS_OF'),
actual as (
    select customer_id, count(distinct cast(order_ts as date)) as purchases
    from fact_sales
    where status = 'completed'
      and cast(order_ts as date) > date 'AS_OF'
      and cast(order_ts as date) <= date 'AS_OF' + interval 'HOLDOUT days'
    group by customer_id
),
scored as (
    select
        r.customer_id,
        bgnbd_expected_purchases(r.frequency, r.recency_t, r.age_t, HOLDOUT / p.time_unit_days,
                                 p.bg_r, p.bg_alpha, p.bg_a, p.bg_b) as predicted,
        cast(coalesce(a.purchases, 0) as double) as actual,
        w.risk_score,
        w.warning_level in ('red', 'amber') as flagged,
        coalesce(a.purchases, 0) = 0 as churned
    from rfm r
    cross join params p
    join warn w on r.customer_id = w.customer_id
    left join actual a on r.customer_id = a.customer_id
),
ranked as (
    select *,
        rank() over (order by risk_score) + (count(*) over (partition by risk_score) - 1) / 2.0 as avg_rank
    from scored
),
counts as (
    select
        count(*) as n,
        sum(case when churned then 1 else 0 end) as pos,
        sum(case when churned then avg_rank else 0 end) as pos_rank_sum,
        sum(case when flagged and churned then 1 else 0 end) as tp,
        sum(case when flagged then 1 else 0 end) as flagged,
        sum(predicted) as predicted_total,
        sum(actual) as actual_total,
        avg(abs(predicted - actual)) as mae,
        corr(predicted, actual) as correlation
    from ranked
)
select
    cast(n as double) as customers,
    correlation as purchases_correlation,
    predicted_total as purchases_predicted_total,
    actual_total as purchases_actual_total,
    (predicted_total - actual_total) / nullif(actual_total, 0) as purchases_total_error,
    mae as purchases_mean_abs_error,
    (pos_rank_sum - pos * (pos + 1) / 2.0) / nullif(cast(pos as double) * (n - pos), 0) as churn_roc_auc,
    cast(tp as double) / nullif(flagged, 0) as churn_precision_red_amber,
    cast(tp as double) / nullif(pos, 0) as churn_recall_red_amber,
    cast(flagged - tp as double) / nullif(n - pos, 0) as churn_false_flag_rate
from counts
";

const METRIC_NAMES: &[&str] = &[
    "customers",
    "purchases_correlation",
    "purchases_predicted_total",
    "purchases_actual_total",
    "purchases_total_error",
    "purchases_mean_abs_error",
    "churn_roc_auc",
    "churn_precision_red_amber",
    "churn_recall_red_amber",
    "churn_false_flag_rate",
];

/// The date the cubes are built as of for an evaluation: the last completed purchase minus the
/// holdout. The caller builds the cubes as of it (a run of [`CUBES_PIPELINE`]), then [`score`]s
/// them.
pub async fn calibration_end(project: &Project, holdout_days: i64) -> Result<NaiveDate> {
    if project.pipeline(CUBES_PIPELINE).is_none() {
        return Err(Error::Usage(format!(
            "the project has no '{CUBES_PIPELINE}' pipeline to evaluate"
        )));
    }
    let last = last_purchase_date(project).await?;
    Ok(last - chrono::Duration::days(holdout_days))
}

/// Score the cubes built as of `as_of` on the `holdout_days` after it, and record the scores in
/// [`EVALUATION_TABLE`].
pub async fn score(project: &Project, as_of: NaiveDate, holdout_days: i64) -> Result<Evaluation> {
    let ctx = crate::warehouse::query::session(project).await?;
    let sql = METRICS_SQL
        .replace("AS_OF", &as_of.to_string())
        .replace("HOLDOUT", &holdout_days.to_string());
    let batches = ctx.sql(&sql).await?.collect().await?;
    let batch = batches
        .first()
        .ok_or_else(|| Error::Internal("evaluation returned no row".into()))?;
    let batch = crate::warehouse::delta_compatible_batch(batch)?;
    let mut metrics = Vec::new();
    for (i, name) in METRIC_NAMES.iter().enumerate() {
        let col = arrow::compute::cast(batch.column(i), &DataType::Float64)?;
        let col = col.as_any().downcast_ref::<Float64Array>();
        let v = col
            .filter(|c| c.is_valid(0))
            .map_or(f64::NAN, |c| c.value(0));
        metrics.push((*name, v));
    }
    let evaluation = Evaluation {
        as_of,
        holdout_days,
        metrics,
    };
    record(project, &ctx, &evaluation).await?;
    Ok(evaluation)
}

async fn last_purchase_date(project: &Project) -> Result<NaiveDate> {
    let batches = crate::warehouse::query::query(
        project,
        "select cast(max(order_ts) as date) from fact_sales where status = 'completed'",
    )
    .await?;
    batches
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Date32Array>())
        .and_then(|a| a.is_valid(0).then(|| a.value(0)))
        .and_then(crate::engine::date_of_epoch_day)
        .ok_or_else(|| {
            Error::Usage("fact_sales holds no completed order; run the pipelines first".into())
        })
}

async fn record(
    project: &Project,
    ctx: &datafusion::prelude::SessionContext,
    e: &Evaluation,
) -> Result<()> {
    let n = e.metrics.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new("as_of", DataType::Date32, false),
        Field::new("holdout_days", DataType::Int64, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
    ]));
    let days = crate::engine::epoch_days(e.as_of);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from(vec![days; n])),
        Arc::new(Int64Array::from(vec![e.holdout_days; n])),
        Arc::new(StringArray::from_iter_values(
            e.metrics.iter().map(|(m, _)| *m),
        )),
        Arc::new(Float64Array::from_iter(
            e.metrics.iter().map(|(_, v)| v.is_finite().then_some(*v)),
        )),
    ];
    let batch = RecordBatch::try_new(schema, columns)?;
    let wh = Warehouse::open(&project.warehouse)?;
    let keys = ["as_of", "holdout_days", "metric"]
        .map(String::from)
        .to_vec();
    let staged = stage_batch(&wh, ctx, EVALUATION_TABLE, batch, &Write::Merge { keys }).await?;
    let run_id = uuid::Uuid::now_v7().to_string();
    commit_run(&wh, &run_id, "cubes-evaluate", &[staged]).await?;
    Ok(())
}
