//! The statistical models reproduce the published fits on the CDNOW sample (Fader, Hardie & Lee
//! 2005), loaded and fitted through a kbcrm pipeline.
//!
//! The data set ships in the PyPI package `lifetimes` (`lifetimes/datasets/CDNOW_sample.txt`);
//! `.ci/run` puts it at `target/test-data/CDNOW_sample.txt` (or set `KBCRM_CDNOW_SAMPLE`).

use std::path::PathBuf;

use crate::support::Project;

fn cdnow_sample() -> Option<PathBuf> {
    let path = std::env::var_os("KBCRM_CDNOW_SAMPLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::support::repo().join("target/test-data/CDNOW_sample.txt"));
    if path.is_file() {
        return Some(path);
    }
    let msg = format!(
        "CDNOW sample not found at {}; run .ci/run (it downloads it from PyPI's `lifetimes`) or set KBCRM_CDNOW_SAMPLE",
        path.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    None
}

const PIPELINE: &str = "\
sources:
  tx:
    format: csv
    location: data/cdnow.csv
    schema:
      customer_id: { type: string, required: true }
      customer_index: int
      tx_date: { type: date, format: \"%Y%m%d\", required: true }
      cds: int
      amount: \"decimal(10,2)\"
models:
  - sql/cdnow_rfm.sql
  - sql/cdnow_fit.sql
";

/// Per customer: repeat purchase days, recency and age in weeks at the end of the 39-week
/// calibration period (1997-09-30), and the mean value of the repeat purchases.
const RFM: &str = "\
with days as (
    select customer_id, tx_date, sum(amount) as amount
    from raw_cdnow_tx
    where tx_date <= date '1997-09-30'
    group by customer_id, tx_date
),

ranked as (
    select *, row_number() over (partition by customer_id order by tx_date) as n from days
),

final as (
    select
        customer_id,
        count(*) - 1 as x,
        cast(cast(max(tx_date) as int) - cast(min(tx_date) as int) as double) / 7 as t_x,
        cast(cast(date '1997-09-30' as int) - cast(min(tx_date) as int) as double) / 7 as t,
        avg(case when n > 1 then cast(amount as double) end) as m
    from ranked
    group by customer_id
)

select * from final
";

const FIT: &str = "\
with bg as (select bgnbd_fit(x, t_x, t) as f from cdnow_rfm),
gg as (select gg_fit(x, m) as f from cdnow_rfm where x > 0)
select
    bg.f['r'] as r, bg.f['alpha'] as alpha, bg.f['a'] as a, bg.f['b'] as b,
    bg.f['log_likelihood'] as bg_ll, bg.f['customers'] as bg_customers,
    gg.f['p'] as p, gg.f['q'] as q, gg.f['gamma'] as gamma, gg.f['customers'] as gg_customers
from bg cross join gg
";

#[test]
fn cdnow_fits_reproduce_the_papers() {
    let Some(sample) = cdnow_sample() else { return };
    let p = Project::empty();
    let mut csv = String::from("customer_id,customer_index,tx_date,cds,amount\n");
    for line in std::fs::read_to_string(sample).unwrap().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() == 5 {
            csv.push_str(&fields.join(","));
            csv.push('\n');
        }
    }
    p.write("data/cdnow.csv", csv);
    p.write("pipelines/cdnow.yaml", PIPELINE);
    p.write("sql/cdnow_rfm.sql", RFM);
    p.write("sql/cdnow_fit.sql", FIT);
    p.ok(&["run"]);
    let row = &p.query("select * from cdnow_fit")[0];
    eprintln!("cdnow fit: {row:?}");
    let v: Vec<f64> = row.iter().map(|s| s.parse().unwrap()).collect();
    let (r, alpha, a, b, ll, n_bg, pp, q, gamma, n_gg) =
        (v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]);
    assert_eq!(n_bg, 2357.0);
    // BG/NBD: r = 0.243, alpha = 4.414, a = 0.793, b = 2.426, LL = -9582.4 (FHL 2005, table 1).
    for (got, want) in [(r, 0.243), (alpha, 4.414), (a, 0.793), (b, 2.426)] {
        assert!((got - want).abs() < 0.01, "BG/NBD fit {v:?}");
    }
    assert!((ll - -9582.4).abs() < 1.0, "log-likelihood {ll}");
    // Gamma-Gamma on the 946 repeat customers: p = 6.25, q = 3.74, gamma = 15.44.
    assert_eq!(n_gg, 946.0);
    for (got, want) in [(pp, 6.25), (q, 3.74), (gamma, 15.44)] {
        assert!((got - want).abs() < 0.05, "Gamma-Gamma fit {v:?}");
    }
}
