//! Matmul with optional bias, for both weight layouts the model uses.

use crate::cpu::real::{Mat, Real};
use rayon::prelude::*;

/// How a weight of a layer mapping C inputs to OC outputs is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// (C, OC), Hugging Face's Conv1D: every GPT-2 linear layer.
    InOut,
    /// (OC, C): the token embedding `wte`, reused as the classifier.
    OutIn,
}

impl WeightLayout {
    /// (row, column) strides of W seen as a (C × OC) operand.
    pub fn in_out_strides(self, c: usize, oc: usize) -> (usize, usize) {
        match self {
            WeightLayout::InOut => (oc, 1),
            WeightLayout::OutIn => (1, c),
        }
    }

    /// (row, column) strides of Wᵀ seen as an (OC × C) operand.
    pub fn out_in_strides(self, c: usize, oc: usize) -> (usize, usize) {
        match self {
            WeightLayout::InOut => (1, oc),
            WeightLayout::OutIn => (c, 1),
        }
    }

    fn as_in_out<F>(self, w: &[F], c: usize, oc: usize) -> Mat<'_, F> {
        let (rs, cs) = self.in_out_strides(c, oc);
        Mat { data: w, rs, cs }
    }

    fn as_out_in<F>(self, w: &[F], c: usize, oc: usize) -> Mat<'_, F> {
        let (rs, cs) = self.out_in_strides(c, oc);
        Mat { data: w, rs, cs }
    }
}

/// A GEMM is split into at most this many row blocks. Each block repacks the whole B operand,
/// so few large blocks beat many small ones; the count depends on the shape alone, never on
/// the thread count, so results are the same on any machine size.
const MAX_TASKS: usize = 8;
const MIN_ROWS_PER_TASK: usize = 16;

/// out (m×n, row-major) = A (m×k) · B (k×n) + beta · out, split into row blocks run in parallel.
fn par_gemm<F: Real>(out: &mut [F], m: usize, k: usize, n: usize, a: Mat<F>, b: Mat<F>, beta: F) {
    let rows_per_task = m.div_ceil(MAX_TASKS).max(MIN_ROWS_PER_TASK);
    out[..m * n].par_chunks_mut(rows_per_task * n).enumerate().for_each(|(task, block)| {
        let rows = block.len() / n;
        let a_block = Mat { data: &a.data[task * rows_per_task * a.rs..], ..a };
        F::gemm(rows, k, n, F::one(), a_block, b, beta, block);
    });
}

/// out (N, OC) = inp (N, C) · W + bias (OC). W is (C, OC) or (OC, C) as `layout` says.
pub fn matmul_forward<F: Real>(
    out: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: Option<&[F]>,
    n: usize,
    c: usize,
    oc: usize,
    layout: WeightLayout,
) {
    let beta = match bias {
        Some(bias) => {
            out[..n * oc].par_chunks_mut(oc).for_each(|row| row.copy_from_slice(&bias[..oc]));
            F::one()
        }
        None => F::zero(), // beta = 0: `out` is overwritten, never read, even if it holds NaN
    };
    par_gemm(out, n, c, oc, Mat { data: inp, rs: c, cs: 1 }, layout.as_in_out(weight, c, oc), beta);
}

/// Accumulates dinp (N, C) += dout · Wᵀ, dweight += the weight gradient in W's own layout,
/// and dbias (OC) += Σ_rows dout.
pub fn matmul_backward<F: Real>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: Option<&mut [F]>,
    dout: &[F],
    inp: &[F],
    weight: &[F],
    n: usize,
    c: usize,
    oc: usize,
    layout: WeightLayout,
) {
    let dout_mat = Mat { data: dout, rs: oc, cs: 1 };
    let inp_mat = Mat { data: inp, rs: c, cs: 1 };
    par_gemm(dinp, n, oc, c, dout_mat, layout.as_out_in(weight, c, oc), F::one());
    match layout {
        // dW (C × OC) += inpᵀ · dout
        WeightLayout::InOut => par_gemm(dweight, c, n, oc, Mat { data: inp, rs: 1, cs: c }, dout_mat, F::one()),
        // dW (OC × C) += doutᵀ · inp
        WeightLayout::OutIn => par_gemm(dweight, oc, n, c, Mat { data: dout, rs: 1, cs: oc }, inp_mat, F::one()),
    }
    if let Some(dbias) = dbias {
        const COLS_PER_TASK: usize = 64;
        dbias[..oc].par_chunks_mut(COLS_PER_TASK).enumerate().for_each(|(task, db)| {
            let col0 = task * COLS_PER_TASK;
            for row in dout[..n * oc].chunks_exact(oc) {
                for (d, &g) in db.iter_mut().zip(&row[col0..]) {
                    *d += g;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{check, dot, random};

    /// The judge: a plain triple loop, W read as (C, OC) or (OC, C).
    fn naive_forward(
        inp: &[f64],
        w: &[f64],
        bias: Option<&[f64]>,
        n: usize,
        c: usize,
        oc: usize,
        layout: WeightLayout,
    ) -> Vec<f64> {
        let mut out = vec![0.0; n * oc];
        for i in 0..n {
            for o in 0..oc {
                let mut acc = bias.map_or(0.0, |b| b[o]);
                for k in 0..c {
                    let wv = match layout {
                        WeightLayout::InOut => w[k * oc + o],
                        WeightLayout::OutIn => w[o * c + k],
                    };
                    acc += inp[i * c + k] * wv;
                }
                out[i * oc + o] = acc;
            }
        }
        out
    }

    #[test]
    fn forward_matches_the_naive_loop_in_both_layouts() {
        // Sizes not multiples of the row block or any SIMD width.
        let (n, c, oc) = (37, 19, 23);
        let (inp, w, bias) = (random(n * c, 1), random(c * oc, 2), random(oc, 3));
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            for b in [Some(&bias[..]), None] {
                let mut out = vec![f64::NAN; n * oc];
                matmul_forward(&mut out, &inp, &w, b, n, c, oc, layout);
                let want = naive_forward(&inp, &w, b, n, c, oc, layout);
                for (x, y) in out.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-12, "{layout:?}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn f32_forward_matches_the_naive_loop() {
        let (n, c, oc) = (33, 70, 17);
        let (inp, w) = (random(n * c, 4), random(c * oc, 5));
        let (inp32, w32): (Vec<f32>, Vec<f32>) =
            (inp.iter().map(|&x| x as f32).collect(), w.iter().map(|&x| x as f32).collect());
        let mut out = vec![f32::NAN; n * oc];
        matmul_forward(&mut out, &inp32, &w32, None, n, c, oc, WeightLayout::InOut);
        let inp_r: Vec<f64> = inp32.iter().map(|&x| x as f64).collect();
        let w_r: Vec<f64> = w32.iter().map(|&x| x as f64).collect();
        let want = naive_forward(&inp_r, &w_r, None, n, c, oc, WeightLayout::InOut);
        // f32 accumulation of 70 products of magnitude < 1: error well under 70 · 2^-24 · 70.
        for (x, y) in out.iter().zip(&want) {
            assert!((*x as f64 - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, c, oc) = (5, 4, 3);
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let (inp, w, bias, dout) = (random(n * c, 1), random(c * oc, 2), random(oc, 3), random(n * oc, 4));
            let fwd = |inp: &[f64], w: &[f64], bias: &[f64]| {
                let mut out = vec![0.0; n * oc];
                matmul_forward(&mut out, inp, w, Some(bias), n, c, oc, layout);
                dot(&out, &dout)
            };
            let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c * oc], vec![0.0; oc]);
            matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dout, &inp, &w, n, c, oc, layout);
            check("dinp", &inp, &dinp, |x| fwd(x, &w, &bias));
            check("dweight", &w, &dw, |x| fwd(&inp, x, &bias));
            check("dbias", &bias, &db, |x| fwd(&inp, &w, x));
        }
    }
}
