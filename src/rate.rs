//! Upgrade rate limits: a token bucket of new upgrades per client, to damp
//! reconnect storms that concurrency limits alone let through (a client that
//! reconnects as fast as its streams end never exceeds its concurrency).
//!
//! A bucket that has refilled completely holds no information, so it is
//! forgotten by [`RateTable::sweep`]: memory follows active clients only.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 16;

/// New upgrades allowed per client: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When the bucket will be full again, so `sweep` can drop it.
    full_at: Instant,
}

/// The answer of [`RateTable::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateTaken {
    Yes,
    /// The client's bucket is empty.
    Empty,
    /// The client has no bucket and the table is at its cap.
    Full,
}

/// Token buckets keyed by client.
#[derive(Debug)]
pub struct RateTable {
    shards: Box<[Mutex<HashMap<IpAddr, Bucket>>]>,
    hasher: std::collections::hash_map::RandomState,
    tracked: AtomicUsize,
}

impl Default for RateTable {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            tracked: AtomicUsize::new(0),
        }
    }
}

impl RateTable {
    /// Takes one token for `client`. A new client needs room among at most
    /// `max_keys` buckets.
    pub fn take(&self, client: IpAddr, rate: Rate, now: Instant, max_keys: usize) -> RateTaken {
        let i = self.hasher.hash_one(client) as usize & (SHARDS - 1);
        let mut shard = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
        let burst = f64::from(rate.burst.max(1));
        if !shard.contains_key(&client) {
            let room = self
                .tracked
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max_keys).then_some(n + 1)
                });
            if room.is_err() {
                return RateTaken::Full;
            }
        }
        let bucket = shard.entry(client).or_insert(Bucket {
            tokens: burst,
            at: now,
            full_at: now,
        });

        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * rate.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        let taken = bucket.tokens >= 1.0;
        if taken {
            bucket.tokens -= 1.0;
        }
        let missing = (burst - bucket.tokens) / rate.per_second.max(f64::MIN_POSITIVE);
        bucket.full_at = now + Duration::try_from_secs_f64(missing).unwrap_or(Duration::MAX / 2);
        if taken {
            RateTaken::Yes
        } else {
            RateTaken::Empty
        }
    }

    /// Forgets every bucket that is full again by `now`.
    pub fn sweep(&self, now: Instant) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = shard.len();
            shard.retain(|_, b| b.full_at > now);
            self.tracked
                .fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    /// Clients with a bucket that is not full.
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn a_burst_then_the_rate() {
        let table = RateTable::default();
        let rate = Rate {
            per_second: 2.0,
            burst: 3,
        };
        let t0 = Instant::now();
        let take = |n, at| table.take(ip(n), rate, at, 100);
        let taken = (0..10).filter(|_| take(1, t0) == RateTaken::Yes).count();
        assert_eq!(taken, 3);

        // Half a second refills one token at 2/s.
        assert_eq!(take(1, t0 + Duration::from_millis(500)), RateTaken::Yes);
        assert_eq!(take(1, t0 + Duration::from_millis(600)), RateTaken::Empty);
        // Other clients have their own bucket, while there is room for one.
        assert_eq!(take(2, t0), RateTaken::Yes);
        assert_eq!(table.take(ip(3), rate, t0, 2), RateTaken::Full);
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let table = RateTable::default();
        let rate = Rate {
            per_second: 10.0,
            burst: 5,
        };
        let t0 = Instant::now();
        for n in 0..50 {
            assert_eq!(table.take(ip(n), rate, t0, 1000), RateTaken::Yes);
        }
        assert_eq!(table.tracked(), 50);
        table.sweep(t0 + Duration::from_millis(50));
        assert_eq!(table.tracked(), 50, "not yet refilled");
        table.sweep(t0 + Duration::from_millis(150));
        assert_eq!(table.tracked(), 0);
    }
}
