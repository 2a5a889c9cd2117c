//! The float types the CPU reference computes in: f32 for training, f64 for gradient checks.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// A row-major or strided matrix operand: element (i, j) lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, F> {
    pub data: &'a [F],
    pub rs: usize,
    pub cs: usize,
}

/// A float the reference ops are generic over. Besides arithmetic it carries a fast GEMM
/// (from the matrixmultiply crate); the tests judge it against a naive triple loop.
pub trait Real:
    num_traits::Float
    + Default
    + Send
    + Sync
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Debug
    + Display
    + bytemuck::Pod
    + 'static
{
    fn from_f64(x: f64) -> Self;
    fn as_f64(self) -> f64;

    /// C (m×n, row-major, contiguous) = alpha · A (m×k) · B (k×n) + beta · C.
    fn gemm(m: usize, k: usize, n: usize, alpha: Self, a: Mat<Self>, b: Mat<Self>, beta: Self, c: &mut [Self]) {
        assert!(c.len() >= m * n, "gemm: C holds {} elements, needs {}", c.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        if k > 0 {
            let last = |x: &Mat<Self>, rows: usize, cols: usize| (rows - 1) * x.rs + (cols - 1) * x.cs;
            assert!(last(&a, m, k) < a.data.len(), "gemm: A is out of bounds");
            assert!(last(&b, k, n) < b.data.len(), "gemm: B is out of bounds");
        }
        // SAFETY: the asserts above keep every index matrixmultiply computes inside the slices,
        // and `c` is uniquely borrowed.
        unsafe { Self::gemm_raw(m, k, n, alpha, a, b, beta, c) }
    }

    /// # Safety
    /// Every element addressed by the shapes and strides must be inside the slices.
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: Mat<Self>,
        b: Mat<Self>,
        beta: Self,
        c: &mut [Self],
    );
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn as_f64(self) -> f64 {
                self as f64
            }
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: Mat<Self>,
                b: Mat<Self>,
                beta: Self,
                c: &mut [Self],
            ) {
                $gemm(
                    m,
                    k,
                    n,
                    alpha,
                    a.data.as_ptr(),
                    a.rs as isize,
                    a.cs as isize,
                    b.data.as_ptr(),
                    b.rs as isize,
                    b.cs as isize,
                    beta,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        }
    };
}

impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);
