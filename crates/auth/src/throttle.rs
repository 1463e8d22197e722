//! Failed-login throttling: every client address and every user name has a
//! bucket of [`BURST`] failures that refills at one per [`REFILL`]. While a
//! bucket is empty, sign-ins for that address or name are refused with a
//! retry time, before any password is checked: guessing a password becomes
//! slow, and bcrypt's cost cannot be turned against the server.
//!
//! Buckets are per node (a region of N nodes allows N times as many
//! guesses behind a load balancer that spreads them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const BURST: f64 = 10.0;
pub const REFILL: Duration = Duration::from_secs(6);
/// Buckets kept; past this, the fullest (least interesting) are dropped.
const MAX_BUCKETS: usize = 65_536;

#[derive(Clone, Copy)]
struct Bucket {
    /// Failures that may still happen now.
    tokens: f64,
    updated: Instant,
}

pub struct Throttle {
    buckets: Mutex<HashMap<String, Bucket>>,
    burst: f64,
    refill: Duration,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(BURST, REFILL)
    }
}

impl Throttle {
    pub fn new(burst: f64, refill: Duration) -> Throttle {
        Throttle {
            buckets: Mutex::new(HashMap::new()),
            burst,
            refill,
        }
    }

    fn refill(&self, b: Bucket, now: Instant) -> Bucket {
        let gained = now.duration_since(b.updated).as_secs_f64() / self.refill.as_secs_f64();
        Bucket {
            tokens: (b.tokens + gained).min(self.burst),
            updated: now,
        }
    }

    /// `Err(wait)` if any of `keys` has used up its failures.
    pub fn check(&self, keys: &[&str]) -> Result<(), Duration> {
        let now = Instant::now();
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = Duration::ZERO;
        for key in keys {
            if let Some(b) = buckets.get(*key) {
                let b = self.refill(*b, now);
                if b.tokens < 1.0 {
                    let missing = 1.0 - b.tokens;
                    wait = wait.max(self.refill.mul_f64(missing));
                }
            }
        }
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Records a failure against each key.
    pub fn failed(&self, keys: &[&str]) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            let (burst, refill) = (self.burst, self.refill);
            buckets.retain(|_, b| {
                let gained = now.duration_since(b.updated).as_secs_f64() / refill.as_secs_f64();
                b.tokens + gained < burst
            });
            if buckets.len() >= MAX_BUCKETS {
                // Still full of live buckets: an attack from very many
                // addresses. Start over rather than grow without bound.
                buckets.clear();
            }
        }
        for key in keys {
            let b = buckets.entry((*key).to_string()).or_insert(Bucket {
                tokens: self.burst,
                updated: now,
            });
            let mut next = self.refill(*b, now);
            next.tokens = (next.tokens - 1.0).max(0.0);
            *b = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_then_waiting() {
        let t = Throttle::new(3.0, Duration::from_millis(200));
        for _ in 0..3 {
            assert!(t.check(&["ip:1", "user:a"]).is_ok());
            t.failed(&["ip:1", "user:a"]);
        }
        let wait = t.check(&["ip:1"]).unwrap_err();
        assert!(wait <= Duration::from_millis(200) && wait > Duration::ZERO);
        // The user name is blocked from another address too.
        assert!(t.check(&["ip:2", "user:a"]).is_err());
        // Others are not.
        assert!(t.check(&["ip:2", "user:b"]).is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(t.check(&["ip:1", "user:a"]).is_ok());
    }
}
