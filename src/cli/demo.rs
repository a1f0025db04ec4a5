//! `kbcrm demo`: sample data, every pipeline, and a first look at the result.

use std::time::Instant;

use crate::cli::{Cli, OutputFormat};
use crate::error::Result;
use crate::generate::{GenerateOptions, generate};
use crate::run::{Progress, RunOptions, Runner};

/// Example questions the demo answers, with their SQL.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "Revenue by region and year (completed orders, customer region at the time of the order)",
        "select c.region, extract(year from f.order_ts) as year, count(distinct f.order_id) as orders, \
         round(sum(f.net_amount), 2) as revenue, round(sum(f.margin_amount), 2) as margin \
         from fact_sales f join dim_customer c on f.customer_key = c.customer_key \
         where f.status = 'completed' group by 1, 2 order by 1, 2 limit 15",
    ),
    (
        "Churn warnings: red customers with the most revenue at risk, why, and who owns them",
        "select customer_id, round(risk_score, 2) as risk, round(revenue_at_risk, 0) as revenue_at_risk, \
         reasons, account_owner from cube_churn_warning \
         where as_of = (select max(as_of) from cube_churn_warning) and warning_level = 'red' \
         order by revenue_at_risk desc limit 6",
    ),
    (
        "Relationship structure: customers and revenue per loyalty tier",
        "select tier, customers, round(customer_share * 100, 1) as customers_pct, \
         round(revenue_share * 100, 1) as revenue_pct, round(customer_share_for_80pct * 100, 1) as pct_of_customers_for_80pct_revenue \
         from cube_loyalty_structure where as_of = (select max(as_of) from cube_loyalty_structure) order by tier_order",
    ),
    (
        "One customer across systems: how many customers each combination of systems knows",
        "select sources, count(*) as customers, round(avg(record_count), 2) as records_per_customer \
         from dim_customer where is_current group by sources order by customers desc",
    ),
];

/// Generate the sample data (when `sources/` is absent), run every pipeline, answer examples.
pub async fn demo(cli: &Cli, scale: f64, seed: u64) -> Result<()> {
    let started = Instant::now();
    let project = crate::cli::load_project(cli)?;
    let sources = project.root.join("sources");
    let progress = Progress::auto(cli.quiet);
    if !sources.join("sales").is_dir() {
        eprintln!(
            "generating sample data (scale {scale}, seed {seed}) into {}",
            sources.display()
        );
        let summary = generate(&GenerateOptions {
            scale,
            seed,
            out: sources.clone(),
            batch: 1,
        })?;
        eprintln!("{summary}");
    } else {
        eprintln!("using the sample data in {}", sources.display());
    }
    crate::run::validate::check_models(&project).await?;
    // The sample data's history ends on this day; the cubes look at the customers as of then,
    // and as of a quarter before, so the executive pack shows how the figures moved.
    let end = crate::generate::history_end();
    let quarter_before = end
        .checked_sub_months(chrono::Months::new(3))
        .unwrap_or(end);
    let mut dates = vec![end];
    if !has_cubes_as_of(&project, quarter_before).await {
        dates.insert(0, quarter_before);
    }
    let mut reports = Vec::new();
    for as_of in dates {
        let options = RunOptions {
            as_of: Some(as_of),
            trigger: Some("demo".into()),
            ..RunOptions::default()
        };
        let runner = Runner::new(&project, options, progress.clone()).await?;
        reports.extend(runner.run(&[]).await?);
    }
    crate::cli::print_run_summary(&reports)?;
    for (title, sql) in EXAMPLES {
        println!("\n-- {title}\n{sql};");
        let batches = crate::warehouse::query::query(&project, sql).await?;
        crate::cli::print_batches(&batches, OutputFormat::Table)?;
    }
    println!("\n-- The executive pack (kbcrm extract)");
    let options = crate::extract::ExtractOptions {
        out: project.root.join("extracts"),
        as_of: None,
        deliver: false,
        trigger: "demo".into(),
    };
    let extracts = crate::extract::extract(&project, None, &options).await?;
    crate::cli::print_extract_summary(&extracts)?;
    println!(
        "\ndemo finished in {:.1}s. Next: open extracts/executive/*.html or the workbook; \
         kbcrm tables, kbcrm runs, kbcrm lineage, kbcrm rejects --summary, \
         kbcrm query \"select * from dim_customer where is_current limit 5\"",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether the warehouse's churn cube already holds rows as of `date` (a later demo does not
/// build them again).
async fn has_cubes_as_of(project: &crate::plan::Project, date: chrono::NaiveDate) -> bool {
    let sql = format!("select count(*) from cube_churn_warning where as_of = date '{date}'");
    match crate::warehouse::query::query(project, &sql).await {
        Ok(batches) => batches.iter().any(|b| {
            b.num_rows() > 0
                && arrow::array::cast::AsArray::as_primitive::<arrow::datatypes::Int64Type>(
                    b.column(0),
                )
                .value(0)
                    > 0
        }),
        Err(_) => false,
    }
}
