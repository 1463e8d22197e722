//! Failed-login throttling. Failures are counted in buckets that refill
//! over time; while a bucket is empty, sign-ins it covers are refused with
//! a retry time before any password is checked, so guessing is slow and
//! bcrypt's cost cannot be turned against the server. Three buckets apply
//! to each attempt (see [`LoginThrottle`]):
//!
//! - one user name from one address: 10 failures, then one per 6 s (the
//!   guesser);
//! - one user name from anywhere: 100, then one a second (guessing from
//!   many addresses), so a guesser elsewhere does not lock the user out;
//! - one address for any name: 100, then one a second (spraying names),
//!   loose enough that many clients behind one NAT keep working.
//!
//! A credential verified recently is accepted from the cache before any
//! bucket is consulted: running clients are never held up by someone
//! guessing their password. Buckets are per node (a region of N nodes
//! allows N times as many guesses behind a load balancer that spreads
//! them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures of one user name from one address before throttling.
pub const BURST: f64 = 10.0;
pub const REFILL: Duration = Duration::from_secs(6);
/// Failures of one user name, or from one address, before throttling.
pub const WIDE_BURST: f64 = 100.0;
pub const WIDE_REFILL: Duration = Duration::from_secs(1);
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

/// The three buckets of a sign-in attempt.
pub struct LoginThrottle {
    pair: Throttle,
    user: Throttle,
    address: Throttle,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            pair: Throttle::new(BURST, REFILL),
            user: Throttle::new(WIDE_BURST, WIDE_REFILL),
            address: Throttle::new(WIDE_BURST, WIDE_REFILL),
        }
    }
}

impl LoginThrottle {
    fn keys(address: &str, user: Option<&str>) -> (String, Option<String>) {
        (
            format!("{address}\u{0}{}", user.unwrap_or("")),
            user.map(str::to_string),
        )
    }

    /// `Err(wait)` if an attempt for `user` from `address` must wait. A
    /// token (no user) counts against the address only: tokens cannot be
    /// guessed, but each bad one costs a signature check.
    pub fn check(&self, address: &str, user: Option<&str>) -> Result<(), Duration> {
        let (pair, user) = Self::keys(address, user);
        let mut wait = Duration::ZERO;
        for result in [
            self.address.check(&[address]),
            user.as_ref().map_or(Ok(()), |_| self.pair.check(&[&pair])),
            user.map_or(Ok(()), |u| self.user.check(&[&u])),
        ] {
            if let Err(w) = result {
                wait = wait.max(w);
            }
        }
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    pub fn failed(&self, address: &str, user: Option<&str>) {
        let (pair, user) = Self::keys(address, user);
        self.address.failed(&[address]);
        if let Some(u) = user {
            self.pair.failed(&[&pair]);
            self.user.failed(&[&u]);
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

    #[test]
    fn a_guesser_holds_up_only_its_own_address_and_name() {
        let t = LoginThrottle::default();
        for _ in 0..BURST as usize {
            assert!(t.check("10.0.0.1", Some("alice")).is_ok());
            t.failed("10.0.0.1", Some("alice"));
        }
        assert!(t.check("10.0.0.1", Some("alice")).is_err());
        // alice from elsewhere, and bob from the same address, go on.
        assert!(t.check("10.0.0.2", Some("alice")).is_ok());
        assert!(t.check("10.0.0.1", Some("bob")).is_ok());
        // Spraying names from one address runs out too.
        for i in 0..WIDE_BURST as usize {
            t.failed("10.0.0.9", Some(&format!("user{i}")));
        }
        assert!(t.check("10.0.0.9", Some("carol")).is_err());
        assert!(t.check("10.0.0.9", None).is_err());
    }
}
