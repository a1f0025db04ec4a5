//! `kbcrm demo`: sample data, every pipeline, and a first look at the result.

use std::time::Instant;

use crate::cli::{Cli, OutputFormat};
use crate::error::Result;
use crate::generate::{GenerateOptions, generate};
use crate::run::{Progress, RunOptions, Runner};

/// Example questions the demo answers, with their SQL.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "Revenue by channel and year (completed orders)",
        "select c.channel_name, extract(year from o.order_ts) as year, \
         count(distinct o.order_id) as orders, round(sum(l.net_amount), 2) as revenue \
         from stg_sales_order_lines l join stg_sales_orders o on l.order_id = o.order_id \
         join stg_sales_channels c on o.channel_id = c.channel_id \
         where o.status = 'completed' group by 1, 2 order by 1, 2 limit 12",
    ),
    (
        "Complaints and satisfaction by ticket category",
        "select category, count(*) as tickets, sum(case when complaint then 1 else 0 end) as complaints, \
         round(avg(satisfaction), 2) as avg_satisfaction \
         from stg_service_tickets group by category order by tickets desc",
    ),
    (
        "Rows rejected to quarantine, by source and reason",
        "select source, split_part(reason, ' for column', 1) as reason_kind, count(*) as rows \
         from quarantine group by 1, 2 order by 3 desc limit 8",
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
        "\ndemo finished in {:.1}s. Try: kbcrm tables, kbcrm query \"select * from stg_sales_orders limit 5\"",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
