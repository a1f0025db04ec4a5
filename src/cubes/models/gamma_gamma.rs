//! The Gamma-Gamma model of spend per transaction (Fader, Hardie & Lee 2005, "RFM and CLV:
//! using iso-value curves for customer base analysis"): a customer's transactions vary around
//! their mean spend ν ~ Gamma(q, γ); each transaction ~ Gamma(p, ν).

use statrs::function::gamma::{digamma, ln_gamma};

use super::fit::{Objective, minimize, parallel_sum, to_objective};

/// Fitted Gamma-Gamma parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaGamma {
    /// Shape of the spend of one transaction.
    pub p: f64,
    /// Shape of the customers' mean spend.
    pub q: f64,
    /// Scale of the customers' mean spend.
    pub gamma: f64,
}

/// A customer's repeat transactions and their mean value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spend {
    /// Repeat transactions (at least 1).
    pub x: f64,
    /// Mean value of those transactions (above 0).
    pub m: f64,
}

/// A fit and its log-likelihood.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaGammaFit {
    /// Parameters.
    pub params: GammaGamma,
    /// Total log-likelihood.
    pub log_likelihood: f64,
    /// Customers fitted.
    pub customers: usize,
}

impl GammaGamma {
    /// The terms that depend on x only: lnΓ(px+q) − lnΓ(px) − lnΓ(q) and the digamma
    /// differences of the gradient.
    fn x_terms(&self, x: f64) -> [f64; 3] {
        let (px, q) = (self.p * x, self.q);
        let dg = digamma(px + q);
        [
            ln_gamma(px + q) - ln_gamma(px) - ln_gamma(q),
            dg - digamma(px),
            dg - digamma(q),
        ]
    }

    /// Per-x terms for every whole x up to `max_x` (repeat counts are whole numbers).
    fn x_table(&self, max_x: usize) -> Vec<[f64; 3]> {
        (0..=max_x).map(|x| self.x_terms(x as f64)).collect()
    }

    fn ll_grad(&self, s: &Spend, table: &[[f64; 3]]) -> (f64, [f64; 3]) {
        let GammaGamma { p, q, gamma } = *self;
        let (x, m) = (s.x, s.m);
        let t = match table.get(x as usize) {
            Some(t) if x.fract() == 0.0 => *t,
            _ => self.x_terms(x),
        };
        let px = p * x;
        let ln_gm = (gamma + m * x).ln();
        let ll = t[0] + q * gamma.ln() + (px - 1.0) * m.ln() + px * x.ln() - (px + q) * ln_gm;
        let g = [
            x * (t[1] + m.ln() + x.ln() - ln_gm),
            t[2] + gamma.ln() - ln_gm,
            q / gamma - (px + q) / (gamma + m * x),
        ];
        (ll, g)
    }

    /// Total log-likelihood.
    pub fn log_likelihood(&self, data: &[Spend]) -> f64 {
        let table = self.x_table(max_x(data));
        data.iter().map(|s| self.ll_grad(s, &table).0).sum()
    }

    /// Expected mean transaction value of a customer with `x` repeat transactions of mean `m`.
    pub fn expected_spend(&self, s: &Spend) -> f64 {
        let GammaGamma { p, q, gamma } = *self;
        if s.x <= 0.0 || q <= 1.0 {
            return if q > 1.0 { p * gamma / (q - 1.0) } else { s.m };
        }
        let w = p * s.x / (p * s.x + q - 1.0);
        (1.0 - w) * (p * gamma / (q - 1.0)) + w * s.m
    }

    /// Fit by maximum likelihood; customers need x ≥ 1 and m > 0 (others are ignored).
    pub fn fit(data: &[Spend]) -> Option<GammaGammaFit> {
        let data: Vec<Spend> = data
            .iter()
            .copied()
            .filter(|s| s.x >= 1.0 && s.m > 0.0)
            .collect();
        if data.is_empty() {
            return None;
        }
        let mean_m = data.iter().map(|s| s.m).sum::<f64>() / data.len() as f64;
        let objective = GgObjective {
            data: &data,
            max_x: max_x(&data),
        };
        let starts = [
            [0.0, 0.0, mean_m.ln()],
            [(5.0f64).ln(), (3.0f64).ln(), (mean_m * 0.5).ln()],
        ];
        let best = starts
            .iter()
            .filter_map(|s| minimize(&objective, s.to_vec()))
            .min_by(|x, y| x.1.total_cmp(&y.1))?;
        let params = GammaGamma {
            p: best.0[0].exp(),
            q: best.0[1].exp(),
            gamma: best.0[2].exp(),
        };
        Some(GammaGammaFit {
            params,
            log_likelihood: params.log_likelihood(&data),
            customers: data.len(),
        })
    }
}

struct GgObjective<'a> {
    data: &'a [Spend],
    max_x: usize,
}

/// Largest whole repeat count, capped so the per-x table stays small.
fn max_x(data: &[Spend]) -> usize {
    data.iter()
        .map(|s| s.x as usize)
        .max()
        .unwrap_or(0)
        .min(100_000)
}

impl Objective for GgObjective<'_> {
    fn value_grad(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let m = GammaGamma {
            p: theta[0].exp(),
            q: theta[1].exp(),
            gamma: theta[2].exp(),
        };
        let table = m.x_table(self.max_x);
        let (ll, g) = parallel_sum(self.data, |c| m.ll_grad(c, &table));
        to_objective(ll, g, [m.p, m.q, m.gamma], self.data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let data = vec![
            Spend { x: 1.0, m: 20.0 },
            Spend { x: 4.0, m: 35.5 },
            Spend { x: 2.0, m: 12.0 },
        ];
        let obj = GgObjective {
            data: &data,
            max_x: 4,
        };
        let theta = [(6.0f64).ln(), (3.7f64).ln(), (15.0f64).ln()];
        let (_, g) = obj.value_grad(&theta);
        for k in 0..3 {
            let h = 1e-6;
            let (mut up, mut dn) = (theta, theta);
            up[k] += h;
            dn[k] -= h;
            let numeric = (obj.value_grad(&up).0 - obj.value_grad(&dn).0) / (2.0 * h);
            assert!((numeric - g[k]).abs() < 1e-6, "{k}: {numeric} vs {}", g[k]);
        }
    }

    #[test]
    fn expected_spend_shrinks_towards_the_population_mean() {
        let m = GammaGamma {
            p: 6.25,
            q: 3.74,
            gamma: 15.44,
        };
        let population = m.p * m.gamma / (m.q - 1.0);
        let few = m.expected_spend(&Spend { x: 1.0, m: 100.0 });
        let many = m.expected_spend(&Spend { x: 20.0, m: 100.0 });
        assert!(
            few < many && many < 100.0 && few > population,
            "{population} {few} {many}"
        );
    }
}
