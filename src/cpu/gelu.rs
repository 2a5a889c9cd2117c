//! GELU, tanh approximation (GPT-2's "gelu_new").

use crate::cpu::real::Real;
use rayon::prelude::*;

const CHUNK: usize = 4096;

fn consts<F: Real>() -> (F, F, F) {
    (F::from_f64((2.0 / std::f64::consts::PI).sqrt()), F::from_f64(0.044715), F::from_f64(0.5))
}

/// out (N) = 0.5 · x · (1 + tanh(sqrt(2/π) · (x + 0.044715 · x³))), elementwise.
pub fn gelu_forward<F: Real>(out: &mut [F], inp: &[F]) {
    let (s, k, half) = consts::<F>();
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = half * x * (F::one() + (s * (x + k * x * x * x)).tanh());
        }
    });
}

/// dinp (N) += gelu'(x) · dout.
pub fn gelu_backward<F: Real>(dinp: &mut [F], inp: &[F], dout: &[F]) {
    let (s, k, half) = consts::<F>();
    let three = F::from_f64(3.0);
    dinp.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).zip(dout.par_chunks(CHUNK)).for_each(|((di, x), dy)| {
        for ((di, &x), &dy) in di.iter_mut().zip(x).zip(dy) {
            let th = (s * (x + k * x * x * x)).tanh();
            let sech2 = F::one() - th * th;
            let local = half * (F::one() + th) + half * x * sech2 * s * (F::one() + three * k * x * x);
            *di += local * dy;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    #[test]
    fn gradients_match_finite_differences() {
        let x: Vec<f64> = random(50, 1).iter().map(|v| 4.0 * v).collect();
        let dout = random(50, 2);
        let mut dx = vec![0.0; 50];
        gelu_backward(&mut dx, &x, &dout);
        check("dinp", &x, &dx, |x| {
            let mut o = vec![0.0; x.len()];
            gelu_forward(&mut o, x);
            dot(&o, &dout)
        });
    }

    #[test]
    fn known_values() {
        let mut o = [0.0f64; 3];
        gelu_forward(&mut o, &[0.0, 1.0, -3.0]);
        // torch.nn.functional.gelu(x, approximate="tanh") for 1.0 and -3.0.
        assert_eq!(o[0], 0.0);
        approx::assert_abs_diff_eq!(o[1], 0.8411919906082768, epsilon = 1e-15);
        approx::assert_abs_diff_eq!(o[2], -0.0036373920817729943, epsilon = 1e-15);
    }
}
