//! Residual connection.

use crate::cpu::real::Real;

/// out (N) = a + b.
pub fn residual_forward<F: Real>(out: &mut [F], a: &[F], b: &[F]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// da (N) += dout, db (N) += dout.
pub fn residual_backward<F: Real>(da: &mut [F], db: &mut [F], dout: &[F]) {
    for ((x, y), &d) in da.iter_mut().zip(db.iter_mut()).zip(dout) {
        *x += d;
        *y += d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_accumulates_into_both_inputs() {
        let mut out = [0.0f64; 2];
        residual_forward(&mut out, &[1.0, 2.0], &[10.0, 20.0]);
        assert_eq!(out, [11.0, 22.0]);
        let (mut da, mut db) = ([1.0f64, 1.0], [0.0f64, 5.0]);
        residual_backward(&mut da, &mut db, &[0.5, -1.0]);
        assert_eq!((da, db), ([1.5, 0.0], [0.5, 4.0]));
    }
}
