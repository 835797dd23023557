//! The admission table: live stream counts per route, per route key, per client
//! and per client across all routes, and the RAII [`Permit`] that holds one slot
//! in each of them.
//!
//! Invariants:
//! - a count never exceeds its limit when it is enforced (dry-run may exceed it);
//! - every slot taken is given back exactly once, by [`Permit`]'s `Drop`;
//! - a key whose count falls to zero is removed, so memory follows live streams.
//!
//! Counts live in the table, keyed by route name, not in the config: a reload
//! swaps limits while the counts of routes that keep their name carry over.

use crossbeam_utils::CachePadded;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::rate::{Rate, RateTable, RateTaken};
use ipnet::IpNet;

/// Number of lock shards per keyed counter; a power of two.
const SHARDS: usize = 16;

/// What one limit counts. Label values for metrics come from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every stream of the route.
    Route,
    /// Streams of one route key, e.g. one room.
    Key,
    /// Streams of one client within the route.
    Client,
    /// Streams of one client across all routes.
    GlobalClient,
    /// New upgrades per second of one client (a token bucket, not a count).
    ClientRate,
    /// A scope already tracks its maximum number of keys (clients, rooms)
    /// and this request would add one more.
    TrackingFull,
    /// The fleet's shared counts cannot be reached and the cluster policy
    /// is `closed`.
    ClusterUnavailable,
    /// This process took over from a previous one (`--upgrade`) that may
    /// still hold streams it cannot see; it admits none until that one
    /// has exited (`server.after_upgrade: wait`).
    PreviousProcess,
}

impl Scope {
    pub const ALL: [Scope; 8] = [
        Scope::Route,
        Scope::Key,
        Scope::Client,
        Scope::GlobalClient,
        Scope::ClientRate,
        Scope::TrackingFull,
        Scope::ClusterUnavailable,
        Scope::PreviousProcess,
    ];

    /// The metric label and the word used in refusal bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Route => "route",
            Scope::Key => "key",
            Scope::Client => "client",
            Scope::GlobalClient => "global_client",
            Scope::ClientRate => "client_rate",
            Scope::TrackingFull => "tracking_full",
            Scope::ClusterUnavailable => "cluster_unavailable",
            Scope::PreviousProcess => "previous_process",
        }
    }
}

/// The limits of one route; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteLimits {
    pub total: Option<u32>,
    pub per_key: Option<u32>,
    pub per_client: Option<u32>,
}

/// Limits that differ for some clients (by CIDR) or some route keys (by
/// value), e.g. an office NAT allowed 200 streams, or one big room 500.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Most specific (longest prefix) first, so the first match wins.
    clients: Vec<(IpNet, u32)>,
    keys: HashMap<Box<str>, u32>,
}

impl Overrides {
    pub fn new(mut clients: Vec<(IpNet, u32)>, keys: HashMap<Box<str>, u32>) -> Self {
        clients.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self { clients, keys }
    }

    /// The per-client limit for `client`, from the most specific CIDR that
    /// contains it.
    pub fn per_client(&self, client: IpAddr) -> Option<u32> {
        self.clients
            .iter()
            .find(|(net, _)| net.contains(&client))
            .map(|(_, n)| *n)
    }

    pub fn per_key(&self, key: &str) -> Option<u32> {
        self.keys.get(key).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.keys.is_empty()
    }
}

/// Everything admission needs to know about one upgrade request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub limits: RouteLimits,
    /// Limit per client across all routes.
    pub global_per_client: Option<u32>,
    /// The route key (e.g. the room), when the route names one.
    pub key: Option<&'a str>,
    /// The client's counting identity (already masked to its IPv6 prefix).
    pub client: IpAddr,
    /// Exempt clients skip the per-client scopes, never the route or key.
    pub client_exempt: bool,
    /// New upgrades per client on this route, and across all routes.
    pub rate: Option<Rate>,
    pub global_rate: Option<Rate>,
    /// Count and report, never refuse.
    pub dry_run: bool,
    /// The most keys one scope may track, and what to do past it.
    pub tracking: Tracking,
}

/// The bound on tracked keys per scope, so a flood of distinct addresses
/// or room names cannot grow memory without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracking {
    pub max_keys: usize,
    pub when_full: WhenFull,
}

impl Default for Tracking {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            when_full: WhenFull::Refuse,
        }
    }
}

/// The answer to a request that would add a key to a full scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse it (scope `tracking_full`): limits stay exact. The default.
    Refuse,
    /// Admit it without counting it in that scope: the scope's limit does not
    /// hold for the new key until tracking has room again.
    AdmitUntracked,
}

/// The answer to an [`Ask`].
#[must_use]
#[derive(Debug)]
pub enum Admission {
    /// Slots were taken in every scope. `would_refuse` is set in dry-run mode
    /// when an enforced run would have refused the stream in that scope.
    Admitted {
        permit: Permit,
        would_refuse: Option<Scope>,
    },
    /// No slot was taken anywhere; `Scope` is the first full one.
    Refused(Scope),
}

/// Room for new keys that a shard takes from its counter's total at once,
/// while the total is far from the cap.
const LEASE: usize = 8;

/// The most spare room a shard keeps after a key leaves it; beyond this it
/// gives back all but [`LEASE`].
const KEEP: usize = 2 * LEASE;

/// How far from the cap the total must be for a shard to take a whole
/// [`LEASE`]; closer, it takes room one key at a time. Twice what all shards
/// can hold spare, so leases never crowd out a key while room is plenty.
const PLENTY: usize = 2 * SHARDS * KEEP;

/// One shard of a keyed count: its keys, and room for new keys that it took
/// from the counter's total but has not used yet.
#[derive(Debug)]
struct Shard<K> {
    counts: HashMap<K, u32>,
    spare: usize,
}

/// A count per key, sharded to keep lock hold times short under contention.
///
/// The cap on tracked keys is exact without every new key touching one
/// shared count: `reserved` holds the keys plus every shard's spare room,
/// and a shard takes room in leases and uses them under its own lock. When
/// the total is at the cap, a new key first takes back every shard's spare
/// room ([`KeyedCounter::sweep`]), so it is refused only when every reserved
/// place holds a key.
#[derive(Debug)]
pub struct KeyedCounter<K> {
    // Each shard and the shared counts on a cache line of their own: threads
    // admitting different keys must not slow each other down through lines
    // they merely share.
    shards: Box<[CachePadded<Mutex<Shard<K>>>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Keys tracked plus spare room; within the cap in force when each
    /// place was taken.
    reserved: CachePadded<AtomicUsize>,
    /// Set by a sweep that may have found no spare room, cleared whenever a
    /// shard gains some: while set, a refusal need not sweep again.
    swept_empty: CachePadded<AtomicBool>,
    /// Held by a new key at the cap while it sweeps and tries again; taken
    /// before any shard's lock, never while one is held.
    at_cap: Mutex<()>,
}

impl<K: Hash + Eq + Clone> Default for KeyedCounter<K> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    CachePadded::new(Mutex::new(Shard {
                        counts: HashMap::new(),
                        spare: 0,
                    }))
                })
                .collect(),
            hasher: Default::default(),
            reserved: CachePadded::new(AtomicUsize::new(0)),
            swept_empty: CachePadded::new(AtomicBool::new(false)),
            at_cap: Mutex::new(()),
        }
    }
}

/// A poisoned shard only means another thread panicked while holding it; the
/// counts inside were updated before any code that can panic.
fn lock<K>(shard: &Mutex<Shard<K>>) -> MutexGuard<'_, Shard<K>> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

impl<K: Hash + Eq + Clone> KeyedCounter<K> {
    fn shard<Q>(&self, key: &Q) -> MutexGuard<'_, Shard<K>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + ?Sized,
    {
        let i = self.hasher.hash_one(key) as usize & (SHARDS - 1);
        lock(&self.shards[i])
    }

    /// Takes one slot for `key` unless it already holds `limit`. With `force`,
    /// takes it anyway and reports whether it would have been refused.
    fn acquire<Q>(&self, key: &Q, limit: u32, force: bool, max_keys: usize) -> Taken
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned + ?Sized,
        Q::Owned: Into<K>,
    {
        if let Some(taken) = self.try_acquire(key, limit, force, max_keys) {
            return taken;
        }

        // A new key found no room: room may sit spare in other shards. New
        // keys at the cap take turns, or one could find another's sweep half
        // done, its room taken from the shards and not yet given back to the
        // total, and be refused below the cap. The first try in a turn may
        // find room that the previous turn's sweep freed.
        let _turn = self.at_cap.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(taken) = self.try_acquire(key, limit, force, max_keys) {
            return taken;
        }
        if self.sweep() {
            if let Some(taken) = self.try_acquire(key, limit, force, max_keys) {
                return taken;
            }
        }
        Taken::Full
    }

    /// [`acquire`](Self::acquire) under this key's shard lock alone; `None`
    /// when the key is new and finds no room in its shard or the total.
    /// Released before any other shard is locked.
    fn try_acquire<Q>(&self, key: &Q, limit: u32, force: bool, max_keys: usize) -> Option<Taken>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned + ?Sized,
        Q::Owned: Into<K>,
    {
        let mut shard = self.shard(key);
        let current = shard.counts.get(key).copied().unwrap_or(0);
        let over = current >= limit;
        if over && !force {
            return Some(Taken::No);
        }

        if current == 0 {
            if !self.take_room(&mut shard, max_keys) {
                return None;
            }
            shard.counts.insert(key.to_owned().into(), 1);
        } else if let Some(count) = shard.counts.get_mut(key) {
            *count += 1;
        }
        Some(if over { Taken::OverLimit } else { Taken::Yes })
    }

    /// Finds room for one new key in `shard`: its spare room, or a lease from
    /// the total while that is under `max_keys`.
    fn take_room(&self, shard: &mut Shard<K>, max_keys: usize) -> bool {
        // Spare room was taken under the cap then in force; a reload may
        // have lowered it since, and then the sweep takes the room back.
        if shard.spare > 0 && self.reserved.load(Ordering::Acquire) <= max_keys {
            shard.spare -= 1;
            return true;
        }
        let lease = |reserved: usize| match max_keys.saturating_sub(reserved) {
            0 => None,
            room if room >= PLENTY => Some(LEASE),
            _ => Some(1),
        };
        let Ok(before) = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n + lease(n)?))
        else {
            return false;
        };
        let extra = lease(before).unwrap_or(1) - 1;
        if extra > 0 {
            shard.spare += extra;
            self.gained_spare();
        }
        true
    }

    /// Takes every shard's spare room back into the total; whether there
    /// was any. Only with `at_cap` held and no shard's lock.
    fn sweep(&self) -> bool {
        if self.swept_empty.load(Ordering::Acquire) {
            return false;
        }
        // Set before looking: a shard that gains room after it was looked
        // at clears it again (`gained_spare`), so that room is not skipped.
        self.swept_empty.store(true, Ordering::Release);
        let mut freed = 0;
        for shard in self.shards.iter() {
            freed += std::mem::take(&mut lock(shard).spare);
        }
        if freed == 0 {
            return false;
        }
        self.reserved.fetch_sub(freed, Ordering::AcqRel);
        self.swept_empty.store(false, Ordering::Release);
        true
    }

    /// Called with a shard's lock held, after it gained spare room.
    fn gained_spare(&self) {
        // Read first: the flag is written only near the cap, so its line
        // stays shared between cores the rest of the time.
        if self.swept_empty.load(Ordering::Acquire) {
            self.swept_empty.store(false, Ordering::Release);
        }
    }

    fn release<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut shard = self.shard(key);
        let Some(count) = shard.counts.get_mut(key) else {
            debug_assert!(false, "released a key that holds no slot");
            return;
        };
        *count -= 1;
        if *count == 0 {
            shard.counts.remove(key);
            shard.spare += 1;
            if shard.spare > KEEP {
                let back = shard.spare - LEASE;
                shard.spare = LEASE;
                self.reserved.fetch_sub(back, Ordering::AcqRel);
            }
            self.gained_spare();
        }
    }

    /// How many keys hold at least one slot.
    pub fn tracked(&self) -> usize {
        // Every shard at once, so that a key leaving one shard while another
        // comes into the next is not counted twice, or not at all. No other
        // path holds two shards' locks, so this cannot deadlock.
        let shards: Vec<_> = self.shards.iter().map(|s| lock(s)).collect();
        shards.iter().map(|s| s.counts.len()).sum()
    }

    /// The current count of one key.
    pub fn get<Q>(&self, key: &Q) -> u32
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(key).counts.get(key).copied().unwrap_or(0)
    }

    /// The highest count of any one key (0 when none is tracked).
    pub fn max(&self) -> u32 {
        self.shards
            .iter()
            .map(|shard| lock(shard).counts.values().copied().max().unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    /// The `n` keys with the highest counts, highest first.
    pub fn busiest(&self, n: usize) -> Vec<(K, u32)> {
        let mut all: Vec<(K, u32)> = Vec::new();
        for shard in self.shards.iter() {
            all.extend(lock(shard).counts.iter().map(|(k, v)| (k.clone(), *v)));
        }
        all.sort_unstable_by_key(|(_, n)| std::cmp::Reverse(*n));
        all.truncate(n);
        all
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    Yes,
    OverLimit,
    No,
    /// The key is new and the scope tracks its maximum already.
    Full,
}

/// The live counts of one route. Shared by the table and every permit of the
/// route, so a route removed by a reload stays valid until its last stream ends.
#[derive(Debug)]
pub struct RouteSlots {
    live: CachePadded<AtomicU32>,
    keys: KeyedCounter<Box<str>>,
    clients: KeyedCounter<IpAddr>,
    /// The table's per-client counts over all routes, so a permit can give
    /// its slot there back without holding a reference of its own.
    global_clients: Arc<KeyedCounter<IpAddr>>,
    rate: RateTable,
}

impl RouteSlots {
    /// Live streams of the route.
    pub fn live(&self) -> u32 {
        self.live.load(Ordering::Acquire)
    }

    pub fn keys(&self) -> &KeyedCounter<Box<str>> {
        &self.keys
    }

    pub fn clients(&self) -> &KeyedCounter<IpAddr> {
        &self.clients
    }

    pub fn rate(&self) -> &RateTable {
        &self.rate
    }

    /// Takes a route slot: a compare-and-swap loop, so the limit is exact
    /// however many threads race for the last slot.
    fn acquire_total(&self, limit: Option<u32>, force: bool) -> Taken {
        let limit = limit.unwrap_or(u32::MAX);
        let mut current = self.live.load(Ordering::Relaxed);
        loop {
            let over = current >= limit;
            if over && !force {
                return Taken::No;
            }
            match self.live.compare_exchange_weak(
                current,
                current.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) if over => return Taken::OverLimit,
                Ok(_) => return Taken::Yes,
                Err(seen) => current = seen,
            }
        }
    }
}

/// All live counts of the process.
#[derive(Debug, Default)]
pub struct AdmissionTable {
    routes: Mutex<HashMap<Arc<str>, Arc<RouteSlots>>>,
    global_clients: Arc<KeyedCounter<IpAddr>>,
    global_rate: RateTable,
    /// Open client connections per address, upgraded or not.
    connections: Arc<KeyedCounter<IpAddr>>,
}

impl AdmissionTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counts of a route, created on first use. Called once per route when
    /// a config is applied, never per request.
    pub fn route(&self, name: &str) -> Arc<RouteSlots> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = routes.get(name) {
            return slots.clone();
        }
        let slots = Arc::new(RouteSlots {
            live: Default::default(),
            keys: Default::default(),
            clients: Default::default(),
            global_clients: self.global_clients.clone(),
            rate: Default::default(),
        });
        routes.insert(Arc::from(name), slots.clone());
        slots
    }

    /// Forgets routes that are no longer configured and hold no stream; a
    /// route with live streams is kept until a later call finds it empty.
    pub fn retain_routes(&self, configured: &[&str]) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|name, slots| {
            configured.contains(&name.as_ref()) || Arc::strong_count(slots) > 1
        });
    }

    /// Every route the table knows, configured or draining.
    pub fn routes(&self) -> Vec<(Arc<str>, Arc<RouteSlots>)> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn global_clients(&self) -> &KeyedCounter<IpAddr> {
        &self.global_clients
    }

    pub fn global_rate(&self) -> &RateTable {
        &self.global_rate
    }

    pub fn connections(&self) -> &KeyedCounter<IpAddr> {
        &self.connections
    }

    /// Takes a connection slot for `client`, before anything is read from
    /// it; `None` when the client has `limit` connections open already.
    ///
    /// Unlike stream scopes this table has no cap on tracked addresses: each
    /// entry stands for an open connection, which costs far more (a socket,
    /// a task) than the entry, so open connections bound it already.
    pub fn connect(&self, client: IpAddr, limit: u32) -> Option<ConnectionSlot> {
        match self.connections.acquire(&client, limit, false, usize::MAX) {
            Taken::Yes | Taken::OverLimit => Some(ConnectionSlot {
                counter: self.connections.clone(),
                client,
            }),
            Taken::No | Taken::Full => None,
        }
    }

    /// Forgets rate buckets that have refilled; call every few seconds.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.global_rate.sweep(now);
        for (_, slots) in self.routes() {
            slots.rate.sweep(now);
        }
    }

    /// Takes a slot in every scope that applies to `ask`, or in none.
    ///
    /// The upgrade rate is checked first: an attempt spends a token whether
    /// or not a slot is free, since a reconnect storm is made of attempts.
    /// Scopes are taken from the narrowest (one client) to the widest (the
    /// route), and rolled back in reverse when one is full. Narrow first means a
    /// refused client briefly holds only its own slots, not a route slot that a
    /// concurrent request from someone else could have used.
    pub fn admit(&self, route: &Arc<RouteSlots>, ask: &Ask<'_>) -> Admission {
        let mut permit = Permit {
            route: route.clone(),
            global: None,
            client: None,
            key: None,
            total: false,
            shared: None,
        };
        let mut would_refuse = None;
        if !ask.client_exempt {
            if let Some(scope) = self.over_rate(route, ask) {
                if !ask.dry_run {
                    return Admission::Refused(scope);
                }
                would_refuse = Some(scope);
            }
        }
        // Ok(true): the slot is held; Ok(false): admitted without this scope;
        // Err: refused in the named scope.
        let mut step = |taken: Taken, scope: Scope| -> Result<bool, Scope> {
            match taken {
                Taken::Yes => Ok(true),
                Taken::OverLimit => {
                    would_refuse.get_or_insert(scope);
                    Ok(true)
                }
                Taken::No => Err(scope),
                Taken::Full if ask.tracking.when_full == WhenFull::AdmitUntracked => Ok(false),
                Taken::Full if ask.dry_run => {
                    would_refuse.get_or_insert(Scope::TrackingFull);
                    Ok(false)
                }
                Taken::Full => Err(Scope::TrackingFull),
            }
        };
        let max_keys = ask.tracking.max_keys;

        if !ask.client_exempt {
            if let Some(limit) = ask.global_per_client {
                let taken = self
                    .global_clients
                    .acquire(&ask.client, limit, ask.dry_run, max_keys);
                match step(taken, Scope::GlobalClient) {
                    Ok(true) => permit.global = Some(ask.client),
                    Ok(false) => {}
                    Err(scope) => return Admission::Refused(scope),
                }
            }
            if let Some(limit) = ask.limits.per_client {
                let taken = route
                    .clients
                    .acquire(&ask.client, limit, ask.dry_run, max_keys);
                match step(taken, Scope::Client) {
                    Ok(true) => permit.client = Some(ask.client),
                    Ok(false) => {}
                    Err(scope) => return Admission::Refused(scope),
                }
            }
        }

        if let (Some(limit), Some(key)) = (ask.limits.per_key, ask.key) {
            let taken = route.keys.acquire(key, limit, ask.dry_run, max_keys);
            match step(taken, Scope::Key) {
                Ok(true) => permit.key = Some(key.into()),
                Ok(false) => {}
                Err(scope) => return Admission::Refused(scope),
            }
        }

        let taken = route.acquire_total(ask.limits.total, ask.dry_run);
        if let Err(scope) = step(taken, Scope::Route) {
            return Admission::Refused(scope);
        }
        permit.total = true;

        Admission::Admitted {
            permit,
            would_refuse,
        }
    }
}

impl AdmissionTable {
    /// Spends one token of the client's global and route buckets; the scope
    /// to refuse in at the first empty one (or full table).
    fn over_rate(&self, route: &RouteSlots, ask: &Ask<'_>) -> Option<Scope> {
        let now = Instant::now();
        let buckets = [
            (ask.global_rate, &self.global_rate),
            (ask.rate, &route.rate),
        ];
        for (rate, table) in buckets {
            let Some(rate) = rate else { continue };
            match table.take(ask.client, rate, now, ask.tracking.max_keys) {
                RateTaken::Yes => {}
                RateTaken::Empty => return Some(Scope::ClientRate),
                RateTaken::Full if ask.tracking.when_full == WhenFull::AdmitUntracked => {}
                RateTaken::Full => return Some(Scope::TrackingFull),
            }
        }
        None
    }
}

/// One admitted stream's slots. Dropping it gives every slot back, once.
#[derive(Debug)]
pub struct Permit {
    route: Arc<RouteSlots>,
    /// The client holding a slot in the table's global per-client counts.
    global: Option<IpAddr>,
    client: Option<IpAddr>,
    key: Option<Box<str>>,
    total: bool,
    /// The same slots in the fleet's shared counts, when there is a fleet.
    /// Given back after the local ones.
    shared: Option<crate::cluster::Hold>,
}

/// The scopes one permit holds a slot in, as the fleet's counts need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    pub global_client: Option<IpAddr>,
    pub client: Option<IpAddr>,
    pub key: Option<&'a str>,
}

impl Permit {
    /// The keyed scopes this permit holds (the route total is always held).
    pub fn held(&self) -> Held<'_> {
        Held {
            global_client: self.global,
            client: self.client,
            key: self.key.as_deref(),
        }
    }

    /// Ties the fleet's slots to this permit, so one `Drop` gives back both.
    pub fn attach(&mut self, hold: crate::cluster::Hold) {
        self.shared = Some(hold);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // The route total goes last: once the route's live count shows a
        // stream gone, every slot it held is free. The order cannot admit
        // past a limit; at worst an upgrade racing a release is refused.
        if let Some(key) = &self.key {
            self.route.keys.release(key.as_ref());
        }
        if let Some(client) = &self.client {
            self.route.clients.release(client);
        }
        if let Some(client) = &self.global {
            self.route.global_clients.release(client);
        }
        if self.total {
            self.route.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One open client connection's slot; `Drop` gives it back.
#[derive(Debug)]
pub struct ConnectionSlot {
    counter: Arc<KeyedCounter<IpAddr>>,
    client: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.counter.release(&self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ask(limits: RouteLimits, key: Option<&str>, client: u8) -> Ask<'_> {
        Ask {
            limits,
            global_per_client: None,
            key,
            client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, client)),
            client_exempt: false,
            rate: None,
            global_rate: None,
            dry_run: false,
            tracking: Tracking::default(),
        }
    }

    fn admitted(a: Admission) -> Permit {
        match a {
            Admission::Admitted { permit, .. } => permit,
            Admission::Refused(scope) => panic!("refused in {scope:?}"),
        }
    }

    fn refused(a: Admission) -> Scope {
        match a {
            Admission::Admitted { .. } => panic!("admitted"),
            Admission::Refused(scope) => scope,
        }
    }

    #[test]
    fn connection_slots_are_capped_per_client_and_given_back() {
        let table = AdmissionTable::new();
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let b = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        let first = table.connect(a, 2).unwrap();
        let second = table.connect(a, 2).unwrap();
        assert!(table.connect(a, 2).is_none());
        let other = table.connect(b, 2).unwrap();
        drop(first);
        let third = table.connect(a, 2).unwrap();
        drop((second, third, other));
        assert_eq!(table.connections().tracked(), 0);
    }

    #[test]
    fn route_total_is_exact_and_released_on_drop() {
        let table = AdmissionTable::new();
        let route = table.route("r");
        let limits = RouteLimits {
            total: Some(2),
            ..Default::default()
        };
        let a = admitted(table.admit(&route, &ask(limits, None, 1)));
        let b = admitted(table.admit(&route, &ask(limits, None, 2)));
        assert_eq!(
            refused(table.admit(&route, &ask(limits, None, 3))),
            Scope::Route
        );
        assert_eq!(route.live(), 2);

        drop(a);
        assert_eq!(route.live(), 1);
        let _c = admitted(table.admit(&route, &ask(limits, None, 3)));
        drop(b);
        assert_eq!(route.live(), 1);
    }

    #[test]
    fn refusal_in_a_wide_scope_rolls_back_the_narrow_ones() {
        let table = AdmissionTable::new();
        let route = table.route("r");
        let limits = RouteLimits {
            total: Some(1),
            per_key: Some(5),
            per_client: Some(5),
        };
        let _held = admitted(table.admit(&route, &ask(limits, Some("a"), 1)));
        assert_eq!(
            refused(table.admit(&route, &ask(limits, Some("b"), 2))),
            Scope::Route
        );

        assert_eq!(
            route.keys().tracked(),
            1,
            "key b was rolled back and forgotten"
        );
        assert_eq!(route.clients().tracked(), 1, "client 2 was rolled back");
        assert_eq!(route.keys().get("b"), 0);
    }

    #[test]
    fn keys_are_forgotten_at_zero() {
        let table = AdmissionTable::new();
        let route = table.route("r");
        let limits = RouteLimits {
            per_key: Some(1),
            per_client: Some(3),
            ..Default::default()
        };
        let a = admitted(table.admit(&route, &ask(limits, Some("room"), 1)));
        assert_eq!(
            refused(table.admit(&route, &ask(limits, Some("room"), 1))),
            Scope::Key
        );
        assert_eq!(route.keys().tracked(), 1);
        drop(a);
        assert_eq!(route.keys().tracked(), 0);
        assert_eq!(route.clients().tracked(), 0);
        assert_eq!(route.live(), 0);
    }

    #[test]
    fn global_client_limit_spans_routes_and_exempt_clients_skip_it() {
        let table = AdmissionTable::new();
        let one = table.route("one");
        let two = table.route("two");
        let mut a = ask(RouteLimits::default(), None, 7);
        a.global_per_client = Some(1);
        let _p = admitted(table.admit(&one, &a));
        assert_eq!(refused(table.admit(&two, &a)), Scope::GlobalClient);

        a.client_exempt = true;
        let _q = admitted(table.admit(&two, &a));
        assert_eq!(table.global_clients().tracked(), 1);
    }

    #[test]
    fn dry_run_admits_and_names_the_scope_it_would_refuse() {
        let table = AdmissionTable::new();
        let route = table.route("r");
        let limits = RouteLimits {
            total: Some(1),
            ..Default::default()
        };
        let mut a = ask(limits, None, 1);
        a.dry_run = true;
        let first = table.admit(&route, &a);
        assert!(matches!(
            first,
            Admission::Admitted {
                would_refuse: None,
                ..
            }
        ));
        let second = table.admit(&route, &a);
        assert!(matches!(
            second,
            Admission::Admitted {
                would_refuse: Some(Scope::Route),
                ..
            }
        ));
        assert_eq!(route.live(), 2);
        drop((first, second));
        assert_eq!(route.live(), 0);
    }

    #[test]
    fn a_panic_while_a_permit_is_held_gives_its_slots_back() {
        // A panic in a request's handling unwinds its task, dropping the
        // request context and the permit in it (wsgate never builds with
        // panic = "abort" for this reason).
        let table = AdmissionTable::new();
        let route = table.route("r");
        let limits = RouteLimits {
            total: Some(1),
            per_key: Some(1),
            per_client: Some(1),
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _permit = admitted(table.admit(&route, &ask(limits, Some("k"), 1)));
            panic!("handler bug");
        }));
        assert!(result.is_err());
        assert_eq!(route.live(), 0);
        assert_eq!(route.keys().tracked(), 0);
        let _again = admitted(table.admit(&route, &ask(limits, Some("k"), 1)));
    }

    #[test]
    fn removed_routes_are_kept_while_streams_live() {
        let table = AdmissionTable::new();
        let route = table.route("old");
        let permit = admitted(table.admit(&route, &ask(RouteLimits::default(), None, 1)));
        drop(route);
        table.retain_routes(&[]);
        assert_eq!(table.routes().len(), 1);
        drop(permit);
        table.retain_routes(&[]);
        assert!(table.routes().is_empty());
    }

    #[test]
    fn a_full_scope_refuses_new_keys_but_not_known_ones() {
        let table = AdmissionTable::new();
        let route = table.route("r");
        let limits = RouteLimits {
            per_key: Some(5),
            per_client: Some(5),
            ..Default::default()
        };
        let mut a = ask(limits, Some("a"), 1);
        a.tracking.max_keys = 2;
        let _p = admitted(table.admit(&route, &a));
        let mut b = a;
        b.key = Some("b");
        b.client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        let _q = admitted(table.admit(&route, &b));

        // A third client is a third key in the client scope.
        let mut c = a;
        c.client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3));
        assert_eq!(refused(table.admit(&route, &c)), Scope::TrackingFull);
        assert_eq!(route.clients().tracked(), 2, "the cap holds");
        // Known keys still count.
        let _r = admitted(table.admit(&route, &a));
        assert_eq!(route.keys().get("a"), 2);

        // Admitting untracked: the stream is admitted without that scope.
        c.tracking.when_full = WhenFull::AdmitUntracked;
        let untracked = admitted(table.admit(&route, &c));
        assert_eq!(route.clients().tracked(), 2);
        assert_eq!(route.live(), 4);
        drop(untracked);
        assert_eq!(route.live(), 3);
    }

    #[test]
    fn the_most_specific_override_wins() {
        let o = Overrides::new(
            vec![
                ("10.0.0.0/8".parse().unwrap(), 50),
                ("10.1.2.0/24".parse().unwrap(), 200),
                ("10.1.0.0/16".parse().unwrap(), 100),
            ],
            HashMap::from([("big".into(), 500)]),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(o.per_client(ip("10.1.2.3")), Some(200));
        assert_eq!(o.per_client(ip("10.1.9.9")), Some(100));
        assert_eq!(o.per_client(ip("10.9.9.9")), Some(50));
        assert_eq!(o.per_client(ip("192.0.2.1")), None);
        assert_eq!(o.per_key("big"), Some(500));
        assert_eq!(o.per_key("bigger"), None);
    }

    #[test]
    fn the_upgrade_rate_refuses_before_any_slot_is_taken() {
        let table = AdmissionTable::new();
        let route = table.route("r");
        let mut a = ask(
            RouteLimits {
                total: Some(100),
                ..Default::default()
            },
            None,
            1,
        );
        a.rate = Some(Rate {
            per_second: 0.001,
            burst: 2,
        });
        let _p = admitted(table.admit(&route, &a));
        let _q = admitted(table.admit(&route, &a));
        assert_eq!(refused(table.admit(&route, &a)), Scope::ClientRate);
        assert_eq!(route.live(), 2);

        // Another client has its own bucket; exempt clients have none.
        assert!(matches!(
            table.admit(&route, &ask(a.limits, None, 2)),
            Admission::Admitted { .. }
        ));
        a.client_exempt = true;
        let _r = admitted(table.admit(&route, &a));

        a.client_exempt = false;
        a.dry_run = true;
        let dry = table.admit(&route, &a);
        assert!(matches!(
            dry,
            Admission::Admitted {
                would_refuse: Some(Scope::ClientRate),
                ..
            }
        ));
    }

    #[test]
    fn concurrent_burst_admits_exactly_the_limit() {
        let table = Arc::new(AdmissionTable::new());
        let route = table.route("r");
        let limits = RouteLimits {
            total: Some(50),
            per_key: Some(30),
            per_client: Some(1000),
        };
        let held = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let (table, route, held) = (table.clone(), route.clone(), held.clone());
                s.spawn(move || {
                    for i in 0..100u32 {
                        let key = if i % 2 == 0 { "a" } else { "b" };
                        if let Admission::Admitted { permit, .. } =
                            table.admit(&route, &ask(limits, Some(key), t))
                        {
                            held.lock().unwrap().push(permit);
                        }
                    }
                });
            }
        });
        assert_eq!(held.lock().unwrap().len(), 50);
        assert!(route.keys().get("a") <= 30 && route.keys().get("b") <= 30);
        held.lock().unwrap().clear();
        assert_eq!(route.live(), 0);
        assert_eq!(route.keys().tracked(), 0);
    }

    /// Takes new keys `name-0`, `name-1`, ... until the counter refuses one;
    /// how many it took.
    fn fill(counter: &KeyedCounter<Box<str>>, name: &str, max_keys: usize) -> usize {
        let mut taken = 0;
        loop {
            let key = format!("{name}-{taken}");
            match counter.acquire(key.as_str(), 1, false, max_keys) {
                Taken::Yes => taken += 1,
                Taken::Full => return taken,
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_key_cap_is_exact_though_shards_take_room_in_leases() {
        // Far enough above the point where leases stop that the first keys
        // leave spare room in most shards.
        let cap = PLENTY + 100;
        let counter = KeyedCounter::<Box<str>>::default();
        assert_eq!(fill(&counter, "a", cap), cap, "every place holds a key");
        assert_eq!(counter.tracked(), cap);

        // Keys leaving from all over the table leave their room spare in
        // their shards; a new key in any shard finds it.
        for i in (0..cap).step_by(7) {
            counter.release(format!("a-{i}").as_str());
        }
        let left = cap - cap.div_ceil(7);
        assert_eq!(counter.tracked(), left);
        assert_eq!(fill(&counter, "b", cap), cap - left);
        assert_eq!(counter.tracked(), cap);

        for i in 0..cap {
            let key = format!("a-{i}");
            if counter.get(key.as_str()) > 0 {
                counter.release(key.as_str());
            }
        }
        for i in 0..cap - left {
            counter.release(format!("b-{i}").as_str());
        }
        assert_eq!(counter.tracked(), 0);
        let spare: usize = counter.shards.iter().map(|s| lock(s).spare).sum();
        assert_eq!(counter.reserved.load(Ordering::Relaxed), spare);
        assert!(spare <= SHARDS * KEEP, "spare room is bounded: {spare}");
    }

    #[test]
    fn a_lowered_key_cap_holds_despite_spare_room() {
        let counter = KeyedCounter::<Box<str>>::default();
        let shard_of = |key: &str| counter.hasher.hash_one(key) as usize & (SHARDS - 1);
        // A second key in the first one's shard, where the spare room is.
        let b = (0..)
            .map(|i| format!("b{i}"))
            .find(|b| shard_of(b) == shard_of("a"))
            .unwrap();
        assert!(matches!(counter.acquire("a", 1, false, 10_000), Taken::Yes));
        assert_eq!(lock(&counter.shards[shard_of("a")]).spare, LEASE - 1);

        // A reload lowers the cap to the one key already tracked.
        assert!(matches!(
            counter.acquire(b.as_str(), 1, false, 1),
            Taken::Full
        ));
        assert!(matches!(counter.acquire("a", 2, false, 1), Taken::Yes));
        assert_eq!(counter.tracked(), 1);

        counter.release("a");
        counter.release("a");
        assert!(matches!(
            counter.acquire(b.as_str(), 1, false, 1),
            Taken::Yes
        ));
        assert!(matches!(counter.acquire("c", 1, false, 1), Taken::Full));
    }

    #[test]
    fn racing_new_keys_fill_the_cap_exactly() {
        let cap = PLENTY + 300;
        let counter = KeyedCounter::<Box<str>>::default();
        for round in 0..3 {
            let taken: usize = std::thread::scope(|s| {
                let fills: Vec<_> = (0..4)
                    .map(|t| {
                        let counter = &counter;
                        s.spawn(move || fill(counter, &format!("{round}-{t}"), cap))
                    })
                    .collect();
                fills.into_iter().map(|f| f.join().unwrap()).sum()
            });
            assert_eq!(taken, cap, "round {round}");
            assert_eq!(counter.tracked(), cap);

            // Give them all back from as many threads, for the next round.
            std::thread::scope(|s| {
                for part in 0..4 {
                    let counter = &counter;
                    s.spawn(move || {
                        for t in 0..4 {
                            for i in (part..cap).step_by(4) {
                                let key = format!("{round}-{t}-{i}");
                                if counter.get(key.as_str()) > 0 {
                                    counter.release(key.as_str());
                                }
                            }
                        }
                    });
                }
            });
            assert_eq!(counter.tracked(), 0);
        }
    }

    fn shard_of(counter: &KeyedCounter<Box<str>>, key: &str) -> usize {
        counter.hasher.hash_one(key) as usize & (SHARDS - 1)
    }

    #[test]
    fn new_keys_racing_at_the_cap_take_the_room_keys_left() {
        // Keys that leave at the cap leave their places spare in their own
        // shards; new keys racing for them from other shards must all get
        // one, though each must sweep (and one may meet another's sweep).
        let (cap, racers) = (100, 4);
        for round in 0..500 {
            let counter = KeyedCounter::<Box<str>>::default();
            assert_eq!(fill(&counter, "a", cap), cap);
            let mut spare = std::collections::HashSet::new();
            for i in 0..racers {
                let key = format!("a-{i}");
                spare.insert(shard_of(&counter, &key));
                counter.release(key.as_str());
            }
            let new: Vec<String> = (0..)
                .map(|i| format!("{round}-{i}"))
                .filter(|k| !spare.contains(&shard_of(&counter, k)))
                .take(racers)
                .collect();
            let start = std::sync::Barrier::new(racers);
            let taken: Vec<Taken> = std::thread::scope(|s| {
                let racing: Vec<_> = new
                    .iter()
                    .map(|key| {
                        let (counter, start) = (&counter, &start);
                        s.spawn(move || {
                            start.wait();
                            counter.acquire(key.as_str(), 1, false, cap)
                        })
                    })
                    .collect();
                racing.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert!(
                taken.iter().all(|t| matches!(t, Taken::Yes)),
                "round {round}: {taken:?}, {} of {cap} tracked",
                counter.tracked()
            );
        }
    }

    #[test]
    fn tracked_never_reads_over_the_cap_while_keys_come_and_go() {
        let cap = 64;
        let counter = KeyedCounter::<Box<str>>::default();
        assert_eq!(fill(&counter, "a", cap), cap);
        /// Stops the reader however the writer ends, a failed assertion
        /// included, so that a failure cannot hang the test.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let done = AtomicBool::new(false);
        let most = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                // At least one reading, however the threads are scheduled.
                let mut most = 0;
                loop {
                    most = most.max(counter.tracked());
                    if done.load(Ordering::Relaxed) {
                        return most;
                    }
                }
            });
            let stop = Done(&done);
            // At the cap, one key leaves and another comes, over and over.
            let mut held: std::collections::VecDeque<String> =
                (0..cap).map(|i| format!("a-{i}")).collect();
            for i in 0..100_000 {
                let gone = held.pop_front().unwrap();
                counter.release(gone.as_str());
                let key = format!("b-{i}");
                assert!(matches!(
                    counter.acquire(key.as_str(), 1, false, cap),
                    Taken::Yes
                ));
                held.push_back(key);
            }
            drop(stop);
            reader.join().unwrap()
        });
        assert_eq!(most, cap, "a reading over the cap, or none at it");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Acquire { key: u8, client: u8 },
            Release(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..4u8, 0..6u8).prop_map(|(key, client)| Op::Acquire { key, client }),
                any::<usize>().prop_map(Op::Release),
            ]
        }

        proptest! {
            /// Whatever the order of acquires and releases, every count equals
            /// the live permits it covers and never exceeds its limit, and
            /// everything returns to zero (and is forgotten) at the end.
            #[test]
            fn counts_equal_live_permits_and_respect_limits(ops in prop::collection::vec(op(), 1..200)) {
                let table = AdmissionTable::new();
                let route = table.route("r");
                let limits = RouteLimits { total: Some(7), per_key: Some(3), per_client: Some(2) };
                let keys = ["a", "b", "c", "d"];
                let mut live: Vec<(Permit, usize, u8)> = Vec::new();

                for op in ops {
                    match op {
                        Op::Acquire { key, client } => {
                            let mut a = ask(limits, Some(keys[key as usize]), client);
                            a.global_per_client = Some(3);
                            if let Admission::Admitted { permit, .. } = table.admit(&route, &a) {
                                live.push((permit, key as usize, client));
                            }
                        }
                        Op::Release(i) if !live.is_empty() => {
                            let i = i % live.len();
                            drop(live.swap_remove(i));
                        }
                        Op::Release(_) => {}
                    }

                    prop_assert_eq!(route.live() as usize, live.len());
                    prop_assert!(live.len() <= 7);
                    for (k, name) in keys.iter().enumerate() {
                        let n = live.iter().filter(|(_, key, _)| *key == k).count();
                        prop_assert_eq!(route.keys().get(*name) as usize, n);
                        prop_assert!(n <= 3);
                    }
                    for c in 0..6u8 {
                        let n = live.iter().filter(|(_, _, client)| *client == c).count();
                        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, c));
                        prop_assert_eq!(route.clients().get(&ip) as usize, n);
                        prop_assert!(n <= 2);
                    }
                }

                live.clear();
                prop_assert_eq!(route.live(), 0);
                prop_assert_eq!(route.keys().tracked(), 0);
                prop_assert_eq!(route.clients().tracked(), 0);
                prop_assert_eq!(table.global_clients().tracked(), 0);
            }
        }
    }
}
