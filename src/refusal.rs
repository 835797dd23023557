//! What a refused client is told, and the rate-limited log line of each
//! refusal (a flood of refusals must not fill a disk).

use crate::admission::Scope;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The response to an upgrade over a limit: the route's status (503 by
/// default), `Retry-After`, a short body naming the full scope, and
/// `Connection: close`.
pub fn response(
    status: http::StatusCode,
    retry_after: Duration,
    route: &str,
    scope: Scope,
) -> (ResponseHeader, Bytes) {
    let body = Bytes::from(format!(
        "wsgate: {} limit reached on route {route}\n",
        scope.as_str()
    ));
    // Retry-After is whole seconds; round up so a client never retries early.
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);

    let mut head = ResponseHeader::build(status, Some(5)).expect("static status");
    let headers = [
        ("retry-after", secs.to_string()),
        ("content-type", "text/plain; charset=utf-8".to_string()),
        ("content-length", body.len().to_string()),
        ("cache-control", "no-store".to_string()),
        ("connection", "close".to_string()),
    ];
    for (name, value) in headers {
        head.insert_header(name, value).expect("valid header");
    }
    (head, body)
}

/// `base` plus a random share of `jitter`, so clients refused together do
/// not all come back in the same second.
pub fn retry_after(base: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    base + jitter.mul_f64(fastrand::f64())
}

/// A token bucket in front of the refusal log: `rate` lines per second with a
/// burst of the same size; what it drops is counted and reported on the next
/// line that gets through.
pub struct RejectionLog {
    bucket: Mutex<Bucket>,
    suppressed: AtomicU64,
}

struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RejectionLog {
    pub fn new(rate: u32) -> Self {
        Self {
            bucket: Mutex::new(Bucket {
                rate: f64::from(rate),
                tokens: f64::from(rate),
                last: Instant::now(),
            }),
            suppressed: AtomicU64::new(0),
        }
    }

    pub fn set_rate(&self, rate: u32) {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        b.rate = f64::from(rate);
    }

    /// Returns `Some(dropped since the last line)` when this refusal may be
    /// logged, `None` when it must be dropped.
    pub fn admit_line(&self) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * b.rate;
        b.tokens = (b.tokens + refill).min(b.rate.max(1.0));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_the_scope_and_rounds_retry_after_up() {
        let (head, body) = response(
            http::StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(1500),
            "rooms",
            Scope::Key,
        );
        assert_eq!(head.status, 503);
        assert_eq!(head.headers["retry-after"], "2");
        assert_eq!(head.headers["connection"], "close");
        assert_eq!(&body[..], b"wsgate: key limit reached on route rooms\n");
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let base = Duration::from_secs(5);
        assert_eq!(retry_after(base, Duration::ZERO), base);
        let spread = Duration::from_secs(10);
        let seen: Vec<Duration> = (0..200).map(|_| retry_after(base, spread)).collect();
        assert!(seen.iter().all(|d| *d >= base && *d <= base + spread));
        let distinct: std::collections::HashSet<u64> = seen.iter().map(|d| d.as_secs()).collect();
        assert!(distinct.len() > 3, "no spread: {distinct:?}");
    }

    #[test]
    fn the_log_drops_past_its_burst_and_reports_what_it_dropped() {
        let log = RejectionLog::new(3);
        let passed = (0..100).filter(|_| log.admit_line().is_some()).count();
        assert!((3..=4).contains(&passed), "{passed}");

        let mut b = log.bucket.lock().unwrap();
        b.last -= Duration::from_secs(1);
        drop(b);
        let dropped = log.admit_line().expect("refilled");
        assert!(dropped >= 96, "{dropped}");
    }
}
