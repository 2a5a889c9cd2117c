//! RMSNorm over the channel dimension (the Llama family's norm): no centring, no bias.

use crate::cpu::real::Real;
use rayon::prelude::*;

/// out (N,C) = x · rstd · weight for each row, rstd = 1/sqrt(mean(x²) + eps). Saves rstd (N).
pub fn rmsnorm_forward<F: Real>(out: &mut [F], rstd: &mut [F], inp: &[F], weight: &[F], n: usize, c: usize, eps: f64) {
    let (eps, inv_c) = (F::from_f64(eps), F::one() / F::from_f64(c as f64));
    out[..n * c].par_chunks_mut(c).zip(inp[..n * c].par_chunks(c)).zip(rstd[..n].par_iter_mut()).for_each(
        |((o, x), r)| {
            let ms = x.iter().map(|&v| v * v).sum::<F>() * inv_c;
            *r = F::one() / (ms + eps).sqrt();
            for ((o, &xi), &w) in o.iter_mut().zip(x).zip(weight) {
                *o = xi * *r * w;
            }
        },
    );
}

/// Accumulates dinp (N,C) and dweight (C) from dout. With xhat = x·rstd and g = dout·weight:
/// dinp = rstd · (g − xhat · mean(g · xhat)), dweight = Σ_rows dout · xhat.
pub fn rmsnorm_backward<F: Real>(
    dinp: &mut [F],
    dweight: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    rstd: &[F],
    n: usize,
    c: usize,
) {
    let inv_c = F::one() / F::from_f64(c as f64);
    dinp[..n * c]
        .par_chunks_mut(c)
        .zip(dout[..n * c].par_chunks(c))
        .zip(inp[..n * c].par_chunks(c))
        .zip(&rstd[..n])
        .for_each(|(((di, dy), x), &r)| {
            let gx_mean = dy.iter().zip(x).zip(weight).map(|((&d, &xi), &w)| d * w * xi * r).sum::<F>() * inv_c;
            for (((di, &d), &xi), &w) in di.iter_mut().zip(dy).zip(x).zip(weight) {
                *di += r * (d * w - xi * r * gx_mean);
            }
        });
    // The weight gradient sums over rows: one column slice per task, rows in order.
    dweight[..c].par_iter_mut().enumerate().for_each(|(j, dw)| {
        for row in 0..n {
            *dw += dout[row * c + j] * inp[row * c + j] * rstd[row];
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    #[test]
    fn gradients_match_finite_differences() {
        let (n, c, eps) = (3, 7, 1e-5);
        let (x, w, dout) = (random(n * c, 1), random(c, 2), random(n * c, 3));
        let loss = |x: &[f64], w: &[f64]| {
            let (mut out, mut r) = (vec![0.0; n * c], vec![0.0; n]);
            rmsnorm_forward(&mut out, &mut r, x, w, n, c, eps);
            dot(&out, &dout)
        };
        let (mut out, mut r) = (vec![0.0; n * c], vec![0.0; n]);
        rmsnorm_forward(&mut out, &mut r, &x, &w, n, c, eps);
        let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
        rmsnorm_backward(&mut dx, &mut dw, &dout, &x, &w, &r, n, c);
        check("dinp", &x, &dx, |x| loss(x, &w));
        check("dweight", &w, &dw, |w| loss(&x, w));
    }

    #[test]
    fn a_row_is_scaled_to_unit_mean_square() {
        let (mut out, mut r) = (vec![0.0; 4], vec![0.0]);
        rmsnorm_forward(&mut out, &mut r, &[1.0, -2.0, 3.0, -4.0], &[1.0; 4], 1, 4, 0.0);
        let ms: f64 = out.iter().map(|v| v * v).sum::<f64>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-14 && (r[0] - 1.0 / 7.5f64.sqrt()).abs() < 1e-15);
    }
}
