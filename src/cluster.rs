//! The fleet: stream counts shared by every wsgate instance through Redis,
//! so each limit holds across all of them.
//!
//! The local [`AdmissionTable`] stays the record of what this instance
//! holds; this module mirrors it into Redis and asks Redis before admitting.
//!
//! Layout in Redis (every key starts with `{prefix}:`, one hash tag):
//! - one HASH per counter (route total, route key, route client, global
//!   client): field = instance id, value = that instance's live streams;
//! - `leases`, a ZSET: member = instance id, score = when its lease ends
//!   (milliseconds of Redis's own clock);
//! - `held:{id}`, a SET per instance of the counters it has a field in, so
//!   an expired instance's fields can all be removed.
//!
//! Invariants:
//! - a counter's fleet-wide count is the sum of the fields of instances
//!   whose lease has not run out; admission compares and increments all of
//!   an upgrade's counters in one script, so two instances never both take
//!   the last slot;
//! - the ledger (counter → streams this instance holds there) changes only
//!   together with the Redis call that mirrors it, under the read side of
//!   `gate`; a resync rewrites Redis from the ledger under the write side,
//!   so no delta is in flight while absolute counts are written;
//! - whenever Redis may disagree with the ledger (a call failed or timed
//!   out, a stream was admitted by the fallback policy, the lease was lost),
//!   the instance is marked dirty and the next upkeep rewrites its counts:
//!   absolute values, so nothing is given back twice or never.
//!
//! A background task ([`FleetService`]) renews the lease every third of it
//! for as long as the process runs and sends releases, which a permit's
//! `Drop` queues. When Redis cannot answer within the call timeout, the
//! configured policy (`local`, `open`, `closed`) decides the upgrade.

use crate::admission::{Admission, AdmissionTable, Ask, Permit, RouteSlots, Scope};
use crate::config::{Cluster, Unreachable};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, RwLock, RwLockWriteGuard};

/// How long after a failed call (or connection attempt) upgrades skip
/// Redis and go straight to the fallback policy, so an outage does not cost
/// every upgrade a call timeout. The first upgrade after it tries again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Releases sent to Redis in one call, at most.
const RELEASE_BATCH: usize = 512;

/// Helpers every script shares.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Frees every slot of the instances whose lease has run out.
local function reap(leases, held_prefix, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', '(' .. now)) do
    local held = held_prefix .. id
    for _, key in ipairs(redis.call('SMEMBERS', held)) do
      redis.call('HDEL', key, id)
    end
    redis.call('DEL', held)
    redis.call('ZREM', leases, id)
  end
end
-- A counter's live count: the fields of instances holding a lease.
local function count(leases, key, now)
  local sum = 0
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    local expiry = redis.call('ZSCORE', leases, all[j])
    if expiry and tonumber(expiry) >= now then
      sum = sum + tonumber(all[j + 1])
    else
      redis.call('HDEL', key, all[j])
    end
  end
  return sum
end
"#;

/// KEYS: leases, my held set, counters. ARGV: me, lease ms, force (1: count
/// but never refuse), held prefix, one limit per counter (0: unlimited).
/// Returns {1, full}: taken (`full` names the counter a refusal would have
/// named, 0 for none); {0, full}: refused; {-1, 0}: this instance has no
/// live lease and must resync first.
const ADMIT: &str = r#"
local now = now_ms()
local me = ARGV[1]
local mine = redis.call('ZSCORE', KEYS[1], me)
if not mine or tonumber(mine) < now then return {-1, 0} end
reap(KEYS[1], ARGV[4], now)
local full = 0
for i = 3, #KEYS do
  local limit = tonumber(ARGV[i + 2])
  if full == 0 and limit > 0 and count(KEYS[1], KEYS[i], now) >= limit then full = i - 2 end
end
if full > 0 and ARGV[3] ~= '1' then return {0, full} end
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], me, 1)
  redis.call('SADD', KEYS[2], KEYS[i])
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), me)
return {1, full}
"#;

/// KEYS: my held set, counters. ARGV: me, one amount per counter.
const RELEASE: &str = r#"
for i = 2, #KEYS do
  local left = redis.call('HINCRBY', KEYS[i], ARGV[1], -tonumber(ARGV[i]))
  if left <= 0 then
    redis.call('HDEL', KEYS[i], ARGV[1])
    redis.call('SREM', KEYS[1], KEYS[i])
  end
end
return 1
"#;

/// KEYS: leases. ARGV: me, lease ms, held prefix. 1: renewed; 0: the lease
/// is gone (expired or Redis lost it) and the instance must resync.
const RENEW: &str = r#"
local now = now_ms()
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not mine or tonumber(mine) < now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
reap(KEYS[1], ARGV[3], now)
return 1
"#;

/// KEYS: leases, my held set. ARGV: me, lease ms, held prefix, then pairs
/// of counter and this instance's absolute count there.
const RESYNC: &str = r#"
local now = now_ms()
local me = ARGV[1]
local keep = {}
for i = 4, #ARGV, 2 do keep[ARGV[i]] = true end
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not keep[key] then redis.call('HDEL', key, me) end
end
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', ARGV[i], me, ARGV[i + 1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), me)
reap(KEYS[1], ARGV[3], now)
return 1
"#;

/// KEYS: leases, counters. Returns the number of live instances, then each
/// counter's fleet-wide count.
const COUNT: &str = r#"
local now = now_ms()
local out = {redis.call('ZCOUNT', KEYS[1], now, '+inf')}
for i = 2, #KEYS do out[#out + 1] = count(KEYS[1], KEYS[i], now) end
return out
"#;

/// Why a Redis call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("not connected (a recent call failed; retrying shortly)")]
    NotConnected,
}

/// Redis calls, for the round-trip histogram's label.
#[derive(Debug, Clone, Copy)]
enum Op {
    Admit,
    Release,
    Renew,
    Resync,
    Count,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Admit => "admit",
            Op::Release => "release",
            Op::Renew => "renew",
            Op::Resync => "resync",
            Op::Count => "count",
        }
    }
}

/// Redis's answer to one upgrade.
enum Answer {
    /// Taken; a refusal would have named this counter (dry run).
    Taken(Option<usize>),
    /// The counter at this index is full; nothing was taken.
    Full(usize),
    /// This instance's lease is gone: resync, then ask again.
    LeaseLost,
}

struct Metrics {
    up: IntGauge,
    rtt: HistogramVec,
    fallbacks: IntCounterVec,
    held: IntGauge,
}

impl Metrics {
    fn new(registry: &Registry) -> Self {
        let up = IntGauge::new(
            "wsgate_cluster_up",
            "1 while the fleet's Redis answers in time, 0 while the fallback policy applies.",
        )
        .expect("valid metric");
        let rtt = HistogramVec::new(
            HistogramOpts::new(
                "wsgate_cluster_redis_seconds",
                "Round-trip time of calls to the fleet's Redis, by operation.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "wsgate_cluster_fallbacks_total",
                "Upgrades decided by the fallback policy because Redis could not be reached.",
            ),
            &["policy"],
        )
        .expect("valid metric");
        let held = IntGauge::new(
            "wsgate_cluster_slots_held",
            "Streams this instance holds in the fleet's counts.",
        )
        .expect("valid metric");
        for c in [
            Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rtt.clone()),
            Box::new(fallbacks.clone()),
            Box::new(held.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for policy in ["local", "open", "closed"] {
            fallbacks.with_label_values(&[policy]);
        }
        Self {
            up,
            rtt,
            fallbacks,
            held,
        }
    }
}

/// The connection, made on first use and remade after a failure.
#[derive(Default)]
struct Connection {
    manager: Option<ConnectionManager>,
    last_attempt: Option<Instant>,
}

/// One instance's side of the fleet's shared counts.
pub struct Fleet {
    settings: Cluster,
    client: redis::Client,
    connection: Mutex<Connection>,
    admit: Script,
    release: Script,
    renew: Script,
    resync: Script,
    count: Script,
    leases_key: String,
    held_prefix: String,
    held_key: String,
    /// Counter → streams this instance holds there: what Redis should show.
    ledger: Mutex<HashMap<Arc<str>, u32>>,
    /// Read: a call that changes Redis by a delta, with its ledger change.
    /// Write: a resync, which writes absolute counts.
    gate: RwLock<()>,
    /// Redis may disagree with the ledger; the next upkeep resyncs.
    dirty: AtomicBool,
    up: AtomicBool,
    /// Until when upgrades skip Redis after a failed call.
    skip_until: Mutex<Option<Instant>>,
    /// Wakes the upkeep task when Redis answers again with counts owed.
    wake: Notify,
    /// Successful resyncs so far: upgrades that found the lease lost at the
    /// same time resync once between them, not once each.
    resyncs: AtomicU64,
    releases: mpsc::UnboundedSender<Vec<Arc<str>>>,
    pending: Mutex<Option<mpsc::UnboundedReceiver<Vec<Arc<str>>>>>,
    metrics: Metrics,
}

/// Marks the instance dirty when dropped: forgotten once a call has
/// settled, so only a cancelled call leaves its mark.
struct MarkDirty<'a>(&'a AtomicBool);

impl Drop for MarkDirty<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One stream's slots in the fleet's counts. Dropping it queues their
/// release; the upkeep task sends it (a `Drop` never waits on the network).
#[derive(Debug)]
pub struct Hold {
    counters: Vec<Arc<str>>,
    releases: mpsc::UnboundedSender<Vec<Arc<str>>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Fails only once the fleet task has ended with the process; the
        // lease then frees the slots.
        let _ = self.releases.send(std::mem::take(&mut self.counters));
    }
}

impl Fleet {
    /// Sets up the fleet side; nothing is connected until first use.
    pub fn new(settings: Cluster, registry: &Registry) -> Result<Arc<Self>, StoreError> {
        let client = redis::Client::open(settings.redis.as_str())?;
        let p = &settings.key_prefix;
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        let (releases, pending) = mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            client,
            connection: Mutex::new(Connection::default()),
            admit: script(ADMIT),
            release: script(RELEASE),
            renew: script(RENEW),
            resync: script(RESYNC),
            count: script(COUNT),
            leases_key: format!("{{{p}}}:leases"),
            held_prefix: format!("{{{p}}}:held:"),
            held_key: format!("{{{p}}}:held:{}", settings.instance_id),
            ledger: Mutex::new(HashMap::new()),
            gate: RwLock::new(()),
            dirty: AtomicBool::new(true),
            up: AtomicBool::new(false),
            skip_until: Mutex::new(None),
            wake: Notify::new(),
            resyncs: AtomicU64::new(0),
            releases,
            pending: Mutex::new(Some(pending)),
            metrics: Metrics::new(registry),
            settings,
        }))
    }

    /// Completes a local admission fleet-wide: Redis takes the same slots
    /// across all instances, or names the full scope, in which case the
    /// local slots are given back. When Redis cannot answer in time, the
    /// policy decides.
    pub async fn admit(
        &self,
        table: &AdmissionTable,
        route: &str,
        slots: &Arc<RouteSlots>,
        ask: &Ask<'_>,
        local: Admission,
    ) -> Admission {
        let Admission::Admitted {
            mut permit,
            would_refuse,
        } = local
        else {
            return local;
        };
        let counters = self.counters(route, &permit, ask);
        let resyncs = self.resyncs.load(Ordering::Acquire);
        let answer = match self.take(&counters, ask.dry_run).await {
            Ok(Answer::LeaseLost) => {
                self.resync_unless_done_since(resyncs).await;
                self.take(&counters, ask.dry_run).await
            }
            other => other,
        };
        match answer {
            Ok(Answer::Taken(full)) => {
                let fleet_full = full.map(|i| counters[i].1);
                permit.attach(self.hold(counters.into_iter().map(|c| c.0).collect()));
                Admission::Admitted {
                    permit,
                    would_refuse: would_refuse.or(fleet_full),
                }
            }
            Ok(Answer::Full(i)) => Admission::Refused(counters[i].1),
            Ok(Answer::LeaseLost) | Err(_) => {
                self.fallback(table, route, slots, ask, (permit, would_refuse))
            }
        }
    }

    /// The counters one permit holds, with their limit (0: none) and scope,
    /// narrowest first like the local table.
    fn counters(&self, route: &str, permit: &Permit, ask: &Ask<'_>) -> Vec<(Arc<str>, Scope, u32)> {
        let p = &self.settings.key_prefix;
        let held = permit.held();
        let mut out = Vec::with_capacity(4);
        if let Some(client) = held.global_client {
            let key = format!("{{{p}}}:g:{client}");
            out.push((key, Scope::GlobalClient, ask.global_per_client));
        }
        if let Some(client) = held.client {
            let key = format!("{{{p}}}:c:{route}:{client}");
            out.push((key, Scope::Client, ask.limits.per_client));
        }
        if let Some(k) = held.key {
            out.push((
                format!("{{{p}}}:k:{route}:{k}"),
                Scope::Key,
                ask.limits.per_key,
            ));
        }
        out.push((format!("{{{p}}}:r:{route}"), Scope::Route, ask.limits.total));
        out.into_iter()
            .map(|(key, scope, limit)| (Arc::from(key), scope, limit.unwrap_or(0)))
            .collect()
    }
}

impl Fleet {
    /// Asks Redis for one slot in every counter, in one script call; on
    /// success the ledger counts them before the gate is let go.
    async fn take(
        &self,
        counters: &[(Arc<str>, Scope, u32)],
        force: bool,
    ) -> Result<Answer, StoreError> {
        let skip = *self.skip_until.lock().unwrap_or_else(|e| e.into_inner());
        if skip.is_some_and(|until| Instant::now() < until) {
            return Err(StoreError::NotConnected);
        }
        let _gate = self.gate.read().await;
        let mut call = self.admit.prepare_invoke();
        call.key(&self.leases_key).key(&self.held_key);
        for (key, _, _) in counters {
            call.key(key.as_ref());
        }
        call.arg(&self.settings.instance_id)
            .arg(self.lease_ms())
            .arg(if force { "1" } else { "0" })
            .arg(&self.held_prefix);
        for (_, _, limit) in counters {
            call.arg(*limit);
        }
        // An upgrade dropped while its script is in flight (its task
        // cancelled) may leave a slot in Redis that the ledger never saw.
        let unsettled = MarkDirty(&self.dirty);
        let (status, full): (i64, usize) = self.call(Op::Admit, &call).await?;
        std::mem::forget(unsettled);
        // `full` is 1-based over the counters; 0 names none.
        let full_at = full.checked_sub(1).filter(|i| *i < counters.len());
        match status {
            1 => {
                self.count_in(counters.iter().map(|c| &c.0));
                Ok(Answer::Taken(full_at))
            }
            0 => Ok(Answer::Full(full_at.unwrap_or(counters.len() - 1))),
            _ => Ok(Answer::LeaseLost),
        }
    }

    /// The answer while Redis cannot be reached, per the configured policy.
    /// Dry-run routes are still never refused.
    fn fallback(
        &self,
        table: &AdmissionTable,
        route: &str,
        slots: &Arc<RouteSlots>,
        ask: &Ask<'_>,
        (permit, would_refuse): (Permit, Option<Scope>),
    ) -> Admission {
        let policy = self.settings.when_unreachable;
        self.metrics
            .fallbacks
            .with_label_values(&[policy.as_str()])
            .inc();
        let (mut permit, would_refuse) = match policy {
            Unreachable::Open => (permit, would_refuse),
            Unreachable::Closed if !ask.dry_run => {
                return Admission::Refused(Scope::ClusterUnavailable)
            }
            Unreachable::Closed => (permit, Some(Scope::ClusterUnavailable)),
            Unreachable::Local => {
                // Give the slots back and take them again under this
                // instance's share of each limit. The rate was spent once
                // already, so it is not asked again.
                drop(permit);
                match table.admit(slots, &self.share(ask)) {
                    Admission::Admitted {
                        permit,
                        would_refuse: w,
                    } => (permit, would_refuse.or(w)),
                    refused => return refused,
                }
            }
        };
        let counters = self.counters(route, &permit, ask);
        permit.attach(self.hold_unregistered(counters));
        Admission::Admitted {
            permit,
            would_refuse,
        }
    }

    /// `ask` with every limit cut to this instance's share: the limit over
    /// the fleet's size, rounded down so the fleet stays within it, and at
    /// least 1 so a small limit still admits.
    fn share<'a>(&self, ask: &Ask<'a>) -> Ask<'a> {
        let n = self.settings.instances.max(1);
        let cut = |limit: Option<u32>| limit.map(|l| (l / n).max(1));
        let mut share = *ask;
        share.limits.total = cut(ask.limits.total);
        share.limits.per_key = cut(ask.limits.per_key);
        share.limits.per_client = cut(ask.limits.per_client);
        share.global_per_client = cut(ask.global_per_client);
        share.rate = None;
        share.global_rate = None;
        share
    }

    fn hold(&self, counters: Vec<Arc<str>>) -> Hold {
        self.metrics.held.inc();
        Hold {
            counters,
            releases: self.releases.clone(),
        }
    }

    /// A hold admitted without Redis: counted in the ledger, and written
    /// to Redis by the next resync.
    fn hold_unregistered(&self, counters: Vec<(Arc<str>, Scope, u32)>) -> Hold {
        let counters: Vec<Arc<str>> = counters.into_iter().map(|c| c.0).collect();
        self.count_in(counters.iter());
        self.dirty.store(true, Ordering::Release);
        self.hold(counters)
    }

    fn count_in<'a>(&self, counters: impl Iterator<Item = &'a Arc<str>>) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        for key in counters {
            *ledger.entry(key.clone()).or_insert(0) += 1;
        }
    }

    fn lease_ms(&self) -> u64 {
        self.settings.lease.as_millis() as u64
    }
}

impl Fleet {
    /// Gives back released slots: the ledger and Redis, together.
    async fn release(&self, batch: Vec<Vec<Arc<str>>>) {
        let mut amounts: HashMap<Arc<str>, u32> = HashMap::new();
        for counters in &batch {
            self.metrics.held.dec();
            for key in counters {
                *amounts.entry(key.clone()).or_insert(0) += 1;
            }
        }
        let _gate = self.gate.read().await;
        {
            let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            for (key, n) in &amounts {
                if let Some(count) = ledger.get_mut(key) {
                    *count = count.saturating_sub(*n);
                    if *count == 0 {
                        ledger.remove(key);
                    }
                }
            }
        }
        let mut call = self.release.prepare_invoke();
        call.key(&self.held_key);
        for key in amounts.keys() {
            call.key(key.as_ref());
        }
        call.arg(&self.settings.instance_id);
        for n in amounts.values() {
            call.arg(*n);
        }
        // On failure `call` marks the instance dirty, and the resync writes
        // the ledger's counts, which already left these slots out.
        let _ = self.call::<i64>(Op::Release, &call).await;
    }

    /// Rewrites this instance's counts in Redis from the ledger and renews
    /// its lease: after Redis lost them (restart, expiry) or may disagree.
    async fn resync(&self) {
        let gate = self.gate.write().await;
        self.resync_locked(gate).await;
    }

    /// Resyncs unless one succeeded after `seen` resyncs had.
    async fn resync_unless_done_since(&self, seen: u64) {
        let gate = self.gate.write().await;
        if self.resyncs.load(Ordering::Acquire) == seen {
            self.resync_locked(gate).await;
        }
    }

    async fn resync_locked(&self, _gate: RwLockWriteGuard<'_, ()>) {
        // Cleared before the ledger is read: a fallback admission after this
        // point marks the instance again.
        self.dirty.store(false, Ordering::Release);
        let ledger: Vec<(Arc<str>, u32)> = {
            let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
            ledger.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        let mut call = self.resync.prepare_invoke();
        call.key(&self.leases_key).key(&self.held_key);
        call.arg(&self.settings.instance_id)
            .arg(self.lease_ms())
            .arg(&self.held_prefix);
        for (key, n) in &ledger {
            call.arg(key.as_ref()).arg(*n);
        }
        // On failure `call` marked the instance dirty: the next upkeep
        // tries again. A resync can run inside an upgrade, whose task may be
        // cancelled mid-call: that must leave the instance dirty too.
        let unsettled = MarkDirty(&self.dirty);
        let synced = self.call::<i64>(Op::Resync, &call).await.is_ok();
        std::mem::forget(unsettled);
        if synced {
            self.resyncs.fetch_add(1, Ordering::AcqRel);
            tracing::info!(
                instance = %self.settings.instance_id,
                counters = ledger.len(),
                "fleet counts registered"
            );
        }
    }

    /// Renews the lease, or resyncs when the counts may be off.
    async fn upkeep(&self) {
        if self.dirty.load(Ordering::Acquire) {
            return self.resync().await;
        }
        let mut call = self.renew.prepare_invoke();
        call.key(&self.leases_key);
        call.arg(&self.settings.instance_id)
            .arg(self.lease_ms())
            .arg(&self.held_prefix);
        match self.call::<i64>(Op::Renew, &call).await {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(instance = %self.settings.instance_id, "fleet lease was lost; registering again");
                self.resync().await;
            }
            Err(_) => {}
        }
    }

    /// Fleet-wide counts for `/status`: live instances and each route's
    /// streams across them.
    pub async fn status(&self, routes: &[&str]) -> Value {
        let p = &self.settings.key_prefix;
        let mut call = self.count.prepare_invoke();
        call.key(&self.leases_key);
        for route in routes {
            call.key(format!("{{{p}}}:r:{route}"));
        }
        let counts: Result<Vec<i64>, _> = self.call(Op::Count, &call).await;
        let mut doc = json!({
            "instance_id": self.settings.instance_id,
            "up": self.up.load(Ordering::Acquire),
            "when_unreachable": self.settings.when_unreachable.as_str(),
            "held": self.metrics.held.get(),
        });
        if let Ok(counts) = counts {
            let live: serde_json::Map<String, Value> = routes
                .iter()
                .zip(counts.iter().skip(1))
                .map(|(r, n)| (r.to_string(), json!(n)))
                .collect();
            doc["instances"] = json!(counts.first());
            doc["routes"] = Value::Object(live);
        }
        doc
    }
}

impl Fleet {
    /// Runs one script within the call timeout, recording the round trip
    /// and whether Redis is up.
    async fn call<T: redis::FromRedisValue>(
        &self,
        op: Op,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let limit = self.settings.call_timeout;
        let start = Instant::now();
        let attempt = async {
            let mut conn = self.connection().await?;
            call.invoke_async(&mut conn).await.map_err(StoreError::from)
        };
        // One bound for connecting and answering together.
        let result = tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or(Err(StoreError::Timeout(limit)));
        self.metrics
            .rtt
            .with_label_values(&[op.as_str()])
            .observe(start.elapsed().as_secs_f64());
        self.set_up(op, result.as_ref().err());
        let mut skip = self.skip_until.lock().unwrap_or_else(|e| e.into_inner());
        if result.is_err() {
            // Whatever the call changed, or did not, the next resync fixes.
            self.dirty.store(true, Ordering::Release);
            *skip = Some(Instant::now() + RETRY_AFTER);
        } else {
            *skip = None;
        }
        drop(skip);
        result
    }

    /// The shared connection, or an error at once while a recent attempt
    /// to make one failed.
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        {
            let mut c = self.connection.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(manager) = &c.manager {
                return Ok(manager.clone());
            }
            if c.last_attempt.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
                return Err(StoreError::NotConnected);
            }
            c.last_attempt = Some(Instant::now());
        }
        let limit = self.settings.call_timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(limit)
            .set_response_timeout(limit)
            .set_number_of_retries(1);
        // The caller's timeout bounds this; an attempt it cuts off is
        // abandoned, and the next one waits for `RETRY_AFTER`.
        let manager = self
            .client
            .get_connection_manager_with_config(config)
            .await?;
        let mut c = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        c.manager = Some(manager.clone());
        Ok(manager)
    }

    /// Records whether Redis answered; one log line per change of state.
    fn set_up(&self, op: Op, error: Option<&StoreError>) {
        let up = error.is_none();
        self.metrics.up.set(i64::from(up));
        if self.up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        if up && self.dirty.load(Ordering::Acquire) {
            // Back: register what was admitted meanwhile without waiting
            // for the next renewal.
            self.wake.notify_one();
        }
        let policy = self.settings.when_unreachable.as_str();
        match error {
            None => tracing::info!(policy, "fleet store reachable; counting fleet-wide"),
            Some(e) => tracing::warn!(
                op = op.as_str(),
                error = %e,
                policy,
                "fleet store unreachable; admitting by the fallback policy"
            ),
        }
    }
}

/// The background task of a fleet instance: renews the lease every third
/// of it, resyncs when needed, and sends queued releases. It runs until the
/// process ends, not only until shutdown starts.
pub struct FleetService(pub Arc<Fleet>);

#[async_trait]
impl BackgroundService for FleetService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let fleet = &self.0;
        let Some(mut pending) = fleet
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut tick = tokio::time::interval(fleet.settings.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Streams run on through the shutdown grace period, so their lease
        // is renewed and their releases sent until the runtime stops; the
        // slots of streams still live then are freed by the lease.
        let mut stopping = false;
        loop {
            tokio::select! {
                _ = shutdown.changed(), if !stopping => stopping = true,
                _ = tick.tick() => fleet.upkeep().await,
                _ = fleet.wake.notified() => fleet.upkeep().await,
                Some(first) = pending.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < RELEASE_BATCH {
                        match pending.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    fleet.release(batch).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{RouteLimits, Tracking};
    use crate::rate::Rate;

    fn fleet(instances: u32) -> Arc<Fleet> {
        let settings = Cluster {
            // Never connected to: these tests make no call.
            redis: "redis://127.0.0.1:1".into(),
            instance_id: "t".into(),
            key_prefix: "p".into(),
            lease: Duration::from_secs(3),
            call_timeout: Duration::from_millis(100),
            when_unreachable: Unreachable::Local,
            instances,
        };
        Fleet::new(settings, &Registry::new()).unwrap()
    }

    fn ask(key: Option<&str>) -> Ask<'_> {
        Ask {
            limits: RouteLimits {
                total: Some(10),
                per_key: Some(2),
                per_client: None,
            },
            global_per_client: Some(7),
            key,
            client: "192.0.2.1".parse().unwrap(),
            client_exempt: false,
            rate: Some(Rate {
                per_second: 1.0,
                burst: 1,
            }),
            global_rate: None,
            dry_run: false,
            tracking: Tracking::default(),
        }
    }

    #[test]
    fn the_local_share_rounds_down_and_keeps_at_least_one() {
        let share = fleet(3).share(&ask(None));
        assert_eq!(share.limits.total, Some(3));
        assert_eq!(
            share.limits.per_key,
            Some(1),
            "2 / 3 rounds to 0, kept at 1"
        );
        assert_eq!(share.limits.per_client, None, "no limit stays none");
        assert_eq!(share.global_per_client, Some(2));
        assert!(share.rate.is_none(), "the rate was spent by the first ask");
        assert_eq!(fleet(1).share(&ask(None)).limits.total, Some(10));
    }

    #[test]
    fn counters_follow_the_scopes_the_permit_holds() {
        let fleet = fleet(2);
        let table = AdmissionTable::new();
        let route = table.route("rooms");
        let a = ask(Some("lobby"));
        let Admission::Admitted { permit, .. } = table.admit(&route, &a) else {
            panic!("refused");
        };
        let counters: Vec<(String, Scope, u32)> = fleet
            .counters("rooms", &permit, &a)
            .into_iter()
            .map(|(k, s, l)| (k.to_string(), s, l))
            .collect();
        assert_eq!(
            counters,
            vec![
                ("{p}:g:192.0.2.1".into(), Scope::GlobalClient, 7),
                ("{p}:k:rooms:lobby".into(), Scope::Key, 2),
                ("{p}:r:rooms".into(), Scope::Route, 10),
            ]
        );
    }
}
