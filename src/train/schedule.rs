//! The learning-rate schedule: linear warmup, then cosine decay to zero.

/// Learning rate as a function of the optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The warmup a run gets when none is asked for: 3% of its steps (the
    /// `warmup_ratio` commonly used with transformers' Trainer), at least one.
    pub fn default_warmup(total_steps: usize) -> usize {
        (total_steps * 3).div_ceil(100).clamp(1, total_steps.max(1))
    }

    /// The rate for 0-based step `step`. Warmup rises to `peak` at step
    /// `warmup_steps - 1` (so the first step already moves the weights, unlike
    /// a schedule that starts at 0); cosine decay then falls towards 0 at
    /// `total_steps`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule {
            peak: 1e-3,
            warmup_steps: 4,
            total_steps: 14,
        };
        assert_eq!(s.lr(0), 2.5e-4);
        assert_eq!(s.lr(3), 1e-3);
        assert_eq!(s.lr(4), 1e-3);
        assert!((s.lr(9) - 5e-4).abs() < 1e-12, "half way: {}", s.lr(9));
        assert!(s.lr(13) < s.lr(12) && s.lr(13) > 0.0);
        let rates: Vec<f64> = (4..14).map(|i| s.lr(i)).collect();
        assert!(rates.windows(2).all(|w| w[1] < w[0]), "{rates:?}");
    }

    #[test]
    fn default_warmup_is_three_percent() {
        assert_eq!(Schedule::default_warmup(1), 1);
        assert_eq!(Schedule::default_warmup(10), 1);
        assert_eq!(Schedule::default_warmup(1000), 30);
    }
}
