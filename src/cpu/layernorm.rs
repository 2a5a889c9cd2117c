//! LayerNorm over the channel dimension.

use crate::cpu::real::Real;
use rayon::prelude::*;

/// out (N,C) = (inp - mean) · rstd · weight + bias for each of the N rows, where
/// rstd = 1/sqrt(var + eps) with the biased variance. Saves mean and rstd (N) for backward.
pub fn layernorm_forward<F: Real>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: &[F],
    n: usize,
    c: usize,
    eps: f64,
) {
    let (eps, inv_c) = (F::from_f64(eps), F::one() / F::from_f64(c as f64));
    out[..n * c]
        .par_chunks_mut(c)
        .zip(inp[..n * c].par_chunks(c))
        .zip(mean[..n].par_iter_mut().zip(rstd[..n].par_iter_mut()))
        .for_each(|((out_row, x), (m, s))| {
            let mu = x.iter().copied().sum::<F>() * inv_c;
            let var = x.iter().map(|&xi| (xi - mu) * (xi - mu)).sum::<F>() * inv_c;
            let r = F::one() / (var + eps).sqrt();
            for (((o, &xi), &w), &bb) in out_row.iter_mut().zip(x).zip(weight).zip(bias) {
                *o = (xi - mu) * r * w + bb;
            }
            (*m, *s) = (mu, r);
        });
}

/// Accumulates dinp (N,C), dweight (C), dbias (C) from dout (N,C).
/// With xhat = (x - mean)·rstd and g = dout·weight:
/// dinp = rstd · (g - mean(g) - xhat · mean(g · xhat)).
pub fn layernorm_backward<F: Real>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    mean: &[F],
    rstd: &[F],
    n: usize,
    c: usize,
) {
    let inv_c = F::one() / F::from_f64(c as f64);
    dinp[..n * c]
        .par_chunks_mut(c)
        .zip(dout[..n * c].par_chunks(c))
        .zip(inp[..n * c].par_chunks(c))
        .zip(mean[..n].par_iter().zip(&rstd[..n]))
        .for_each(|(((di, dy), x), (&mu, &r))| {
            let (mut g_mean, mut gx_mean) = (F::zero(), F::zero());
            for ((&dyi, &xi), &w) in dy.iter().zip(x).zip(weight) {
                let g = dyi * w;
                g_mean += g;
                gx_mean += g * (xi - mu) * r;
            }
            (g_mean, gx_mean) = (g_mean * inv_c, gx_mean * inv_c);
            for (((d, &dyi), &xi), &w) in di.iter_mut().zip(dy).zip(x).zip(weight) {
                let xhat = (xi - mu) * r;
                *d += (dyi * w - g_mean - xhat * gx_mean) * r;
            }
        });
    // Reductions over rows stay sequential: a fixed order keeps them bit-reproducible.
    for (row, (dy, x)) in dout[..n * c].chunks_exact(c).zip(inp[..n * c].chunks_exact(c)).enumerate() {
        let (mu, r) = (mean[row], rstd[row]);
        for (((dw, db), &dyi), &xi) in dweight.iter_mut().zip(dbias.iter_mut()).zip(dy).zip(x) {
            *dw += dyi * (xi - mu) * r;
            *db += dyi;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    const EPS: f64 = 1e-5;

    fn run(inp: &[f64], w: &[f64], b: &[f64], n: usize, c: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut out, mut mean, mut rstd) = (vec![f64::NAN; n * c], vec![f64::NAN; n], vec![f64::NAN; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, inp, w, b, n, c, EPS);
        (out, mean, rstd)
    }

    #[test]
    fn normalises_each_row() {
        let (n, c) = (3, 7);
        let inp: Vec<f64> = random(n * c, 1).iter().map(|x| 5.0 * x + 2.0).collect();
        let (out, _, _) = run(&inp, &vec![1.0; c], &vec![0.0; c], n, c);
        for row in out.chunks(c) {
            let mu = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / c as f64;
            assert!(mu.abs() < 1e-12 && (var - 1.0).abs() < 1e-3, "mean {mu} var {var}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, c) = (3, 5);
        let (inp, w, b, dout) = (random(n * c, 1), random(c, 2), random(c, 3), random(n * c, 4));
        let (_, mean, rstd) = run(&inp, &w, &b, n, c);
        let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm_backward(&mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, n, c);
        check("dinp", &inp, &dinp, |x| dot(&run(x, &w, &b, n, c).0, &dout));
        check("dweight", &w, &dw, |x| dot(&run(&inp, x, &b, n, c).0, &dout));
        check("dbias", &b, &db, |x| dot(&run(&inp, &w, x, n, c).0, &dout));
    }
}
