//! Limits that keep one runner, client or tenant from crowding out the others: per-key
//! rate limits, in-flight and occupancy counts, and the quotas the settings give.
//! (Sizes — pages, payloads, batches — are checked where the request is validated;
//! quotas that count rows are checked in the store, in the transaction that adds one.)

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Keys tracked at most; beyond this, keys idle long enough to be full again are
/// forgotten, and if none are, all of them.
const MAX_KEYS: usize = 100_000;

/// Quotas per run and per tenant; 0 means unlimited. See `config::Settings` for each.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quotas {
    pub commands_per_run: i64,
    pub event_bytes_per_run: i64,
    pub tenant_pending_runs: i64,
    pub tenant_watchers: usize,
    /// The largest payload of one event (`--max-payload-bytes`).
    pub payload_bytes: usize,
}

/// How many of something each key holds open, with a most per key.
pub struct Occupancy<K: Eq + Hash + Clone> {
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash + Clone> Default for Occupancy<K> {
    fn default() -> Self {
        Self {
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K: Eq + Hash + Clone> Occupancy<K> {
    /// Takes one place for `key`, held until the guard drops; `None` when `key` already
    /// holds `most` (0: no limit).
    pub fn enter(&self, key: &K, most: usize) -> Option<Occupied<K>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(key.clone()).or_default();
        if most > 0 && *count >= most {
            return None;
        }
        *count += 1;
        Some(Occupied {
            held: self.held.clone(),
            key: key.clone(),
        })
    }
}

/// One place of an [`Occupancy`], given back when dropped.
pub struct Occupied<K: Eq + Hash + Clone> {
    held: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for Occupied<K> {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// A token bucket per key: `burst` calls at once, then one more every `refill`.
pub struct RateLimit<K> {
    refill: Duration,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Eq + Hash> RateLimit<K> {
    pub fn new(refill: Duration, burst: u32) -> Self {
        Self {
            refill: refill.max(Duration::from_micros(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`: false when its bucket is empty (the call is over the limit).
    pub fn admit(&self, key: K) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS {
            let full_after = self.refill.mul_f64(self.burst);
            buckets.retain(|_, b| now.duration_since(b.at) < full_after);
            if buckets.len() >= MAX_KEYS {
                // All busy: forget them all rather than grow without bound (each key
                // starts again with a full bucket).
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let earned = now.duration_since(bucket.at).as_secs_f64() / self.refill.as_secs_f64();
        bucket.tokens = (bucket.tokens + earned).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// At most `permits` calls in flight per key; the rest wait their turn. Meant for keys
/// that are few and long-lived (tenants).
pub struct InFlight<K> {
    permits: usize,
    gates: Mutex<HashMap<K, Arc<Semaphore>>>,
}

impl<K: Eq + Hash> InFlight<K> {
    pub fn new(permits: usize) -> Self {
        Self {
            permits: permits.max(1),
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a turn of `key`; the call is in flight until the permit is dropped.
    pub async fn enter(&self, key: K) -> OwnedSemaphorePermit {
        let gate = {
            let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
            gates
                .entry(key)
                .or_insert_with(|| Arc::new(Semaphore::new(self.permits)))
                .clone()
        };
        gate.acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_waits_for_tokens_others_are_unaffected() {
        let limit = RateLimit::new(Duration::from_secs(3600), 3);
        assert!((0..3).all(|_| limit.admit("a")));
        assert!(!limit.admit("a"));
        assert!(limit.admit("b"));
    }

    #[test]
    fn an_occupancy_is_bounded_per_key_and_freed_on_drop() {
        let watchers = Occupancy::default();
        let first = watchers.enter(&"a", 2).expect("first");
        let _second = watchers.enter(&"a", 2).expect("second");
        assert!(watchers.enter(&"a", 2).is_none());
        assert!(watchers.enter(&"b", 2).is_some());
        drop(first);
        assert!(watchers.enter(&"a", 2).is_some());
    }

    #[test]
    fn tokens_come_back_with_time() {
        let limit = RateLimit::new(Duration::from_millis(1), 1);
        assert!(limit.admit("a"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !limit.admit("a") {
            assert!(Instant::now() < deadline, "no token came back");
            std::thread::yield_now();
        }
    }
}
