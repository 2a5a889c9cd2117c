//! Fused softmax + cross-entropy over a padded vocabulary.

use crate::cpu::real::Real;
use rayon::prelude::*;

/// logits (N, Vp) → probs (N, Vp): softmax over the first V columns, exactly 0 in the padding;
/// losses (N) = −log probs[n, target[n]], computed as lse − logit so it stays accurate when the
/// probability underflows.
pub fn softmax_crossentropy_forward<F: Real>(
    probs: &mut [F],
    losses: &mut [F],
    logits: &[F],
    targets: &[u32],
    n: usize,
    v: usize,
    vp: usize,
) {
    probs[..n * vp]
        .par_chunks_mut(vp)
        .zip(logits[..n * vp].par_chunks(vp))
        .zip(losses[..n].par_iter_mut().zip(&targets[..n]))
        .for_each(|((p, z), (loss, &target))| {
            let max = z[..v].iter().fold(F::neg_infinity(), |m, &x| m.max(x));
            let mut sum = F::zero();
            for (p, &x) in p[..v].iter_mut().zip(&z[..v]) {
                *p = (x - max).exp();
                sum += *p;
            }
            let inv = F::one() / sum;
            p[..v].iter_mut().for_each(|p| *p *= inv);
            p[v..].fill(F::zero());
            *loss = max + sum.ln() - z[target as usize];
        });
}

/// dlogits (N, Vp) += (probs − onehot(target)) · dloss, for the first V columns only, where
/// dloss is d(total loss)/d(losses[n]), the same for every row (1/N for a mean).
pub fn softmax_crossentropy_backward<F: Real>(
    dlogits: &mut [F],
    probs: &[F],
    targets: &[u32],
    dloss: F,
    n: usize,
    v: usize,
    vp: usize,
) {
    dlogits[..n * vp].par_chunks_mut(vp).zip(probs[..n * vp].par_chunks(vp)).zip(&targets[..n]).for_each(
        |((d, p), &target)| {
            for (d, &p) in d[..v].iter_mut().zip(&p[..v]) {
                *d += p * dloss;
            }
            d[target as usize] -= dloss;
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, random};

    #[test]
    fn gradients_match_finite_differences_and_padding_is_inert() {
        let (n, v, vp) = (3, 5, 8);
        let targets = [4u32, 0, 2];
        let mut logits: Vec<f64> = random(n * vp, 1).iter().map(|x| 4.0 * x).collect();
        // Huge padded logits: they must neither enter the softmax nor receive gradient.
        for row in logits.chunks_mut(vp) {
            row[v..].fill(1e3);
        }
        let mean_loss = |z: &[f64]| {
            let (mut p, mut l) = (vec![f64::NAN; n * vp], vec![f64::NAN; n]);
            softmax_crossentropy_forward(&mut p, &mut l, z, &targets, n, v, vp);
            l.iter().sum::<f64>() / n as f64
        };
        let (mut probs, mut losses) = (vec![f64::NAN; n * vp], vec![f64::NAN; n]);
        softmax_crossentropy_forward(&mut probs, &mut losses, &logits, &targets, n, v, vp);
        for row in probs.chunks(vp) {
            assert!((row[..v].iter().sum::<f64>() - 1.0).abs() < 1e-14);
            assert!(row[v..].iter().all(|&p| p == 0.0));
        }
        let mut dlogits = vec![0.0; n * vp];
        softmax_crossentropy_backward(&mut dlogits, &probs, &targets, 1.0 / n as f64, n, v, vp);
        check("dlogits", &logits, &dlogits, mean_loss);
        assert!(dlogits.chunks(vp).all(|row| row[v..].iter().all(|&d| d == 0.0)));
    }

    #[test]
    fn loss_stays_finite_when_the_target_probability_underflows() {
        let logits = [0.0f32, 200.0, 0.0, 0.0];
        let (mut p, mut l) = ([0.0f32; 4], [0.0f32; 1]);
        softmax_crossentropy_forward(&mut p, &mut l, &logits, &[0], 1, 4, 4);
        assert_eq!(p[0], 0.0);
        assert!((l[0] - 200.0).abs() < 1e-3, "{}", l[0]);
    }
}
