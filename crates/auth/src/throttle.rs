//! Failed-login throttling. Each attempt takes a token from buckets that
//! refill over time, and gets it back if it succeeds, so only failures use
//! them up; taking happens before any password is checked, so attempts sent
//! all at once are held back like attempts sent one by one, and bcrypt's
//! cost cannot be turned against the server. A sign-in takes from three
//! buckets (see [`LoginThrottle`]):
//!
//! - one user name from one address: 10 failures, then one per 6 s (the
//!   guesser);
//! - one user name from any address: 100, then one a second (guessing from
//!   many addresses), except from addresses where that user signed in
//!   successfully in the last day: someone guessing elsewhere does not lock
//!   a user out of where they work;
//! - one address for any name: 100, then one a second (spraying names),
//!   loose enough that many clients behind one NAT keep working.
//!
//! IPv6 addresses count by /64 (one host owns a whole /64). A credential
//! verified recently, and a repeated wrong one, are answered from memory
//! before any bucket (see the authenticator). Buckets are per node (a
//! region of N nodes allows N times as many guesses behind a load balancer
//! that spreads them).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures of one user name from one address before throttling.
pub const BURST: f64 = 10.0;
pub const REFILL: Duration = Duration::from_secs(6);
/// Failures of one user name, or from one address, before throttling.
pub const WIDE_BURST: f64 = 100.0;
pub const WIDE_REFILL: Duration = Duration::from_secs(1);
/// How long a successful sign-in exempts its address from the user-wide
/// bucket.
pub const TRUSTED_FOR: Duration = Duration::from_secs(24 * 3600);
/// Entries kept per map; past this, the least interesting are dropped.
const MAX_ENTRIES: usize = 65_536;

#[derive(Clone, Copy)]
struct Bucket {
    /// Attempts that may still fail now.
    tokens: f64,
    updated: Instant,
}

/// Token buckets by key, all of one size and rate.
pub struct Throttle {
    buckets: Mutex<HashMap<String, Bucket>>,
    burst: f64,
    refill: Duration,
}

impl Throttle {
    pub fn new(burst: f64, refill: Duration) -> Throttle {
        Throttle {
            buckets: Mutex::new(HashMap::new()),
            burst,
            refill,
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> Bucket {
        let gained = now.duration_since(b.updated).as_secs_f64() / self.refill.as_secs_f64();
        Bucket {
            tokens: (b.tokens + gained).min(self.burst),
            updated: now,
        }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is
    /// there.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= MAX_ENTRIES {
            self.shrink(&mut buckets, now);
        }
        let full = Bucket {
            tokens: self.burst,
            updated: now,
        };
        let bucket = buckets.entry(key.to_string()).or_insert(full);
        let mut b = self.refilled(*bucket, now);
        if b.tokens < 1.0 {
            *bucket = b;
            return Err(self.refill.mul_f64(1.0 - b.tokens));
        }
        b.tokens -= 1.0;
        *bucket = b;
        Ok(())
    }

    /// Returns a token taken for an attempt that succeeded.
    pub fn give_back(&self, key: &str) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(key) {
            let mut b = self.refilled(*bucket, now);
            b.tokens = (b.tokens + 1.0).min(self.burst);
            *bucket = b;
        }
    }

    /// Full buckets are forgotten first; if the map is still full of live
    /// ones (an attack from very many addresses), the fullest half, those
    /// least used up, while the emptied ones keep throttling.
    fn shrink(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        buckets.retain(|_, b| self.refilled(*b, now).tokens < self.burst);
        if buckets.len() >= MAX_ENTRIES {
            let mut levels: Vec<f64> = buckets.values().map(|b| b.tokens).collect();
            levels.sort_by(f64::total_cmp);
            let cut = levels[levels.len() / 2];
            buckets.retain(|_, b| b.tokens < cut);
        }
    }
}

/// The key of a client address: IPv4 as is, IPv6 by its /64.
fn address_key(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The buckets of a sign-in attempt.
pub struct LoginThrottle {
    pair: Throttle,
    user: Throttle,
    address: Throttle,
    /// user and address where that user signed in, and when.
    trusted: Mutex<HashMap<String, Instant>>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            pair: Throttle::new(BURST, REFILL),
            user: Throttle::new(WIDE_BURST, WIDE_REFILL),
            address: Throttle::new(WIDE_BURST, WIDE_REFILL),
            trusted: Mutex::new(HashMap::new()),
        }
    }
}

/// An attempt that took its tokens; [`LoginThrottle::succeeded`] returns
/// them, a failure keeps them taken.
#[must_use]
pub struct Attempt {
    address: String,
    pair: String,
    user: Option<String>,
}

impl LoginThrottle {
    fn trusted(&self, pair: &str) -> bool {
        let trusted = self.trusted.lock().unwrap_or_else(|p| p.into_inner());
        trusted
            .get(pair)
            .is_some_and(|since| since.elapsed() < TRUSTED_FOR)
    }

    /// Starts a sign-in as `user` from `address`: `Err(wait)` if it must
    /// wait.
    pub fn begin(&self, address: IpAddr, user: &str) -> Result<Attempt, Duration> {
        let address = address_key(address);
        let pair = format!("{address}\u{0}{user}");
        self.address.take(&address)?;
        if let Err(wait) = self.pair.take(&pair) {
            self.address.give_back(&address);
            return Err(wait);
        }
        let user = if self.trusted(&pair) {
            None
        } else {
            if let Err(wait) = self.user.take(user) {
                self.address.give_back(&address);
                self.pair.give_back(&pair);
                return Err(wait);
            }
            Some(user.to_string())
        };
        Ok(Attempt {
            address,
            pair,
            user,
        })
    }

    /// The attempt succeeded: its tokens come back, and its address is
    /// trusted for its user.
    pub fn succeeded(&self, attempt: Attempt) {
        self.address.give_back(&attempt.address);
        self.pair.give_back(&attempt.pair);
        if let Some(user) = &attempt.user {
            self.user.give_back(user);
        }
        let mut trusted = self.trusted.lock().unwrap_or_else(|p| p.into_inner());
        if trusted.len() >= MAX_ENTRIES {
            trusted.retain(|_, since| since.elapsed() < TRUSTED_FOR);
            if trusted.len() >= MAX_ENTRIES {
                let mut ages: Vec<Instant> = trusted.values().copied().collect();
                ages.sort();
                let cut = ages[ages.len() / 2];
                trusted.retain(|_, since| *since >= cut);
            }
        }
        trusted.insert(attempt.pair, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failures_use_up_buckets_successes_do_not() {
        let t = Throttle::new(3.0, Duration::from_millis(200));
        for _ in 0..3 {
            assert!(t.take("a").is_ok());
        }
        let wait = t.take("a").unwrap_err();
        assert!(wait <= Duration::from_millis(200) && wait > Duration::ZERO);
        assert!(t.take("b").is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(t.take("a").is_ok());
        // Given back, a success costs nothing.
        for _ in 0..10 {
            assert!(t.take("c").is_ok());
            t.give_back("c");
        }
    }

    #[test]
    fn attempts_sent_at_once_are_held_back_like_sequential_ones() {
        let t = LoginThrottle::default();
        // Ten attempts begun before any finished: the eleventh waits.
        let attempts: Vec<Attempt> = (0..BURST as usize)
            .map(|_| t.begin(ip("10.0.0.1"), "alice").unwrap())
            .collect();
        assert!(t.begin(ip("10.0.0.1"), "alice").is_err());
        drop(attempts);
        // alice from elsewhere, and bob from the same address, go on.
        assert!(t.begin(ip("10.0.0.2"), "alice").is_ok());
        assert!(t.begin(ip("10.0.0.1"), "bob").is_ok());
        // One IPv6 host is one /64.
        for i in 0..BURST as usize {
            let _ = t
                .begin(ip(&format!("2001:db8:1:2::{i:x}")), "dave")
                .unwrap();
        }
        assert!(t.begin(ip("2001:db8:1:2::ffff"), "dave").is_err());
        assert!(t.begin(ip("2001:db8:1:3::1"), "dave").is_ok());
    }

    #[test]
    fn spraying_names_from_one_address_runs_out() {
        let t = LoginThrottle::default();
        for i in 0..WIDE_BURST as usize {
            let _ = t.begin(ip("10.0.0.9"), &format!("user{i}")).unwrap();
        }
        assert!(t.begin(ip("10.0.0.9"), "carol").is_err());
    }

    #[test]
    fn guessing_from_many_addresses_is_bounded_but_not_where_the_user_works() {
        let t = LoginThrottle::default();
        // erin signs in from her desk once.
        let attempt = t.begin(ip("192.0.2.1"), "erin").unwrap();
        t.succeeded(attempt);
        // Guessers from many addresses, one attempt each (no address bucket
        // ever empties): the user-wide bucket stops them.
        let mut refused = false;
        for i in 0..(WIDE_BURST as usize + 10) {
            if t.begin(ip(&format!("10.1.{}.{}", i / 250, i % 250)), "erin")
                .is_err()
            {
                refused = true;
            }
        }
        assert!(refused, "the user-wide bucket ran out");
        assert!(t.begin(ip("198.51.100.7"), "erin").is_err());
        // erin's desk is not held back.
        assert!(t.begin(ip("192.0.2.1"), "erin").is_ok());
    }
}
