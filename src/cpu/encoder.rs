//! Token + position embedding.

use crate::cpu::real::Real;

/// out (B,T,C) = wte[inp[b,t]] (Vp,C) + wpe[t] (maxT,C).
pub fn encoder_forward<F: Real>(out: &mut [F], inp: &[u32], wte: &[F], wpe: &[F], b: usize, t: usize, c: usize) {
    for (bt, out_row) in out[..b * t * c].chunks_exact_mut(c).enumerate() {
        let token = inp[bt] as usize;
        let (wte_row, wpe_row) = (&wte[token * c..][..c], &wpe[(bt % t) * c..][..c]);
        for ((o, &x), &p) in out_row.iter_mut().zip(wte_row).zip(wpe_row) {
            *o = x + p;
        }
    }
}

/// dwte[inp[b,t]] += dout[b,t], dwpe[t] += dout[b,t]. Sequential: rows of dwte repeat.
pub fn encoder_backward<F: Real>(
    dwte: &mut [F],
    dwpe: &mut [F],
    dout: &[F],
    inp: &[u32],
    b: usize,
    t: usize,
    c: usize,
) {
    for (bt, d_row) in dout[..b * t * c].chunks_exact(c).enumerate() {
        let token = inp[bt] as usize;
        for (g, &d) in dwte[token * c..][..c].iter_mut().zip(d_row) {
            *g += d;
        }
        for (g, &d) in dwpe[(bt % t) * c..][..c].iter_mut().zip(d_row) {
            *g += d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    #[test]
    fn gradients_match_finite_differences() {
        let (b, t, c, vp) = (2, 3, 4, 5);
        let inp = [1u32, 4, 1, 0, 2, 1]; // token 1 repeats: its row must collect every use
        let (wte, wpe, w) = (random(vp * c, 1), random(t * c, 2), random(b * t * c, 3));
        let mut out = vec![f64::NAN; b * t * c];
        let (mut dwte, mut dwpe) = (vec![0.0; vp * c], vec![0.0; t * c]);
        encoder_backward(&mut dwte, &mut dwpe, &w, &inp, b, t, c);
        check("dwte", &wte, &dwte, |x| {
            let mut o = vec![0.0; b * t * c];
            encoder_forward(&mut o, &inp, x, &wpe, b, t, c);
            dot(&o, &w)
        });
        check("dwpe", &wpe, &dwpe, |x| {
            let mut o = vec![0.0; b * t * c];
            encoder_forward(&mut o, &inp, &wte, x, b, t, c);
            dot(&o, &w)
        });
        encoder_forward(&mut out, &inp, &wte, &wpe, b, t, c);
        assert_eq!(out[(4 * c) + 1], wte[2 * c + 1] + wpe[c + 1]); // b=1, t=1, token 2
    }
}
