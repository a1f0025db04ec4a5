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
        "Top customers by revenue, with their complaints and open tickets",
        "with revenue as (select customer_id, sum(net_amount) as revenue from fact_sales \
         where status = 'completed' group by customer_id), \
         service as (select customer_id, sum(case when complaint then 1 else 0 end) as complaints, \
         sum(case when is_open then 1 else 0 end) as open_tickets from fact_service_ticket group by customer_id) \
         select d.customer_id, d.customer_name, d.segment, d.region, round(r.revenue, 2) as revenue, \
         coalesce(s.complaints, 0) as complaints, coalesce(s.open_tickets, 0) as open_tickets \
         from revenue r join dim_customer d on d.customer_id = r.customer_id and d.is_current \
         left join service s on s.customer_id = r.customer_id order by revenue desc limit 8",
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
    crate::validate::check_models(&project).await?;
    let runner = Runner::new(&project, RunOptions::default(), progress).await?;
    let reports = runner.run(&[]).await?;
    crate::cli::print_run_summary(&reports)?;
    for (title, sql) in EXAMPLES {
        println!("\n-- {title}\n{sql};");
        let batches = crate::query::query(&project, sql).await?;
        crate::cli::print_batches(&batches, OutputFormat::Table)?;
    }
    println!(
        "\ndemo finished in {:.1}s. Next: kbcrm tables, kbcrm rejects --summary, \
         kbcrm query \"select * from dim_customer where is_current limit 5\"",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
