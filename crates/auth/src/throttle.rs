//! Failed-login throttling. Failures are counted in buckets that refill
//! over time; while a bucket is empty, sign-ins it covers are refused with
//! a retry time before any password is checked, so guessing is slow and
//! bcrypt's cost cannot be turned against the server. Three buckets apply
//! to each attempt (see [`LoginThrottle`]):
//!
//! - one user name from one address: 10 failures, then one per 6 s (the
//!   guesser);
//! - one user name from any address that has failed for it: 100, then one
//!   a second (guessing from many addresses). An address with no failure
//!   for that name is not held back by it, so guessers elsewhere never lock
//!   a user out of a clean address;
//! - one address for any name: 100, then one a second (spraying names),
//!   loose enough that many clients behind one NAT keep working.
//!
//! IPv6 addresses count by /64 (one host owns a whole /64). A credential
//! verified recently, and a repeated wrong one, are answered from memory
//! before any bucket is consulted (see the authenticator). Buckets are per
//! node (a region of N nodes allows N times as many guesses behind a load
//! balancer that spreads them).

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

    /// Whether `key` has failures that have not refilled yet.
    pub fn has_failed(&self, key: &str) -> bool {
        let now = Instant::now();
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .get(key)
            .is_some_and(|b| self.refill(*b, now).tokens < self.burst)
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
                // Still full of live buckets (an attack from very many
                // addresses): forget the fullest half, the least used up,
                // and keep the emptied ones that throttle someone now.
                let mut levels: Vec<f64> = buckets.values().map(|b| b.tokens).collect();
                levels.sort_by(f64::total_cmp);
                let cut = levels[levels.len() / 2];
                buckets.retain(|_, b| b.tokens < cut);
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

/// The key of a client address: IPv4 as is, IPv6 by its /64.
fn address_key(address: std::net::IpAddr) -> String {
    match address {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl LoginThrottle {
    /// `Err(wait)` if a sign-in as `user` from `address` must wait.
    pub fn check(&self, address: std::net::IpAddr, user: &str) -> Result<(), Duration> {
        let address = address_key(address);
        let pair = format!("{address}\u{0}{user}");
        let mut wait = Duration::ZERO;
        let mut results = vec![self.address.check(&[&address]), self.pair.check(&[&pair])];
        // The user-wide bucket holds back only addresses that have failed
        // for this user: a clean address is never locked out by others.
        if self.pair.has_failed(&pair) {
            results.push(self.user.check(&[user]));
        }
        for result in results {
            if let Err(w) = result {
                wait = wait.max(w);
            }
        }
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    pub fn failed(&self, address: std::net::IpAddr, user: &str) {
        let address = address_key(address);
        self.address.failed(&[&address]);
        self.pair.failed(&[&format!("{address}\u{0}{user}")]);
        self.user.failed(&[user]);
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

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_guesser_holds_up_only_its_own_address_and_name() {
        let t = LoginThrottle::default();
        for _ in 0..BURST as usize {
            assert!(t.check(ip("10.0.0.1"), "alice").is_ok());
            t.failed(ip("10.0.0.1"), "alice");
        }
        assert!(t.check(ip("10.0.0.1"), "alice").is_err());
        // alice from elsewhere, and bob from the same address, go on.
        assert!(t.check(ip("10.0.0.2"), "alice").is_ok());
        assert!(t.check(ip("10.0.0.1"), "bob").is_ok());
        // Spraying names from one address runs out too.
        for i in 0..WIDE_BURST as usize {
            t.failed(ip("10.0.0.9"), &format!("user{i}"));
        }
        assert!(t.check(ip("10.0.0.9"), "carol").is_err());
        // One IPv6 host is one /64.
        for i in 0..BURST as usize {
            t.failed(ip(&format!("2001:db8:1:2::{i:x}")), "dave");
        }
        assert!(t.check(ip("2001:db8:1:2::ffff"), "dave").is_err());
        assert!(t.check(ip("2001:db8:1:3::1"), "dave").is_ok());
    }

    #[test]
    fn guessers_everywhere_do_not_lock_a_clean_address_out() {
        let t = LoginThrottle::default();
        // The user-wide bucket emptied from many addresses...
        for i in 0..(WIDE_BURST as usize + 10) {
            t.failed(ip(&format!("10.1.{}.{}", i / 250, i % 250)), "erin");
        }
        // ...holds back those addresses, not a new one.
        assert!(t.check(ip("10.1.0.1"), "erin").is_err());
        assert!(t.check(ip("192.0.2.1"), "erin").is_ok());
    }
}
