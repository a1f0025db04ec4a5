//! The statistical models behind the cubes: BG/NBD for repeat purchases and churn, Gamma-Gamma
//! for spend, fitted by maximum likelihood.
//!
//! A leaf: imports nothing from kbcrm, so the engine's SQL functions can wrap it.

pub mod bgnbd;
mod fit;
pub mod gamma_gamma;

/// Gauss hypergeometric function ₂F₁(a, b; c; z) for 0 ≤ z < 1, by its power series.
pub fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 0..200_000 {
        let n = n as f64;
        term *= (a + n) * (b + n) / ((c + n) * (n + 1.0)) * z;
        sum += term;
        if term.abs() < 1e-15 * sum.abs() {
            break;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::hyp2f1;

    #[test]
    fn hypergeometric_matches_closed_forms() {
        // 2F1(1, 1; 2; z) = -ln(1 - z) / z
        for z in [0.1, 0.5, 0.9] {
            let exact = -(1.0f64 - z).ln() / z;
            assert!((hyp2f1(1.0, 1.0, 2.0, z) - exact).abs() < 1e-10, "{z}");
        }
        // 2F1(a, b; b; z) = (1 - z)^-a
        assert!((hyp2f1(0.7, 3.0, 3.0, 0.4) - 0.6f64.powf(-0.7)).abs() < 1e-12);
    }
}
