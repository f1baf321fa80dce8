//! Reconnection backoff (spec §14.2).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Delay before a slot's next connection attempt:
/// `min(base × factor^n, max) × (1 + jitter × r)`, with `r` uniform in
/// [−1, 1) and `n` the attempts since the slot's last registration.
///
/// The default is the Go client's: base 250 ms, factor 1.6, jitter 0.2,
/// max 30 s, so a delay stays between 200 ms and 36 s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay of the first retry, before jitter. Default 250 ms.
    pub base: Duration,
    /// Growth of the delay at each failed attempt. Default 1.6.
    pub factor: f64,
    /// Spread of the delay, as a fraction of it. Default 0.2.
    pub jitter: f64,
    /// Longest delay, before jitter. Default 30 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(250), factor: 1.6, jitter: 0.2, max: Duration::from_secs(30) }
    }
}

impl Backoff {
    pub(crate) fn delay(&self, n: u32) -> Duration {
        self.delay_with(n, random_unit() * 2.0 - 1.0)
    }

    fn delay_with(&self, n: u32, r: f64) -> Duration {
        let exp = self.base.as_secs_f64() * self.factor.powi(n.min(1000) as i32);
        let d = exp.min(self.max.as_secs_f64()) * (1.0 + self.jitter * r);
        Duration::try_from_secs_f64(d.max(0.0)).unwrap_or(self.max)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(format!("backoff factor {} is below 1", self.factor));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("backoff jitter {} is outside 0 to 1", self.jitter));
        }
        if self.base.is_zero() || self.max < self.base {
            return Err("backoff base must be above zero and at most max".into());
        }
        Ok(())
    }
}

/// A uniform number in [0, 1): std's randomly keyed hasher over a counter
/// is random enough for jitter and needs no dependency.
fn random_unit() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let x = RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_follow_the_formula() {
        let b = Backoff::default();
        assert_eq!(b.delay_with(0, 0.0), Duration::from_millis(250));
        assert_eq!(b.delay_with(0, -1.0), Duration::from_millis(200));
        assert_eq!(b.delay_with(1, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay_with(50, 0.0), Duration::from_secs(30));
        assert_eq!(b.delay_with(u32::MAX, 1.0), Duration::from_secs(36));
        for n in 0..20 {
            let d = b.delay(n);
            assert!(d >= Duration::from_millis(200) && d < Duration::from_secs(36), "{d:?}");
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| b.delay(0)).collect();
        assert!(spread.len() > 10, "jitter varies");
    }
}
