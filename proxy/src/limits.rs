//! Limits per identity (set in the policy) and a global limit on calls in flight (set in the configuration).
//!
//! An identity is one client certificate (its SHA-256 fingerprint): every connection made with it shares one
//! [`Usage`]. Exceeding a limit gets `ResourceExhausted` with a message that says which limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tonic::Status;

use crate::audit::Record;
use crate::audit::summary::Unrecorded;
use crate::config::DenialRecords;
use crate::metrics::{LimitLabels, Metrics};
use crate::policy::Limits;

/// All identities' usage, and the global limit.
pub struct Limiter {
    usage: Mutex<Identities>,
    global_in_flight: Arc<AtomicU32>,
    /// Calls waiting at etcd for a lock or leadership others hold (Lock, Campaign), moved out of
    /// `global_in_flight` into a budget of their own of the same size ([`Limiter::waiting`]).
    global_waiting: Arc<AtomicU32>,
    global_max: Option<u32>,
    /// Denials per identity that get a record each (`audit.denial_records`); `None`: all.
    denial_records: Option<DenialRecords>,
}

/// The usage of each identity that has something open (a connection, a call, a watch): an identity's usage lives
/// as long as anything of it does, and is forgotten after — but its rate bucket only once it has filled up again,
/// so that reconnecting does not bring a fresh burst (entries of identities gone are pruned as new ones come).
#[derive(Default)]
struct Identities {
    by_fingerprint: HashMap<String, Known>,
    /// Prune when the map reaches this size.
    prune_at: usize,
}

/// One identity's entry: its usage while anything of it is open, and its rate buckets.
struct Known {
    usage: Weak<Usage>,
    buckets: Arc<Mutex<Buckets>>,
}

/// What one identity uses now.
#[derive(Debug, Default)]
pub struct Usage {
    in_flight: AtomicU32,
    watches: AtomicU32,
    /// Shared with the identity's entry in [`Identities`], which outlives this.
    buckets: Arc<Mutex<Buckets>>,
}

/// An identity's token buckets, each made at its first use.
#[derive(Debug, Default)]
struct Buckets {
    /// Its requests (the policy's `requests_per_second`).
    requests: Option<Bucket>,
    /// Its denials that get a record each (`audit.denial_records`).
    denial_records: Option<Bucket>,
    /// Its denials over that, for summary records.
    unrecorded: Unrecorded,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// When it is full again if nothing more is taken: from then on it can be forgotten.
    full_at: Instant,
}

/// What [`Limiter::record_denial`] says to write now.
pub struct Denied {
    /// Summary records of the identity's earlier denials, first.
    pub summaries: Vec<Record>,
    /// The denial's own record; `None`: it was counted for a summary.
    pub own: Option<Record>,
}

/// A call in flight; releases its slots when dropped.
pub struct Permit {
    usage: Option<Arc<Usage>>,
    global: Option<Arc<AtomicU32>>,
}

/// One open watch; releases its slot when dropped.
pub struct WatchSlot {
    usage: Arc<Usage>,
}

/// Which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    Global,
    /// The waiting Lock and Campaign calls' own budget ([`Limiter::waiting`]).
    Waiting,
    Concurrency,
    Rate,
    Watches,
}

// === impl Limiter ===

impl Limiter {
    pub fn new(global_max: Option<u32>) -> Limiter {
        Limiter {
            usage: Mutex::default(),
            global_in_flight: Arc::new(AtomicU32::new(0)),
            global_waiting: Arc::new(AtomicU32::new(0)),
            global_max,
            denial_records: None,
        }
    }

    /// The same, giving each identity's denials a record each only at `rate` (`None`: every denial).
    pub fn recording_denials(mut self, rate: Option<DenialRecords>) -> Limiter {
        self.denial_records = rate;
        self
    }

    /// The usage of the identity with this certificate fingerprint (shared by its connections, calls and watches).
    pub fn usage(&self, fingerprint: &str) -> Arc<Usage> {
        let mut ids = self.usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(known) = ids.by_fingerprint.get_mut(fingerprint) {
            if let Some(usage) = known.usage.upgrade() {
                return usage;
            }
            let usage = Arc::new(Usage { buckets: known.buckets.clone(), ..Usage::default() });
            known.usage = Arc::downgrade(&usage);
            return usage;
        }
        let usage = Arc::new(Usage::default());
        let known = Known { usage: Arc::downgrade(&usage), buckets: usage.buckets.clone() };
        ids.by_fingerprint.insert(fingerprint.to_string(), known);
        if ids.by_fingerprint.len() >= ids.prune_at {
            let now = Instant::now();
            ids.by_fingerprint.retain(|_, known| known.usage.strong_count() > 0 || !known.is_full(now));
            ids.prune_at = (ids.by_fingerprint.len() * 2).max(64);
        }
        usage
    }

    /// Admit a unary call: global and per-identity concurrency, and the rate.
    pub fn call(&self, usage: &Arc<Usage>, limits: &Limits, who: &str, metrics: &Metrics) -> Result<Permit, Status> {
        let mut permit = Permit { usage: None, global: None };
        if let Some(max) = self.global_max {
            if !acquire(&self.global_in_flight, max) {
                return Err(limited(metrics, Limited::Global, format!("the proxy has {max} calls in flight")));
            }
            permit.global = Some(self.global_in_flight.clone());
        }
        let unlimited = u32::MAX;
        if !acquire(&usage.in_flight, limits.concurrent_requests.unwrap_or(unlimited)) {
            let max = limits.concurrent_requests.unwrap_or(unlimited);
            return Err(limited(metrics, Limited::Concurrency, format!("{who} may have {max} calls in flight")));
        }
        permit.usage = Some(usage.clone());
        self.rate(usage, limits, who, metrics)?;
        Ok(permit)
    }

    /// A call admitted by [`Limiter::call`] that may wait at etcd for as long as others hold a lock (Lock,
    /// Campaign): its slot of `limits.max_concurrent_requests` moves to the waiters' own budget of the same size,
    /// and with that one full it is refused (`ResourceExhausted`). The global limit is there for the proxy's work in
    /// flight, to which a waiter adds nothing: in it, one identity without a limit of its own could fill the budget
    /// with waiters and starve every other client. Its identity's limit still counts it.
    pub fn waiting(&self, permit: &mut Permit, metrics: &Metrics) -> Result<(), Status> {
        let (Some(max), Some(global)) = (self.global_max, permit.global.as_ref()) else { return Ok(()) };
        if !Arc::ptr_eq(global, &self.global_in_flight) {
            return Ok(());
        }
        if !acquire(&self.global_waiting, max) {
            let what = format!("the proxy has {max} Lock and Campaign calls waiting");
            return Err(limited(metrics, Limited::Waiting, what));
        }
        global.fetch_sub(1, Ordering::AcqRel);
        permit.global = Some(self.global_waiting.clone());
        Ok(())
    }

    /// Count one call or stream message against the identity's rate.
    pub fn rate(&self, usage: &Usage, limits: &Limits, who: &str, metrics: &Metrics) -> Result<(), Status> {
        let Some(rate) = limits.requests_per_second else { return Ok(()) };
        let burst = limits.burst.unwrap_or(rate);
        let mut buckets = usage.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !Bucket::take(&mut buckets.requests, rate, burst) {
            return Err(limited(metrics, Limited::Rate, format!("{who} may make {rate} requests per second")));
        }
        Ok(())
    }

    /// A denial of the identity (of a request that was not forwarded): the records to write now. Within
    /// `audit.denial_records` it gets its own record, after the summary records of earlier denials (each of which
    /// takes a token too); over it, it is counted (written by a later denial, or [`Limiter::summaries_due`]). So a
    /// client with nothing but denials cannot flood the log.
    pub fn record_denial(&self, usage: &Usage, denial: Record) -> Denied {
        let Some(DenialRecords { per_second, burst }) = self.denial_records else {
            return Denied { summaries: Vec::new(), own: Some(denial) };
        };
        let mut buckets = usage.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let b = &mut *buckets;
        let mut summaries = Vec::new();
        while !b.unrecorded.is_empty() && Bucket::take(&mut b.denial_records, per_second, burst) {
            summaries.extend(b.unrecorded.take_one());
        }
        if b.unrecorded.is_empty() && Bucket::take(&mut b.denial_records, per_second, burst) {
            return Denied { summaries, own: Some(denial) };
        }
        b.unrecorded.add(denial);
        Denied { summaries, own: None }
    }

    /// The summary records of every identity with denials counted `older_than` ago or longer (all with
    /// `Duration::ZERO`, at shutdown), which are forgotten. At most one per identity and RPC per call: written
    /// every few seconds, they cost no token.
    pub fn summaries_due(&self, older_than: Duration) -> Vec<Record> {
        let cutoff = Instant::now().checked_sub(older_than);
        let ids = self.usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut due = Vec::new();
        for known in ids.by_fingerprint.values() {
            let mut buckets = known.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let ripe = match cutoff {
                _ if older_than.is_zero() => !buckets.unrecorded.is_empty(),
                Some(cutoff) => buckets.unrecorded.started_before(cutoff),
                None => false,
            };
            if ripe {
                due.extend(buckets.unrecorded.take_all());
            }
        }
        due
    }

    /// Take a slot for a new watch.
    pub fn watch(
        &self,
        usage: &Arc<Usage>,
        limits: &Limits,
        who: &str,
        metrics: &Metrics,
    ) -> Result<WatchSlot, Status> {
        let max = limits.open_watches.unwrap_or(u32::MAX);
        if !acquire(&usage.watches, max) {
            return Err(limited(metrics, Limited::Watches, format!("{who} may have {max} watches open")));
        }
        Ok(WatchSlot { usage: usage.clone() })
    }
}

/// Take one of `max` slots.
fn acquire(counter: &AtomicU32, max: u32) -> bool {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
}

fn limited(metrics: &Metrics, which: Limited, what: String) -> Status {
    metrics.limited.get_or_create(&LimitLabels { limit: which.as_str() }).inc();
    Status::resource_exhausted(format!("etcd-guard: too many requests: {what}"))
}

// === impl Known ===

impl Known {
    /// Whether its buckets have filled up again by `now` and no denial waits for its summary: forgetting it then
    /// changes nothing.
    fn is_full(&self, now: Instant) -> bool {
        let buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        buckets.unrecorded.is_empty()
            && [&buckets.requests, &buckets.denial_records].iter().all(|b| b.as_ref().is_none_or(|b| now >= b.full_at))
    }
}

// === impl Bucket ===

impl Bucket {
    /// Take a token from the bucket in `slot` (made full at its first use), refilled at `rate` per second up to
    /// `burst` (at least 1). `false`: none left.
    fn take(slot: &mut Option<Bucket>, rate: u32, burst: u32) -> bool {
        let burst = f64::from(burst.max(1));
        let now = Instant::now();
        let b = slot.get_or_insert(Bucket { tokens: burst, last: now, full_at: now });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * f64::from(rate)).min(burst);
        b.last = now;
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        let refill = Duration::try_from_secs_f64((burst - b.tokens) / f64::from(rate.max(1))).unwrap_or(Duration::MAX);
        b.full_at = now.checked_add(refill).or_else(|| now.checked_add(Duration::from_secs(86_400))).unwrap_or(now);
        true
    }
}

// === impl Limited ===

impl Limited {
    pub fn as_str(self) -> &'static str {
        match self {
            Limited::Global => "global",
            Limited::Waiting => "waiting",
            Limited::Concurrency => "concurrency",
            Limited::Rate => "rate",
            Limited::Watches => "watches",
        }
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(u) = &self.usage {
            u.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(g) = &self.global {
            g.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.usage.watches.fetch_sub(1, Ordering::AcqRel);
    }
}

/// TLS handshakes in progress per client address (`limits.max_handshakes_per_address`), so that one address cannot
/// hold every connection slot with handshakes it never finishes.
#[derive(Clone)]
pub struct Handshakes {
    max: u32,
    open: Arc<Mutex<HashMap<std::net::IpAddr, u32>>>,
}

/// One handshake in progress; counted off when dropped (the handshake ended, however).
pub struct HandshakeSlot {
    ip: std::net::IpAddr,
    open: Arc<Mutex<HashMap<std::net::IpAddr, u32>>>,
}

// === impl Handshakes ===

impl Handshakes {
    pub fn new(max: u32) -> Handshakes {
        Handshakes { max: max.max(1), open: Arc::default() }
    }

    /// A slot for a handshake from `ip`, unless `max` are in progress from it.
    pub fn try_start(&self, ip: std::net::IpAddr) -> Option<HandshakeSlot> {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot { ip, open: self.open.clone() })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_remembered_while_anything_of_it_is_open_and_forgotten_after() {
        let (l, m) = (Limiter::new(None), Metrics::new());
        let lim = limits(None, None, Some(1));
        let first = l.usage("a");
        let slot = l.watch(&first, &lim, "a", &m);
        drop(first);
        // The watch keeps the identity's usage: a second connection of it shares the count.
        let second = l.usage("a");
        assert!(slot.is_ok() && l.watch(&second, &lim, "a", &m).is_err());
        drop((slot, second));
        assert_eq!(l.usage("a").watches.load(Ordering::Relaxed), 0);
        // Certificates come and go (rotation): the entries of those gone do not pile up.
        for i in 0..1000 {
            drop(l.usage(&format!("gone-{i}")));
        }
        let known = l.usage.lock().unwrap().by_fingerprint.len();
        assert!(known <= 64, "{known} entries kept");
    }

    /// Waiters move to a budget of their own, as large as the global one: other calls keep the whole global
    /// budget, and a waiter past its budget is refused. Each slot is given back once.
    #[test]
    fn waiting_calls_have_a_global_budget_of_their_own() {
        let (l, m) = (Limiter::new(Some(2)), Metrics::new());
        let (usage, lim) = (l.usage("a"), limits(None, None, None));
        let mut waiters = Vec::new();
        for _ in 0..2 {
            let mut p = l.call(&usage, &lim, "a", &m).expect("a slot");
            assert!(l.waiting(&mut p, &m).is_ok());
            waiters.push(p);
        }
        let mut third = l.call(&usage, &lim, "a", &m).expect("a global slot: the waiters left theirs");
        let refused = l.waiting(&mut third, &m).err().map(|s| s.message().to_string());
        assert!(refused.is_some_and(|m| m.contains("2 Lock and Campaign calls waiting")));
        drop(third);
        let (in_flight, waiting) =
            (|| l.global_in_flight.load(Ordering::Relaxed), || l.global_waiting.load(Ordering::Relaxed));
        assert_eq!((in_flight(), waiting()), (0, 2));
        let others = [l.call(&usage, &lim, "a", &m), l.call(&usage, &lim, "a", &m)];
        assert!(others.iter().all(Result::is_ok), "two calls beside two waiters");
        drop((waiters, others));
        assert_eq!((in_flight(), waiting(), usage.in_flight.load(Ordering::Relaxed)), (0, 0, 0));
        // Without a global limit there is nothing to move.
        let unlimited = Limiter::new(None);
        let mut p = unlimited.call(&usage, &lim, "a", &m).expect("a slot");
        assert!(unlimited.waiting(&mut p, &m).is_ok());
        assert_eq!(unlimited.global_waiting.load(Ordering::Relaxed), 0);
    }

    fn denial(rpc: &'static str) -> Record {
        let subject = Arc::new(crate::audit::Subject::proxy());
        crate::audit::summary::tests::denial(&subject, rpc, tonic::Code::PermissionDenied, 1, "no binding matches")
    }

    #[test]
    fn denials_over_the_budget_are_counted_until_a_token_or_the_sweep_writes_their_summary() {
        use crate::audit::Event;
        let every = Limiter::new(None);
        let written = |d: Denied| (d.summaries.len() + usize::from(d.own.is_some()), d.own.is_none());
        assert_eq!(
            written(every.record_denial(&every.usage("a"), denial("KV/Range"))).0,
            1,
            "no budget: each recorded"
        );

        let l = Limiter::new(None).recording_denials(Some(DenialRecords { per_second: 0, burst: 3 }));
        let a = l.usage("a");
        let outcomes: Vec<(usize, bool)> = (0..10).map(|_| written(l.record_denial(&a, denial("KV/Range")))).collect();
        assert_eq!(outcomes[..3], [(1, false); 3], "the burst");
        assert!(outcomes[3..].iter().all(|&o| o == (0, true)), "{outcomes:?}");
        l.record_denial(&a, denial("KV/Put"));
        // Another identity has its own budget; a reconnect of this one (dropped usage) does not.
        assert_eq!(written(l.record_denial(&l.usage("b"), denial("KV/Range"))).0, 1);
        drop(a);
        let a = l.usage("a");
        assert_eq!(written(l.record_denial(&a, denial("KV/Range"))).0, 0);
        // Pruning (at 64 entries) keeps an identity whose denials wait for their summary.
        drop(a);
        for i in 0..100 {
            drop(l.usage(&format!("other-{i}")));
        }
        // Not due yet; then all of them, one record per RPC, and nothing after.
        assert!(l.summaries_due(Duration::from_secs(3600)).is_empty());
        let due = l.summaries_due(Duration::ZERO);
        let counts: Vec<(&str, Event)> = due.iter().map(|r| (r.rpc, r.event)).collect();
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert!(matches!(counts[0], ("KV/Range", Event::Summary { count: 8, .. })), "{counts:?}");
        assert!(matches!(counts[1], ("KV/Put", Event::Summary { count: 1, .. })), "{counts:?}");
        assert!(l.summaries_due(Duration::ZERO).is_empty());
    }

    fn limits(concurrent: Option<u32>, rps: Option<u32>, watches: Option<u32>) -> Limits {
        Limits { concurrent_requests: concurrent, requests_per_second: rps, burst: None, open_watches: watches }
    }

    /// Reconnecting does not bring a fresh burst: the bucket outlives the identity's connections until it has
    /// filled up again (before: 500 of these 1,000 calls passed a limit of 1 per second, burst 5).
    #[test]
    fn reconnecting_does_not_refill_the_rate() {
        let (l, m) = (Limiter::new(None), Metrics::new());
        let lim = Limits { requests_per_second: Some(1), burst: Some(5), ..Limits::default() };
        let mut served = 0;
        for _ in 0..100 {
            let u = l.usage("fp");
            served += (0..10).filter(|_| l.rate(&u, &lim, "x", &m).is_ok()).count();
            drop(u);
            // Other identities come and go meanwhile (pruning runs).
            for i in 0..10 {
                drop(l.usage(&format!("other-{i}")));
            }
        }
        assert!(served <= 6, "{served} served");
    }

    #[test]
    fn concurrency_slots_come_back_when_permits_drop() {
        let (l, m) = (Limiter::new(None), Metrics::new());
        let u = l.usage("f");
        let lim = limits(Some(2), None, None);
        let a = l.call(&u, &lim, "x", &m);
        let b = l.call(&u, &lim, "x", &m);
        assert!(a.is_ok() && b.is_ok());
        let c = l.call(&u, &lim, "x", &m);
        assert_eq!(c.err().map(|s| s.code()), Some(tonic::Code::ResourceExhausted));
        drop(a);
        assert!(l.call(&u, &lim, "x", &m).is_ok());
    }

    #[test]
    fn rate_allows_a_burst_then_refuses() {
        let (l, m) = (Limiter::new(None), Metrics::new());
        let u = l.usage("f");
        let lim = limits(None, Some(5), None);
        let ok = (0..20).filter(|_| l.rate(&u, &lim, "x", &m).is_ok()).count();
        assert!((5..=6).contains(&ok), "{ok}");
    }

    #[test]
    fn the_global_limit_covers_every_identity() {
        let (l, m) = (Limiter::new(Some(1)), Metrics::new());
        let (a, b) = (l.usage("a"), l.usage("b"));
        let first = l.call(&a, &Limits::default(), "a", &m);
        assert!(first.is_ok());
        assert!(l.call(&b, &Limits::default(), "b", &m).is_err());
        drop(first);
        assert!(l.call(&b, &Limits::default(), "b", &m).is_ok());
    }

    #[test]
    fn watch_slots() {
        let (l, m) = (Limiter::new(None), Metrics::new());
        let u = l.usage("f");
        let lim = limits(None, None, Some(1));
        let w = l.watch(&u, &lim, "x", &m);
        assert!(w.is_ok());
        assert!(l.watch(&u, &lim, "x", &m).is_err());
        drop(w);
        assert!(l.watch(&u, &lim, "x", &m).is_ok());
    }
}
