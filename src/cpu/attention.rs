//! Causal multi-head self-attention, reading Q, K, V from the fused qkv buffer.
//!
//! Like flash attention, the forward saves only each softmax row's log-sum-exp and the backward
//! recomputes the probabilities, so this reference and the GPU kernels share one activation
//! layout and nothing of size T×T is ever stored.

use crate::cpu::real::Real;
use rayon::prelude::*;

/// qkv (B, T, 3C): per position, the C query channels, then C key, then C value channels;
/// head h owns channels h·hd .. (h+1)·hd of each, hd = C / NH.
/// out (B, T, C) = softmax(q·kᵀ / sqrt(hd), causal) · v per head; lse (B, NH, T).
pub fn attention_forward<F: Real>(out: &mut [F], lse: &mut [F], qkv: &[F], b: usize, t: usize, c: usize, nh: usize) {
    let hd = c / nh;
    let scale = F::one() / F::from_f64(hd as f64).sqrt();
    out[..b * t * c]
        .par_chunks_mut(t * c)
        .zip(lse[..b * nh * t].par_chunks_mut(nh * t))
        .zip(qkv[..b * t * 3 * c].par_chunks(t * 3 * c))
        .for_each(|((out, lse), qkv)| {
            let mut scores = vec![F::zero(); t];
            for h in 0..nh {
                for i in 0..t {
                    let q = &qkv[i * 3 * c + h * hd..][..hd];
                    let mut max = F::neg_infinity();
                    for (j, s) in scores[..=i].iter_mut().enumerate() {
                        let k = &qkv[j * 3 * c + c + h * hd..][..hd];
                        *s = q.iter().zip(k).map(|(&a, &b)| a * b).sum::<F>() * scale;
                        max = max.max(*s);
                    }
                    let sum: F = scores[..=i].iter().map(|&s| (s - max).exp()).sum();
                    let row_lse = max + sum.ln();
                    lse[h * t + i] = row_lse;
                    let o = &mut out[i * c + h * hd..][..hd];
                    o.fill(F::zero());
                    for (j, &s) in scores[..=i].iter().enumerate() {
                        let p = (s - row_lse).exp();
                        let v = &qkv[j * 3 * c + 2 * c + h * hd..][..hd];
                        for (o, &v) in o.iter_mut().zip(v) {
                            *o += p * v;
                        }
                    }
                }
            }
        });
}

/// Accumulates dqkv (B, T, 3C) from dout (B, T, C), given the forward's qkv, out and lse.
/// With P recomputed from lse, dP = dO·vᵀ, and D_i = Σ_j P_ij dP_ij = dO_i · O_i:
/// dS = P ∘ (dP − D), dq = scale · dS · k, dk = scale · dSᵀ · q, dv = Pᵀ · dO.
pub fn attention_backward<F: Real>(
    dqkv: &mut [F],
    dout: &[F],
    qkv: &[F],
    out: &[F],
    lse: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hd = c / nh;
    let scale = F::one() / F::from_f64(hd as f64).sqrt();
    dqkv[..b * t * 3 * c]
        .par_chunks_mut(t * 3 * c)
        .zip(dout[..b * t * c].par_chunks(t * c))
        .zip(qkv[..b * t * 3 * c].par_chunks(t * 3 * c))
        .zip(out[..b * t * c].par_chunks(t * c))
        .zip(lse[..b * nh * t].par_chunks(nh * t))
        .for_each(|((((dqkv, dout), qkv), out), lse)| {
            for h in 0..nh {
                for i in 0..t {
                    let q = &qkv[i * 3 * c + h * hd..][..hd];
                    let d_o = &dout[i * c + h * hd..][..hd];
                    let o = &out[i * c + h * hd..][..hd];
                    let d_i: F = d_o.iter().zip(o).map(|(&a, &b)| a * b).sum();
                    for j in 0..=i {
                        let k = &qkv[j * 3 * c + c + h * hd..][..hd];
                        let v = &qkv[j * 3 * c + 2 * c + h * hd..][..hd];
                        let s = q.iter().zip(k).map(|(&a, &b)| a * b).sum::<F>() * scale;
                        let p = (s - lse[h * t + i]).exp();
                        let dp: F = d_o.iter().zip(v).map(|(&a, &b)| a * b).sum();
                        let ds = p * (dp - d_i) * scale;
                        for x in 0..hd {
                            dqkv[i * 3 * c + h * hd + x] += ds * k[x];
                            dqkv[j * 3 * c + c + h * hd + x] += ds * q[x];
                            dqkv[j * 3 * c + 2 * c + h * hd + x] += p * d_o[x];
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    /// The judge: materialise the full T×T scores, mask, softmax, multiply.
    fn naive(qkv: &[f64], b: usize, t: usize, c: usize, nh: usize) -> Vec<f64> {
        let hd = c / nh;
        let mut out = vec![0.0; b * t * c];
        for bb in 0..b {
            for h in 0..nh {
                let at = |pos: usize, part: usize, x: usize| qkv[(bb * t + pos) * 3 * c + part * c + h * hd + x];
                for i in 0..t {
                    let mut w = vec![f64::NEG_INFINITY; t];
                    for (j, wj) in w.iter_mut().enumerate().take(i + 1) {
                        *wj = (0..hd).map(|x| at(i, 0, x) * at(j, 1, x)).sum::<f64>() / (hd as f64).sqrt();
                    }
                    let max = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = w.iter().map(|s| (s - max).exp()).sum();
                    for x in 0..hd {
                        out[(bb * t + i) * c + h * hd + x] = (0..t).map(|j| (w[j] - max).exp() / z * at(j, 2, x)).sum();
                    }
                }
            }
        }
        out
    }

    fn forward(qkv: &[f64], b: usize, t: usize, c: usize, nh: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut lse) = (vec![f64::NAN; b * t * c], vec![f64::NAN; b * nh * t]);
        attention_forward(&mut out, &mut lse, qkv, b, t, c, nh);
        (out, lse)
    }

    #[test]
    fn forward_matches_the_materialised_softmax() {
        let (b, t, c, nh) = (2, 7, 12, 3);
        let qkv: Vec<f64> = random(b * t * 3 * c, 1).iter().map(|x| 3.0 * x).collect();
        let (out, _) = forward(&qkv, b, t, c, nh);
        for (x, y) in out.iter().zip(naive(&qkv, b, t, c, nh)) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (b, t, c, nh) = (2, 4, 6, 2);
        let (qkv, dout) = (random(b * t * 3 * c, 1), random(b * t * c, 2));
        let (out, lse) = forward(&qkv, b, t, c, nh);
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, b, t, c, nh);
        check("dqkv", &qkv, &dqkv, |x| dot(&forward(x, b, t, c, nh).0, &dout));
    }
}
