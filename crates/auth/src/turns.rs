//! One check per key at a time: callers presenting the same credential
//! while it is being checked wait for that check, then find its answer in
//! memory, instead of each paying for it (and each taking a throttle
//! token, so that a client opening many connections at once would lock
//! itself out).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Keys being checked, each with the lock its checker holds.
pub struct Turns<K> {
    locks: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for Turns<K> {
    fn default() -> Self {
        Turns {
            locks: Mutex::new(HashMap::new()),
        }
    }
}

/// The right to check a key; dropping it lets the next caller in.
pub struct Turn<'a, K: Eq + Hash + Clone> {
    turns: &'a Turns<K>,
    key: K,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> Turns<K> {
    /// Waits until no one else is checking `key`.
    pub async fn turn(&self, key: K) -> Turn<'_, K> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        // Made before waiting, so that a caller that gives up while waiting
        // still tidies the map.
        let mut turn = Turn {
            turns: self,
            key,
            lock: Some(lock.clone()),
            guard: None,
        };
        turn.guard = Some(lock.lock_owned().await);
        turn
    }

    /// Keys with a check running or waiting.
    pub fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash + Clone> Drop for Turn<'_, K> {
    fn drop(&mut self) {
        self.guard = None;
        let mut locks = self.turns.locks.lock().unwrap_or_else(|p| p.into_inner());
        self.lock = None;
        // Copies are taken from the map under its lock, or from a copy a
        // live turn holds; so a count of one here, with this turn's copy
        // gone, means no one else holds or waits for this key.
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_check_per_key_at_a_time_and_the_map_empties() {
        let turns = Arc::new(Turns::<u8>::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (turns, inside, most) = (turns.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    let _turn = turns.turn(i % 2).await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // Two keys: at most two checks at once, never two of one key.
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_waiting_leaves_nothing_behind() {
        let turns = Turns::<u8>::default();
        let first = turns.turn(1).await;
        let mut waiting = Box::pin(turns.turn(1));
        let polled = tokio::time::timeout(Duration::from_millis(20), &mut waiting).await;
        assert!(polled.is_err(), "the second waits while the first checks");
        // The holder leaves first, then the waiter gives up before it runs
        // again: the entry must still go.
        drop(first);
        drop(waiting);
        assert!(turns.is_empty());
        let _again = turns.turn(1).await;
        assert_eq!(turns.len(), 1);
    }
}
