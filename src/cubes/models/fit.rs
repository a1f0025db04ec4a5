//! Maximum-likelihood fitting: L-BFGS (argmin) on a negative mean log-likelihood over
//! log-parameters, so every parameter stays positive.

use argmin::core::{CostFunction, Error as ArgminError, Executor, Gradient, State};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;

/// A function to minimise with its gradient.
pub trait Objective: Sync {
    /// Value and gradient at `theta`.
    fn value_grad(&self, theta: &[f64]) -> (f64, Vec<f64>);
}

struct Problem<'a, O>(&'a O);

impl<O: Objective> CostFunction for Problem<'_, O> {
    type Param = Vec<f64>;
    type Output = f64;

    fn cost(&self, p: &Vec<f64>) -> Result<f64, ArgminError> {
        let v = self.0.value_grad(p).0;
        Ok(if v.is_finite() { v } else { f64::MAX / 4.0 })
    }
}

impl<O: Objective> Gradient for Problem<'_, O> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;

    fn gradient(&self, p: &Vec<f64>) -> Result<Vec<f64>, ArgminError> {
        let g = self.0.value_grad(p).1;
        Ok(g.into_iter()
            .map(|x| if x.is_finite() { x } else { 0.0 })
            .collect())
    }
}

/// Minimise from `start`; the best parameters and value, or `None` when the solver fails.
pub fn minimize<O: Objective>(objective: &O, start: Vec<f64>) -> Option<(Vec<f64>, f64)> {
    let linesearch = MoreThuenteLineSearch::new().with_c(1e-4, 0.9).ok()?;
    let solver = LBFGS::new(linesearch, 7)
        .with_tolerance_grad(1e-9)
        .ok()?
        .with_tolerance_cost(1e-14)
        .ok()?;
    let result = Executor::new(Problem(objective), solver)
        .configure(|s| s.param(start).max_iters(1000))
        .run()
        .ok()?;
    let state = result.state();
    let best = state.get_best_param()?.clone();
    let cost = state.get_best_cost();
    (cost.is_finite() && best.iter().all(|x| x.is_finite())).then_some((best, cost))
}

/// Sum a per-item log-likelihood and gradient over `data`, one chunk per core.
pub fn parallel_sum<T: Sync, const N: usize>(
    data: &[T],
    f: impl Fn(&T) -> (f64, [f64; N]) + Sync,
) -> (f64, [f64; N]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = data.len().div_ceil(cores).max(1024);
    let parts: Vec<(f64, [f64; N])> = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks(size)
            .map(|chunk| {
                let f = &f;
                s.spawn(move || {
                    let mut total = (0.0, [0.0; N]);
                    for item in chunk {
                        let (l, g) = f(item);
                        add_into(&mut total, l, &g);
                    }
                    total
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic in a likelihood"))
            .collect()
    });
    parts.into_iter().fold((0.0, [0.0; N]), |mut acc, (l, g)| {
        add_into(&mut acc, l, &g);
        acc
    })
}

fn add_into<const N: usize>(total: &mut (f64, [f64; N]), l: f64, g: &[f64; N]) {
    total.0 += l;
    for (t, x) in total.1.iter_mut().zip(g) {
        *t += x;
    }
}

/// Turn a total log-likelihood and its gradient in the parameters into the negative mean and
/// its gradient in log-parameters (what [`minimize`] works on).
pub fn to_objective<const N: usize>(
    ll: f64,
    grad: [f64; N],
    params: [f64; N],
    n: usize,
) -> (f64, Vec<f64>) {
    let n = n as f64;
    (-ll / n, (0..N).map(|k| -grad[k] * params[k] / n).collect())
}
