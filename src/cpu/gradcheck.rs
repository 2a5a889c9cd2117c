//! Finite-difference gradient checks in f64, shared by the op tests.

use crate::model::rng::Rng;

/// Random values in [-1, 1) from a fixed seed: never zeros, so no gradient term can hide.
pub fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| 2.0 * rng.uniform() - 1.0).collect()
}

/// Σ out · weights: a scalar "loss" whose gradient with respect to `out` is `weights`.
pub fn dot(out: &[f64], weights: &[f64]) -> f64 {
    out.iter().zip(weights).map(|(a, b)| a * b).sum()
}

/// Compares an analytic gradient with central differences of `loss` around `x`.
///
/// Tolerance: with h = 1e-5 the truncation error is h²·|f'''|/6 ≈ 1e-10·|f'''| and the rounding
/// error about 1e-16·|loss|/h ≈ 1e-11·|loss|; for these O(1)-scaled ops both stay below 1e-7, so
/// 1e-6 (relative to max(1, |grad|)) has margin, while a wrong or missing term errs by >1e-3.
pub fn check(what: &str, x: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-5;
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let numeric = (up - down) / (2.0 * h);
        let err = (numeric - analytic[i]).abs() / analytic[i].abs().max(1.0);
        assert!(err < 1e-6, "{what}[{i}]: analytic {} vs numeric {numeric} (rel err {err:e})", analytic[i]);
    }
}
