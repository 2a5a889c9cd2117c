//! A small deterministic random number generator, so the same `--seed` gives the same weights on
//! every machine and thread count (no dependence on a crate's unspecified algorithm).

use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea, Flood 2014): one u64 of state, passes BigCrush, trivially saved in a
/// checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: 53 random bits, never 0 so `ln` below is finite.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `out` with N(mean, std) draws (Box-Muller, both outputs used, in order).
    /// Computed in f64 and rounded once to f32, so libm's last-ulp differences between platforms
    /// practically never reach the stored weights.
    pub fn fill_normal(&mut self, out: &mut [f32], mean: f64, std: f64) {
        for pair in out.chunks_mut(2) {
            let radius = (-2.0 * self.uniform().ln()).sqrt();
            let angle = std::f64::consts::TAU * self.uniform();
            pair[0] = (mean + std * radius * angle.cos()) as f32;
            if let Some(second) = pair.get_mut(1) {
                *second = (mean + std * radius * angle.sin()) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_the_requested_moments() {
        let mut rng = Rng::new(7);
        let mut xs = vec![0f32; 100_001];
        rng.fill_normal(&mut xs, 1.0, 0.5);
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // Standard errors: 0.5/sqrt(n) ~ 0.0016 for the mean, ~0.0011 for the std.
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
    }

    #[test]
    fn matches_the_splitmix64_reference_vector() {
        // First outputs of the reference C implementation for seed 1234567.
        let mut rng = Rng::new(1234567);
        let expected = [6457827717110365317u64, 3203168211198807973, 9817491932198370423, 4593380528125082431];
        for e in expected {
            assert_eq!(rng.next_u64(), e);
        }
    }
}
