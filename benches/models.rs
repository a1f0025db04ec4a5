//! Fitting speed of the BG/NBD and Gamma-Gamma models on simulated customers.
//!
//! ```sh
//! cargo bench --bench models                       # 1,000,000 customers
//! KBCRM_BENCH_CUSTOMERS=100000 cargo bench --bench models
//! ```

use std::time::Instant;

use kbcrm::stats::bgnbd::{BgNbd, Rft};
use kbcrm::stats::gamma_gamma::{GammaGamma, Spend};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution, Gamma};

/// Customers drawn from the BG/NBD process with known parameters, observed for 39 weeks, with
/// Gamma-Gamma spend.
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

fn main() {
    let n: usize = std::env::var("KBCRM_BENCH_CUSTOMERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let truth = BgNbd {
        r: 0.243,
        alpha: 4.414,
        a: 0.793,
        b: 2.426,
    };
    let gg = GammaGamma {
        p: 6.25,
        q: 3.74,
        gamma: 15.44,
    };
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let started = Instant::now();
    let (rft, spend) = simulate(n, &truth, &gg);
    println!(
        "simulated {n} customers in {:.2} s ({cores} cores)",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let fit = BgNbd::fit(&rft).expect("BG/NBD fit");
    println!(
        "BG/NBD fit        {:>7.2} s  r {:.3} alpha {:.3} a {:.3} b {:.3} (true 0.243 4.414 0.793 2.426)",
        started.elapsed().as_secs_f64(),
        fit.params.r,
        fit.params.alpha,
        fit.params.a,
        fit.params.b
    );
    let started = Instant::now();
    let fit = GammaGamma::fit(&spend).expect("Gamma-Gamma fit");
    println!(
        "Gamma-Gamma fit   {:>7.2} s  p {:.3} q {:.3} gamma {:.3} on {} repeat customers (true 6.25 3.74 15.44)",
        started.elapsed().as_secs_f64(),
        fit.params.p,
        fit.params.q,
        fit.params.gamma,
        fit.customers
    );
}
