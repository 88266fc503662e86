//! Exponential backoff with jitter, shared by the SLIM clients, the reconcilers and the agent.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), attempt: 0 }
    }

    /// The next delay: `min * 2^attempt`, capped at `max`, with up to 20 % jitter taken off.
    pub fn next_delay(&mut self) -> Duration {
        let delay = exponential(self.min, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        jitter(delay)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `min * 2^attempt`, capped at `max`.
pub fn exponential(min: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max)
}

/// Takes up to 20 % off, so many retries started together spread out.
pub fn jitter(delay: Duration) -> Duration {
    let fraction: f64 = rand::random::<f64>() * 0.2;
    delay.mul_f64(1.0 - fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(exponential(min, max, 0), min);
        assert_eq!(exponential(min, max, 3), Duration::from_millis(800));
        assert_eq!(exponential(min, max, 4), max);
        assert_eq!(exponential(min, max, 1000), max);
        let mut backoff = Backoff::new(min, max);
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(delay <= max && delay >= min.mul_f64(0.8), "{delay:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= min);
    }
}
