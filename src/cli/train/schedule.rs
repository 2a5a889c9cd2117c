//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// The peak rate throughout (after warm-up).
    Constant,
    /// Half a cosine from the peak down to --min-lr at the last step.
    Cosine,
    /// A straight line from the peak down to --min-lr at the last step.
    Linear,
}

impl LrSchedule {
    /// The flag's value: "cosine", "linear", "constant".
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Cosine => "cosine",
            LrSchedule::Linear => "linear",
        }
    }
}

/// The learning rate of step `step` (1-based) of `total`: linear warm-up from lr/warmup to lr
/// over the first `warmup` steps, then the schedule's decay to `min_lr` at step `total`.
///
/// ```
/// use finch::cli::train::schedule::{learning_rate, LrSchedule};
/// // 100 steps, peak 1e-3 after 10 warm-up steps, cosine down to 1e-4.
/// assert_eq!(learning_rate(LrSchedule::Cosine, 5, 100, 1e-3, 1e-4, 10), 5e-4);
/// assert_eq!(learning_rate(LrSchedule::Cosine, 100, 100, 1e-3, 1e-4, 10), 1e-4);
/// ```
pub fn learning_rate(schedule: LrSchedule, step: usize, total: usize, lr: f64, min_lr: f64, warmup: usize) -> f64 {
    if step <= warmup {
        return lr * step as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    match schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Cosine => min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (lr - min_lr),
        LrSchedule::Linear => min_lr + (1.0 - progress) * (lr - min_lr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LrSchedule::*;

    #[test]
    fn warmup_then_decay_to_the_floor() {
        let lr = |s, step| learning_rate(s, step, 110, 1.0, 0.1, 10);
        assert_eq!(lr(Cosine, 1), 0.1);
        assert_eq!(lr(Cosine, 10), 1.0);
        approx::assert_abs_diff_eq!(lr(Cosine, 60), 0.55, epsilon = 1e-12); // halfway: mean of peak and floor
        approx::assert_abs_diff_eq!(lr(Cosine, 110), 0.1, epsilon = 1e-12);
        approx::assert_abs_diff_eq!(lr(Linear, 35), 0.775, epsilon = 1e-12);
        assert_eq!(lr(Linear, 110), 0.1);
        assert_eq!(lr(Constant, 5), 0.5);
        assert_eq!(lr(Constant, 110), 1.0);
        assert_eq!(learning_rate(Constant, 1, 5, 3e-4, 0.0, 0), 3e-4);
    }
}
