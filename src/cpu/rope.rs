//! Rotary position embeddings in Hugging Face's `rotate_half` convention: in each head, channel
//! i pairs with i + hd/2 (not 2i with 2i+1), rotated by the angle pos · θ^(−2i/hd).

use crate::cpu::real::Real;
use rayon::prelude::*;

/// cos and sin of every (position, pair) angle, (T, hd/2) each, computed in f64 as
/// 1 / θ^(2i/hd) · pos (Hugging Face's inv_freq formula) and rounded once.
pub fn rope_tables<F: Real>(t: usize, hd: usize, theta: f64) -> (Vec<F>, Vec<F>) {
    let half = hd / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
    for pos in 0..t {
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
            let angle = pos as f64 * inv_freq;
            cos.push(F::from_f64(angle.cos()));
            sin.push(F::from_f64(angle.sin()));
        }
    }
    (cos, sin)
}

/// out (N, H·hd) = inp rotated, row n at position n % T: for each head and i < hd/2,
/// out[i] = x[i]·cos − x[i+hd/2]·sin, out[i+hd/2] = x[i+hd/2]·cos + x[i]·sin.
pub fn rope_forward<F: Real>(
    out: &mut [F],
    inp: &[F],
    (n, t): (usize, usize),
    (heads, hd): (usize, usize),
    theta: f64,
) {
    let (cos, sin) = rope_tables::<F>(t, hd, theta);
    let (w, half) = (heads * hd, hd / 2);
    out[..n * w].par_chunks_mut(w).zip(inp[..n * w].par_chunks(w)).enumerate().for_each(|(row, (o, x))| {
        let at = (row % t) * half;
        for h in 0..heads {
            let (o, x) = (&mut o[h * hd..(h + 1) * hd], &x[h * hd..(h + 1) * hd]);
            for i in 0..half {
                let (c, s) = (cos[at + i], sin[at + i]);
                o[i] = x[i] * c - x[i + half] * s;
                o[i + half] = x[i + half] * c + x[i] * s;
            }
        }
    });
}

/// Accumulates dinp from dout: the rotation's transpose (by −angle).
pub fn rope_backward<F: Real>(
    dinp: &mut [F],
    dout: &[F],
    (n, t): (usize, usize),
    (heads, hd): (usize, usize),
    theta: f64,
) {
    let (cos, sin) = rope_tables::<F>(t, hd, theta);
    let (w, half) = (heads * hd, hd / 2);
    dinp[..n * w].par_chunks_mut(w).zip(dout[..n * w].par_chunks(w)).enumerate().for_each(|(row, (dx, dy))| {
        let at = (row % t) * half;
        for h in 0..heads {
            let (dx, dy) = (&mut dx[h * hd..(h + 1) * hd], &dy[h * hd..(h + 1) * hd]);
            for i in 0..half {
                let (c, s) = (cos[at + i], sin[at + i]);
                dx[i] += dy[i] * c + dy[i + half] * s;
                dx[i + half] += dy[i + half] * c - dy[i] * s;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    #[test]
    fn gradients_match_finite_differences() {
        let (b, t, heads, hd) = (2, 5, 3, 6);
        let n = b * t;
        let (x, dout) = (random(n * heads * hd, 1), random(n * heads * hd, 2));
        let loss = |x: &[f64]| {
            let mut out = vec![0.0; x.len()];
            rope_forward(&mut out, x, (n, t), (heads, hd), 500.0);
            dot(&out, &dout)
        };
        let mut dx = vec![0.0; x.len()];
        rope_backward(&mut dx, &dout, (n, t), (heads, hd), 500.0);
        check("dinp", &x, &dx, loss);
    }

    #[test]
    fn position_zero_is_the_identity_and_dot_products_depend_on_distance_only() {
        let (t, hd) = (6, 4);
        let x = random(t * hd, 3);
        let mut out = vec![0.0; x.len()];
        rope_forward(&mut out, &x, (t, t), (1, hd), 10000.0);
        assert_eq!(&out[..hd], &x[..hd]);
        // The same vector at positions p and p + d: q·k depends on d only.
        let v = random(hd, 4);
        let at = |p: usize| {
            let mut rows = vec![0.0; t * hd];
            rows[p * hd..(p + 1) * hd].copy_from_slice(&v);
            let mut o = vec![0.0; t * hd];
            rope_forward(&mut o, &rows, (t, t), (1, hd), 10000.0);
            o[p * hd..(p + 1) * hd].to_vec()
        };
        let dotp = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        assert!((dotp(&at(1), &at(3)) - dotp(&at(2), &at(4))).abs() < 1e-12);
    }
}
