//! The SwiGLU gate of the Llama family's MLP: silu(gate) · up, with silu(x) = x · σ(x).

use crate::cpu::real::Real;
use rayon::prelude::*;

fn sigmoid<F: Real>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

/// out = silu(gate) · up, element-wise.
pub fn swiglu_forward<F: Real>(out: &mut [F], gate: &[F], up: &[F]) {
    out.par_iter_mut().zip(gate).zip(up).for_each(|((o, &g), &u)| *o = g * sigmoid(g) * u);
}

/// Accumulates dgate += dout · up · silu'(gate) and dup += dout · silu(gate), where
/// silu'(x) = σ(x) · (1 + x · (1 − σ(x))).
pub fn swiglu_backward<F: Real>(dgate: &mut [F], dup: &mut [F], dout: &[F], gate: &[F], up: &[F]) {
    dgate.par_iter_mut().zip(dup.par_iter_mut()).zip(dout).zip(gate.par_iter().zip(up)).for_each(
        |(((dg, du), &d), (&g, &u))| {
            let s = sigmoid(g);
            *dg += d * u * s * (F::one() + g * (F::one() - s));
            *du += d * g * s;
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    #[test]
    fn gradients_match_finite_differences() {
        let n = 23;
        let (g, u, dout) = (random(n, 1).iter().map(|x| 3.0 * x).collect::<Vec<_>>(), random(n, 2), random(n, 3));
        let loss = |g: &[f64], u: &[f64]| {
            let mut out = vec![0.0; n];
            swiglu_forward(&mut out, g, u);
            dot(&out, &dout)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&mut dg, &mut du, &dout, &g, &u);
        check("dgate", &g, &dg, |g| loss(g, &u));
        check("dup", &u, &du, |u| loss(&g, u));
    }
}
