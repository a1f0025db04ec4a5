//! The hot inner pieces, measured with criterion: CSV decoding into the declared columns (with
//! bad rows set aside), identity normalisation, the BG/NBD and Gamma-Gamma likelihoods and fits,
//! and an SCD2 load that changes 1% of 100,000 customers.
//!
//! ```sh
//! cargo bench --bench hot                  # everything, about 4 minutes after the build
//! cargo bench --bench hot -- normalize     # one group: csv_decode, normalize, bgnbd,
//!                                          # gamma_gamma, scd2
//! KBCRM_BENCH_CUSTOMERS=1000000 cargo bench --bench hot -- fit
//! ```
//!
//! The sample sources are generated once per run (scale 0.05: 5,000 customers, about 250,000
//! order lines) into the temporary directory.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures::TryStreamExt;
use kbcrm::config::pipeline::Normalizer;
use kbcrm::cubes::models::bgnbd::{BgNbd, Rft};
use kbcrm::cubes::models::gamma_gamma::{GammaGamma, Spend};
use kbcrm::generate::{GenerateOptions, generate};
use kbcrm::identity::normalize::normalize;
use kbcrm::plan::{Overrides, Project};
use kbcrm::run::{Progress, RunOptions, Runner};
use kbcrm::sources::{self, convert::declared_schema};
use kbcrm::storage::store_for;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, Gamma};

mod support;

/// The repository's project with generated sample sources, made once per run.
fn sample() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = support::project_dir("kbcrm-bench-hot");
        generate(&GenerateOptions {
            scale: 0.05,
            seed: 42,
            out: dir.join("sources"),
            batch: 1,
        })
        .expect("generate");
        dir
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// The sales order-line files, decoded on one core as `kbcrm run` decodes each file.
fn csv_decode(c: &mut Criterion) {
    let project = Project::load(sample(), &Overrides::default()).expect("project loads");
    let source = project
        .pipelines
        .iter()
        .flat_map(|p| &p.sources)
        .find(|s| s.pipeline == "sales" && s.name == "order_lines")
        .expect("the sales pipeline's order_lines source")
        .clone();
    let rt = runtime();
    let location = source.location().expect("a file source");
    let store = store_for(&location.store_url).expect("store");
    let files = rt
        .block_on(sources::list_files(&source, location, &store))
        .expect("files listed")
        .files;
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let schema = declared_schema(&source.columns);
    let mut group = c.benchmark_group("csv_decode");
    group.throughput(Throughput::Bytes(bytes)).sample_size(10);
    group.bench_function("order_lines", |b| {
        b.iter(|| {
            let outputs: Vec<_> = rt
                .block_on(
                    sources::read_text_files(
                        &source,
                        store.clone(),
                        files.clone(),
                        schema.clone(),
                        1,
                    )
                    .try_collect(),
                )
                .expect("decoded");
            black_box(outputs.iter().map(|o| o.rows_read).sum::<u64>())
        })
    });
    group.finish();
}

/// The ERP customers' e-mail, phone, tax id and name columns as the match rules normalise them.
fn normalize_fields(c: &mut Criterion) {
    let dir = sample().join("sources/erp/customers");
    let mut values: [(Normalizer, &str, Vec<String>); 4] = [
        (Normalizer::Email, "email", Vec::new()),
        (Normalizer::Phone, "phone", Vec::new()),
        (Normalizer::TaxId, "tax_id", Vec::new()),
        (Normalizer::Name, "legal_name", Vec::new()),
    ];
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("customer files")
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    for path in paths {
        let mut reader = csv::Reader::from_path(&path).expect("csv");
        let headers = reader.headers().expect("header").clone();
        let at: Vec<Option<usize>> = values
            .iter()
            .map(|(_, name, _)| headers.iter().position(|h| h == *name))
            .collect();
        for record in reader.records().flatten() {
            for ((_, _, out), i) in values.iter_mut().zip(&at) {
                if let Some(v) = i.and_then(|i| record.get(i)) {
                    out.push(v.to_string());
                }
            }
        }
    }
    let mut group = c.benchmark_group("normalize");
    for (how, name, vals) in &values {
        group.throughput(Throughput::Elements(vals.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                vals.iter()
                    .filter_map(|v| normalize(*how, black_box(v), "49"))
                    .count()
            })
        });
    }
    group.finish();
}

/// Customers drawn from the BG/NBD process with known parameters, observed for 27 to 39 weeks,
/// with Gamma-Gamma spend for those who came back.
fn simulate(n: usize, truth: &BgNbd, gg: &GammaGamma) -> (Vec<Rft>, Vec<Spend>) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let lambda = Gamma::new(truth.r, 1.0 / truth.alpha).expect("valid");
    let dropout = Beta::new(truth.a, truth.b).expect("valid");
    let nu = Gamma::new(gg.q, 1.0 / gg.gamma).expect("valid");
    let mut rft = Vec::with_capacity(n);
    let mut spend = Vec::with_capacity(n);
    for _ in 0..n {
        let (l, p) = (lambda.sample(&mut rng), dropout.sample(&mut rng));
        let t_end = rng.random_range(27.0..39.0);
        let (mut t, mut x, mut t_x) = (0.0, 0.0, 0.0);
        loop {
            t += -(1.0 - rng.random::<f64>()).ln() / l;
            if t > t_end {
                break;
            }
            x += 1.0;
            t_x = t;
            if rng.random_bool(p) {
                break;
            }
        }
        rft.push(Rft { x, t_x, t: t_end });
        if x > 0.0 {
            let per = Gamma::new(gg.p * x, 1.0 / (nu.sample(&mut rng) * x)).expect("valid");
            spend.push(Spend {
                x,
                m: per.sample(&mut rng),
            });
        }
    }
    (rft, spend)
}

/// The published parameters: BG/NBD from Fader, Hardie and Lee (2005), Gamma-Gamma from Fader,
/// Hardie and Lee (2005, "RFM and CLV").
const TRUTH: BgNbd = BgNbd {
    r: 0.243,
    alpha: 4.414,
    a: 0.793,
    b: 2.426,
};
const TRUTH_GG: GammaGamma = GammaGamma {
    p: 6.25,
    q: 3.74,
    gamma: 15.44,
};

fn customers() -> usize {
    std::env::var("KBCRM_BENCH_CUSTOMERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

fn models(c: &mut Criterion) {
    let n = customers();
    let (rft, spend) = simulate(n, &TRUTH, &TRUTH_GG);
    let fit = BgNbd::fit(&rft).expect("BG/NBD fit");
    let gg = GammaGamma::fit(&spend).expect("Gamma-Gamma fit");
    println!(
        "{n} simulated customers: BG/NBD r {:.3} alpha {:.3} a {:.3} b {:.3} (true 0.243 4.414 0.793 2.426); \
         Gamma-Gamma p {:.3} q {:.3} gamma {:.3} (true 6.25 3.74 15.44)",
        fit.params.r,
        fit.params.alpha,
        fit.params.a,
        fit.params.b,
        gg.params.p,
        gg.params.q,
        gg.params.gamma
    );

    let mut group = c.benchmark_group("bgnbd");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("log_likelihood", |b| {
        b.iter(|| TRUTH.log_likelihood(black_box(&rft)))
    });
    group.sample_size(10);
    group.bench_function("fit", |b| b.iter(|| BgNbd::fit(black_box(&rft))));
    group.finish();

    let mut group = c.benchmark_group("gamma_gamma");
    group.throughput(Throughput::Elements(spend.len() as u64));
    group.bench_function("log_likelihood", |b| {
        b.iter(|| TRUTH_GG.log_likelihood(black_box(&spend)))
    });
    group.sample_size(10);
    group.bench_function("fit", |b| b.iter(|| GammaGamma::fit(black_box(&spend))));
    group.finish();
}

const SCD2_CUSTOMERS: usize = 100_000;

/// The customers file of day `day`: on day 2 every hundredth customer has a new segment.
fn customers_csv(day: u32) -> String {
    let mut s = String::from("customer_id,name,segment,region,credit_limit,updated_at\n");
    for i in 0..SCD2_CUSTOMERS {
        let changed = day > 1 && i % 100 == 0;
        let segment =
            ["consumer", "small business", "mid-market", "enterprise"][(i + changed as usize) % 4];
        let updated = if changed { "2025-06-02" } else { "2025-01-01" };
        s.push_str(&format!(
            "C{i:07},Customer {i},{segment},{},{}.00,{updated}T00:00:00Z\n",
            ["North", "South", "East", "West"][i % 4],
            1000 * (i % 50)
        ));
    }
    s
}

const SCD2_PIPELINE: &str = "\
name: crm
sources:
  customers:
    format: csv
    location: data/customers.csv
    schema:
      customer_id: { type: string, required: true }
      name: string
      segment: string
      region: string
      credit_limit: decimal(14,2)
      updated_at: timestamp
models:
  - path: sql/dim_customer.sql
    mode: scd2
    keys: [customer_id]
    scd2:
      tracked: [name, segment, region, credit_limit]
      valid_from: updated_at
      surrogate_key: customer_key
";

async fn run_all(dir: &Path) {
    let project = Project::load(dir, &Overrides::default()).expect("project loads");
    Runner::new(&project, RunOptions::default(), Progress::hidden())
        .await
        .expect("runner")
        .run(&[])
        .await
        .expect("run");
}

/// A type-2 dimension of 100,000 customers loaded again with 1% of them changed: the file read,
/// the versions compared, 1,000 closed and 1,000 opened, the commit.
fn scd2(c: &mut Criterion) {
    let base = std::env::temp_dir().join(format!("kbcrm-bench-scd2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    for d in ["pipelines", "sql", "data"] {
        std::fs::create_dir_all(base.join(d)).expect("mkdir");
    }
    let write = |p: &str, text: &str| std::fs::write(base.join(p), text).expect("write");
    write(
        "kbcrm.yaml",
        "name: scd2\nwarehouse: warehouse/\npipelines: pipelines/\nsql: sql/\n",
    );
    write("pipelines/crm.yaml", SCD2_PIPELINE);
    write("sql/dim_customer.sql", "select * from raw_crm_customers\n");
    write("data/customers.csv", &customers_csv(1));
    let rt = runtime();
    rt.block_on(run_all(&base));
    let day2 = customers_csv(2);
    // What is measured: a day-2 load closes and opens 1,000 versions.
    let check = base.with_extension("check");
    support::copy_tree(&base, &check);
    std::fs::write(check.join("data/customers.csv"), &day2).expect("write");
    rt.block_on(run_all(&check));
    let project = Project::load(&check, &Overrides::default()).expect("project loads");
    let batches = rt
        .block_on(kbcrm::warehouse::query::query(
            &project,
            "select count(*) as n, count(*) filter (where is_current) as cur from dim_customer",
        ))
        .expect("query");
    let counts = arrow::util::pretty::pretty_format_batches(&batches)
        .expect("format")
        .to_string();
    assert!(
        counts.contains("| 101000 | 100000 |"),
        "day 2 should add 1,000 versions:\n{counts}"
    );
    let _ = std::fs::remove_dir_all(&check);
    let mut n = 0;
    let mut group = c.benchmark_group("scd2");
    group.sample_size(10);
    group.bench_function("load_1pct_changed_of_100k", |b| {
        b.iter_batched(
            || {
                n += 1;
                let dir = base.with_extension(n.to_string());
                let _ = std::fs::remove_dir_all(&dir);
                support::copy_tree(&base, &dir);
                std::fs::write(dir.join("data/customers.csv"), &day2).expect("write");
                dir
            },
            |dir| {
                rt.block_on(run_all(&dir));
                dir
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    for i in 1..=n {
        let _ = std::fs::remove_dir_all(base.with_extension(i.to_string()));
    }
    let _ = std::fs::remove_dir_all(&base);
}

criterion_group!(benches, csv_decode, normalize_fields, models, scd2);
criterion_main!(benches);
