//! A randomized differential stress test of watch coalescing (`watch: { coalesce: true }`).
//!
//! Several client connections and watch streams create watches at random on a few intervals (from now, from a
//! past or a future revision, with `prev_kv`, with filters), cancel some, request progress and stop reading for a
//! while, as writers put, delete and write transactions and a compactor compacts now and then. etcd's own history
//! is read by a watch straight to etcd from revision 1. At the end every watch's events must be exactly the
//! events of that history for its interval from its start (the `created` answer's revision + 1 for a watch from
//! now, else its start revision), in order, without a duplicate or a gap: all of them for a watch still open, a
//! prefix of them for one canceled by the client or for a compaction. Watch IDs must be etcd's (0, 1, 2, … in
//! create order), nothing may come for a watch after its cancel, and on etcd 3.5.8 and later a progress answer
//! must come after every event up to its revision of the watches created before the request.
//!
//! Bounded: `ETCD_GUARD_TEST_STRESS_SECS` seconds of activity (default 8), then at most 15 s for the watches to
//! catch up. The seed is printed; `ETCD_GUARD_TEST_STRESS_SEED` repeats a run's choices (not its timing).
//!
//! Avoided on purpose (docs/watch-coalescing.md, "Costs and limits"): a compaction while a progress request is
//! in flight (a shared watch that etcd cancels during a hand-over may miss events); compactions and progress
//! requests take turns. Allowed because etcd does it too: an event sent after the client's cancel without its
//! `prev_kv`, and a cancel answered for a watch etcd had already canceled for a compaction.
//!
//! `ETCD_GUARD_TEST_STRESS_DIRECT=1` sends the watch streams straight to etcd: the same checks of etcd itself
//! (etcd 3.5.16 defers progress answers for seconds under this load, through the proxy or not).
//!
//! It found two faults of hand-overs on etcd 3.5.16 (seed 319 failed about every other run): a progress answer
//! out of etcd's order, and a hand-over that never ended because etcd did not answer the shared watch's own
//! progress request (it now asks again every 500 ms while it waits). `ETCD_GUARD_TEST_STRESS_NO_PROGRESS=1` leaves
//! progress requests out, to tell a hand-over fault from another.
//!
//! Many seeds: `for s in $(seq 1 20); do ETCD_GUARD_TEST_STRESS_SEED=$s cargo test -p etcd-guard-tests --test
//! coalesce_stress || break; done` (and the same with `ETCD_GUARD_TEST_ETCD_DIR` for etcd 3.5).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, DeleteOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchResponse};
use etcd_guard_tests::{Harness, TEST_POLICY, TestResult, http_get};
use tokio::sync::{RwLock, mpsc};

const COALESCE: &str = "audit: { file: audit/audit.log }\nwatch: { coalesce: true }\n";
const KEYS: [&str; 6] = ["s/a", "s/b", "s/c", "s/d/1", "s/d/2", "s/e"];
const CONNECTIONS: usize = 3;
const STREAMS: usize = 8;
const WRITERS: usize = 2;
/// Creates per stream, at most.
const CREATES: usize = 24;

/// splitmix64: small, seedable, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// True with `percent` % chance.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A watch create as sent.
#[derive(Debug, Clone)]
struct Spec {
    key: Vec<u8>,
    range_end: Vec<u8>,
    start: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
}

impl Spec {
    fn options(&self) -> WatchOptions {
        let mut o = WatchOptions::new();
        if !self.range_end.is_empty() {
            o = o.with_range(self.range_end.clone());
        }
        if self.start > 0 {
            o = o.with_start_revision(self.start);
        }
        if self.prev_kv {
            o = o.with_prev_key();
        }
        let mut filters = Vec::new();
        if self.no_put {
            filters.push(WatchFilterType::NoPut);
        }
        if self.no_delete {
            filters.push(WatchFilterType::NoDelete);
        }
        if !filters.is_empty() {
            o = o.with_filters(filters);
        }
        o
    }

    fn contains(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            key == self.key.as_slice()
        } else {
            key >= &self.key[..] && key < &self.range_end[..]
        }
    }
}

/// One event, everything of it that a client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    rev: i64,
    delete: bool,
    key: String,
    value: String,
    create_rev: i64,
    version: i64,
    /// (value, create revision, mod revision, version) of the previous key-value.
    prev: Option<(String, i64, i64, i64)>,
}

fn evs_of(r: &WatchResponse) -> Vec<Ev> {
    r.events()
        .iter()
        .map(|e| {
            let kv = e.kv();
            Ev {
                rev: kv.map(|kv| kv.mod_revision()).unwrap_or_default(),
                delete: e.event_type() == EventType::Delete,
                key: kv.map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).unwrap_or_default(),
                value: kv.map(|kv| String::from_utf8_lossy(kv.value()).into_owned()).unwrap_or_default(),
                create_rev: kv.map(|kv| kv.create_revision()).unwrap_or_default(),
                version: kv.map(|kv| kv.version()).unwrap_or_default(),
                prev: e.prev_kv().map(|p| {
                    (
                        String::from_utf8_lossy(p.value()).into_owned(),
                        p.create_revision(),
                        p.mod_revision(),
                        p.version(),
                    )
                }),
            }
        })
        .collect()
}

/// What one watch stream did and got.
#[derive(Default)]
struct StreamLog {
    /// Creates in the order sent.
    creates: Vec<Spec>,
    /// IDs the client canceled, and how many responses had arrived when it sent the cancel.
    cancels: HashMap<i64, usize>,
    /// For each progress request: how many creates had been sent before it.
    progress_sent: Vec<usize>,
    /// Every response, in order.
    responses: Vec<WatchResponse>,
    /// IDs created and not yet canceled (for the driver to pick cancels from).
    live: Vec<i64>,
}

/// A watch as the check rebuilds it from a stream's log.
struct Watch {
    spec: Spec,
    id: i64,
    /// The first revision it must see.
    from: i64,
    events: Vec<Ev>,
    /// `Some(compact_revision)` once canceled.
    end: Option<i64>,
    /// Its place among the stream's creates.
    index: usize,
    /// How many of its events came before the client sent its cancel (all, if it sent none).
    firm: usize,
    /// The response each event came in.
    at: Vec<usize>,
}

struct Shared {
    history: Mutex<Vec<Ev>>,
    /// The latest compaction revision (0: none yet).
    compacted: AtomicI64,
    /// The latest revision a write returned.
    current: AtomicI64,
    stop: AtomicBool,
    /// Progress requests (read) and compactions (write) take turns; no progress request starts while a compaction
    /// waits for its turn.
    gate: RwLock<()>,
    compacting: AtomicBool,
    progress_answers: AtomicU64,
    progress_timeouts: AtomicU64,
    /// The longest wait for a progress answer, in milliseconds.
    progress_longest: AtomicU64,
}

fn seed() -> u64 {
    match std::env::var("ETCD_GUARD_TEST_STRESS_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => seed,
        None => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        }
    }
}

fn activity() -> Duration {
    let secs = std::env::var("ETCD_GUARD_TEST_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    Duration::from_secs(secs)
}

/// The intervals watched: a key, the whole prefix, a sub-prefix, a range.
fn interval(rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
    match rng.below(4) {
        0 => (b"s/a".to_vec(), Vec::new()),
        1 => (b"s/".to_vec(), b"s0".to_vec()),
        2 => (b"s/d/".to_vec(), b"s/d0".to_vec()),
        _ => (b"s/b".to_vec(), b"s/d".to_vec()),
    }
}

fn random_spec(rng: &mut Rng, shared: &Shared) -> Spec {
    let (key, range_end) = interval(rng);
    let current = shared.current.load(Ordering::SeqCst).max(1);
    let compacted = shared.compacted.load(Ordering::SeqCst);
    let start = match rng.below(100) {
        0..=59 => 0,
        60..=89 => {
            // A past revision, mostly one etcd still has.
            let floor = if compacted > 0 && !rng.chance(15) { compacted + 1 } else { 1 };
            let floor = floor.max(current - 60).min(current);
            floor + rng.below((current - floor + 1) as u64) as i64
        }
        _ => current + 1 + rng.below(4) as i64,
    };
    Spec { key, range_end, start, prev_kv: rng.chance(25), no_put: rng.chance(7), no_delete: rng.chance(12) }
}

/// A metric of the proxy.
fn metric(h: &Harness, name: &str) -> TestResult<f64> {
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics listener")?;
    let (_, body) = tokio::task::block_in_place(|| http_get(addr, "/metrics"))?;
    Ok(body
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// One random write; its revision.
async fn write(c: &mut Client, rng: &mut Rng, n: u64) -> TestResult<i64> {
    let value = format!("v{n}");
    let header = match rng.below(100) {
        0..=59 => c.put(*rng.pick(&KEYS), value, None).await?.header().cloned(),
        60..=77 => c.delete(*rng.pick(&KEYS), None).await?.header().cloned(),
        78..=84 => c.delete("s/d/", Some(DeleteOptions::new().with_prefix())).await?.header().cloned(),
        _ => {
            // Two keys in one revision.
            let a = rng.below(KEYS.len() as u64) as usize;
            let b = (a + 1 + rng.below(KEYS.len() as u64 - 1) as usize) % KEYS.len();
            let op_b = if rng.chance(30) {
                TxnOp::delete(KEYS[b], None)
            } else {
                TxnOp::put(KEYS[b], format!("{value}b"), None)
            };
            let txn = Txn::new().and_then([TxnOp::put(KEYS[a], value, None), op_b]);
            c.txn(txn).await?.header().cloned()
        }
    };
    Ok(header.ok_or("a write without a header")?.revision())
}

/// Events etcd holds for `spec` from `from` on (`prev_kv` kept only if asked; a previous value older than the
/// compaction is left out on both sides, as etcd may no longer have it when it sends the event).
fn expected(history: &[Ev], spec: &Spec, from: i64) -> Vec<Ev> {
    history
        .iter()
        .filter(|e| e.rev >= from && spec.contains(e.key.as_bytes()))
        .filter(|e| if e.delete { !spec.no_delete } else { !spec.no_put })
        .map(|e| Ev { prev: if spec.prev_kv { e.prev.clone() } else { None }, ..e.clone() })
        .collect()
}

fn normalize(events: &[Ev], compacted: i64) -> Vec<Ev> {
    events.iter().map(|e| if e.rev - 1 < compacted { Ev { prev: None, ..e.clone() } } else { e.clone() }).collect()
}

/// The first place `got` parts from `want`, for a message.
fn differ(got: &[Ev], want: &[Ev]) -> String {
    let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
    format!(
        "{} events where {} were expected; first difference at {at}: got {:?}, expected {:?}",
        got.len(),
        want.len(),
        got.get(at.saturating_sub(1)..(at + 2).min(got.len())),
        want.get(at.saturating_sub(1)..(at + 2).min(want.len())),
    )
}

/// The result of checking every stream against the history: problems found, whether every open watch has
/// everything up to `last`, and how many watches and events were checked.
struct Checked {
    problems: Vec<String>,
    complete: bool,
    watches: usize,
    events: usize,
}

/// The responses of stream `s` around response `at`, one a line, once a run (`ETCD_GUARD_TEST_STRESS_DUMP`).
fn dump_once(s: usize, log: &StreamLog, at: usize) {
    static DUMPED: AtomicBool = AtomicBool::new(false);
    if std::env::var_os("ETCD_GUARD_TEST_STRESS_DUMP").is_none() || DUMPED.swap(true, Ordering::SeqCst) {
        return;
    }
    eprintln!(
        "stream {s} around response {at}; creates {:?}, cancels {:?}, progress after creates {:?}",
        log.creates.iter().map(|c| c.start).collect::<Vec<_>>(),
        log.cancels.keys().collect::<Vec<_>>(),
        log.progress_sent
    );
    for (i, r) in log.responses.iter().enumerate().skip(at.saturating_sub(40)).take(50) {
        let revs: Vec<i64> = r.events().iter().filter_map(|e| e.kv().map(|kv| kv.mod_revision())).collect();
        eprintln!(
            "  {i}: id {} created {} canceled {} compact {} header {} events {revs:?}",
            r.watch_id(),
            r.created(),
            r.canceled(),
            r.compact_revision(),
            r.header().map(|h| h.revision()).unwrap_or(0)
        );
    }
}

fn check(
    logs: &[Arc<Mutex<StreamLog>>],
    history: &[Ev],
    last: i64,
    compacted: i64,
    ordered: bool,
    last_try: bool,
) -> Checked {
    let mut out = Checked { problems: Vec::new(), complete: true, watches: 0, events: 0 };
    let history_complete = history.last().is_some_and(|e| e.rev >= last);
    out.complete &= history_complete;
    for (s, log) in logs.iter().enumerate() {
        let log = log.lock().unwrap();
        let mut watches: HashMap<i64, Watch> = HashMap::new();
        let mut ended: Vec<Watch> = Vec::new();
        let (mut next_create, mut next_id, mut progress) = (0usize, 0i64, 0usize);
        let mut problem = |p: String| out.problems.push(format!("stream {s}: {p}"));
        for (i, r) in log.responses.iter().enumerate() {
            let id = r.watch_id();
            let rev = r.header().map(|h| h.revision()).unwrap_or(0);
            if r.created() {
                let Some(spec) = log.creates.get(next_create) else {
                    problem(format!("response {i}: a created answer without a create: {r:?}"));
                    continue;
                };
                next_create += 1;
                if r.canceled() {
                    problem(format!("response {i}: create {spec:?} refused: {r:?}"));
                    continue;
                }
                if id != next_id {
                    problem(format!(
                        "response {i}: create {} got watch id {id}, etcd gives {next_id}",
                        next_create - 1
                    ));
                }
                next_id = next_id.max(id) + 1;
                if !r.events().is_empty() {
                    problem(format!("response {i}: a created answer with events: {r:?}"));
                }
                let from = if spec.start > 0 { spec.start } else { rev + 1 };
                let index = next_create - 1;
                let w = Watch {
                    spec: spec.clone(),
                    id,
                    from,
                    events: Vec::new(),
                    end: None,
                    index,
                    firm: usize::MAX,
                    at: Vec::new(),
                };
                if watches.insert(id, w).is_some() {
                    problem(format!("response {i}: watch id {id} created twice"));
                }
            } else if r.canceled() {
                let Some(mut w) = watches.remove(&id) else {
                    // etcd keeps a watch it canceled for a compaction until the client cancels it too, and answers
                    // that cancel.
                    let compacted = ended.iter().any(|w| w.id == id && w.end.is_some_and(|c| c > 0));
                    if !(compacted && log.cancels.contains_key(&id) && r.compact_revision() == 0) {
                        problem(format!("response {i}: a cancel of an unknown watch: {r:?}"));
                        dump_once(s, &log, i);
                    }
                    continue;
                };
                if r.compact_revision() == 0 && !log.cancels.contains_key(&id) {
                    problem(format!("response {i}: watch {id} canceled without a request: {r:?}"));
                }
                if !r.events().is_empty() {
                    problem(format!("response {i}: a cancel with events: {r:?}"));
                }
                w.end = Some(r.compact_revision());
                ended.push(w);
            } else if id == -1 && r.events().is_empty() {
                // A progress answer.
                let sent = log.progress_sent.get(progress).copied();
                progress += 1;
                let Some(sent) = sent else {
                    problem(format!("response {i}: a progress answer without a request: {r:?}"));
                    continue;
                };
                if ordered {
                    // Watches created before the request (and not being canceled) have had everything up to
                    // the answer's revision.
                    for w in watches.values().filter(|w| w.index < sent && !log.cancels.contains_key(&w.id)) {
                        let want: Vec<Ev> =
                            expected(history, &w.spec, w.from).into_iter().filter(|e| e.rev <= rev).collect();
                        if history_complete && normalize(&w.events, compacted) != normalize(&want, compacted) {
                            dump_once(s, &log, i);
                            problem(format!(
                                "response {i}: progress answer at {rev} before watch {} ({:?} from {}) had everything \
                                 up to there: {}",
                                w.id,
                                w.spec,
                                w.from,
                                differ(&w.events, &want)
                            ));
                        }
                    }
                }
            } else {
                let Some(w) = watches.get_mut(&id) else {
                    problem(format!("response {i}: events for watch {id}, not open: {r:?}"));
                    dump_once(s, &log, i);
                    continue;
                };
                if log.cancels.get(&id).is_some_and(|sent| i >= *sent) {
                    w.firm = w.firm.min(w.events.len());
                }
                let evs = evs_of(r);
                w.at.extend(std::iter::repeat_n(i, evs.len()));
                w.events.extend(evs);
            }
        }
        if log.creates.len() > next_create {
            out.complete = false;
        }
        for w in watches.values().chain(ended.iter()) {
            out.watches += 1;
            out.events += w.events.len();
            let mut want = normalize(&expected(history, &w.spec, w.from), compacted);
            let mut got = normalize(&w.events, compacted);
            // etcd reads an event's previous value as it sends it, and a cancel processed meanwhile makes it send
            // the event without (its `prevKV` flag for the watch is gone): events after the cancel was sent may
            // lack it.
            for events in [&mut want, &mut got] {
                for e in events.iter_mut().skip(w.firm) {
                    e.prev = None;
                }
            }
            let what = format!("watch {} ({:?} from {}, end {:?})", w.id, w.spec, w.from, w.end);
            let prefix = got.len() <= want.len() && want[..got.len()] == got[..];
            match w.end {
                None if prefix && got.len() < want.len() => {
                    out.complete = false;
                    if last_try {
                        if let Some(i) = w.at.last() {
                            dump_once(s, &log, *i);
                        }
                        problem(format!("{what}: {} of {} events so far", got.len(), want.len()));
                    }
                }
                None if got != want && history_complete => {
                    let first = got.iter().zip(&want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
                    if let Some(i) = w.at.get(first.min(w.at.len().saturating_sub(1))) {
                        dump_once(s, &log, *i);
                    }
                    problem(format!("{what}: {}", differ(&got, &want)))
                }
                None => {}
                Some(_) if !prefix && history_complete => {
                    problem(format!("{what}: not a prefix of etcd's history: {}", differ(&got, &want)))
                }
                Some(_) if !prefix => {}
                Some(0) => {}
                Some(compact) => {
                    // Canceled for a compaction: it still needed a revision etcd no longer had.
                    let next = got.last().map_or(w.from, |e| e.rev + 1);
                    if next >= compact {
                        problem(format!("{what}: canceled for compaction at {compact} but needed only from {next}"));
                    }
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn random_watches_through_shared_watches_see_exactly_etcds_history() -> TestResult {
    let seed = seed();
    eprintln!("coalesce stress: seed {seed} (ETCD_GUARD_TEST_STRESS_SEED={seed} repeats its choices)");
    let started = Instant::now();
    let mut master = Rng(seed);
    let h = Harness::with_config(TEST_POLICY, COALESCE).await?;
    let admin = h.admin()?;
    let mut etcd = h.client_direct().await?;
    let version = etcd.status().await?.version().to_string();
    let ordered = {
        let v: Vec<u64> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0), v.get(2).copied().unwrap_or(0)) >= (3, 5, 8)
    };
    let progress_requests = std::env::var_os("ETCD_GUARD_TEST_STRESS_NO_PROGRESS").is_none();
    let shared = Arc::new(Shared {
        history: Mutex::new(Vec::new()),
        compacted: AtomicI64::new(0),
        current: AtomicI64::new(1),
        stop: AtomicBool::new(false),
        gate: RwLock::new(()),
        compacting: AtomicBool::new(false),
        progress_answers: AtomicU64::new(0),
        progress_timeouts: AtomicU64::new(0),
        progress_longest: AtomicU64::new(0),
    });

    // etcd's history: a watch straight to etcd from revision 1, with previous values.
    let mut history_stream =
        etcd.watch("s/", Some(WatchOptions::new().with_prefix().with_prev_key().with_start_revision(1))).await?;
    let history_task = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(r) = history_stream.message().await? {
                if r.canceled() {
                    return TestResult::Err(format!("the history watch was canceled: {r:?}").into());
                }
                shared.history.lock().unwrap().extend(evs_of(&r));
            }
            Ok(())
        })
    };

    // `ETCD_GUARD_TEST_STRESS_DIRECT=1`: the watch streams go straight to etcd (the same checks of etcd itself).
    let through_proxy = std::env::var_os("ETCD_GUARD_TEST_STRESS_DIRECT").is_none();
    let mut connections = Vec::new();
    let mut watch_connections = Vec::new();
    for _ in 0..CONNECTIONS {
        connections.push(h.client(&admin).await?);
        watch_connections.push(if through_proxy { h.client(&admin).await? } else { h.client_direct().await? });
    }
    let until = Instant::now() + activity();
    let mut tasks = Vec::new();

    // Writers, through the proxy.
    for w in 0..WRITERS {
        let (mut c, shared, mut rng) = (connections[w % CONNECTIONS].clone(), shared.clone(), Rng(master.next()));
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let rev = write(&mut c, &mut rng, n * WRITERS as u64 + w as u64).await?;
                shared.current.fetch_max(rev, Ordering::SeqCst);
                if rng.chance(30) {
                    tokio::time::sleep(Duration::from_millis(rng.below(6))).await;
                }
            }
            TestResult::Ok(())
        }));
    }

    // The compactor, straight to etcd, taking turns with progress requests.
    {
        let (mut c, shared, mut rng) = (etcd.clone(), shared.clone(), Rng(master.next()));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(600 + rng.below(1200))).await;
                // No new progress requests meanwhile (etcd 3.5 may defer its answers for seconds).
                shared.compacting.store(true, Ordering::SeqCst);
                let turn = shared.gate.write().await;
                let current = shared.current.load(Ordering::SeqCst);
                let target = current - 5 - rng.below(40) as i64;
                if target > shared.compacted.load(Ordering::SeqCst) {
                    c.compact(target, None).await?;
                    shared.compacted.store(target, Ordering::SeqCst);
                    // etcd cancels the watches that fell behind it within its sync loop's period (100 ms).
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                drop(turn);
                shared.compacting.store(false, Ordering::SeqCst);
            }
            TestResult::Ok(())
        }));
    }

    // Watch streams: a driver each (creates, cancels, progress requests, pauses) and a reader.
    let mut logs = Vec::new();
    for s in 0..STREAMS {
        let log = Arc::new(Mutex::new(StreamLog::default()));
        logs.push(log.clone());
        let (mut c, shared, mut rng) = (watch_connections[s % CONNECTIONS].clone(), shared.clone(), Rng(master.next()));
        // Streams start at different times, so some join watches already passing events on.
        let delay = Duration::from_millis(rng.below(2000));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let first = random_spec(&mut rng, &shared);
            log.lock().unwrap().creates.push(first.clone());
            let stream = c.watch(first.key.clone(), Some(first.options())).await?;
            let (mut requests, mut responses) = stream.split();
            let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
            let paused_until = Arc::new(Mutex::new(Instant::now()));
            let reader = {
                let (log, paused_until, shared) = (log.clone(), paused_until.clone(), shared.clone());
                tokio::spawn(async move {
                    loop {
                        let pause = *paused_until.lock().unwrap();
                        tokio::time::sleep_until(pause.into()).await;
                        let r = tokio::select! {
                            r = responses.message() => r?,
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                                if shared.stop.load(Ordering::SeqCst) { return TestResult::Ok(()); }
                                continue;
                            }
                        };
                        let Some(r) = r else { return Err("the watch stream ended".into()) };
                        let mut log = log.lock().unwrap();
                        if r.created() && !r.canceled() {
                            log.live.push(r.watch_id());
                        } else if r.canceled() {
                            log.live.retain(|id| *id != r.watch_id());
                        } else if r.watch_id() == -1 && r.events().is_empty() {
                            let _ = progress_tx.send(());
                        }
                        log.responses.push(r);
                    }
                })
            };
            let mut progress_ok = true;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(rng.below(60))).await;
                match rng.below(100) {
                    0..=39 => {
                        let spec = random_spec(&mut rng, &shared);
                        let room = {
                            let mut l = log.lock().unwrap();
                            let room = l.creates.len() < CREATES;
                            if room {
                                l.creates.push(spec.clone());
                            }
                            room
                        };
                        if !room {
                            continue;
                        }
                        requests.watch(spec.key.clone(), Some(spec.options())).await?;
                    }
                    40..=54 => {
                        let id = {
                            let mut l = log.lock().unwrap();
                            let live: Vec<i64> =
                                l.live.iter().copied().filter(|id| !l.cancels.contains_key(id)).collect();
                            if live.is_empty() {
                                continue;
                            }
                            let id = *rng.pick(&live);
                            let seen = l.responses.len();
                            l.cancels.insert(id, seen);
                            id
                        };
                        requests.cancel(id).await?;
                    }
                    55..=57 if progress_requests && progress_ok && !shared.compacting.load(Ordering::SeqCst) => {
                        let _turn = shared.gate.read().await;
                        {
                            let mut l = log.lock().unwrap();
                            let sent = l.creates.len();
                            l.progress_sent.push(sent);
                        }
                        requests.request_progress().await?;
                        let asked = Instant::now();
                        match tokio::time::timeout(Duration::from_secs(10), progress_rx.recv()).await {
                            Ok(_) => {
                                shared.progress_answers.fetch_add(1, Ordering::Relaxed);
                                let waited = asked.elapsed().as_millis() as u64;
                                shared.progress_longest.fetch_max(waited, Ordering::Relaxed);
                            }
                            Err(_) => {
                                // etcd 3.5.8 and later drop a progress request that arrives while a watch of
                                // the stream is not synced; no more progress requests on this stream.
                                shared.progress_timeouts.fetch_add(1, Ordering::Relaxed);
                                progress_ok = false;
                            }
                        }
                    }
                    58..=60 => {
                        // Stop reading for a while: the slow reader's shared watches are detached.
                        *paused_until.lock().unwrap() = Instant::now() + Duration::from_millis(300 + rng.below(700));
                    }
                    _ => {}
                }
            }
            // Keep the stream open (and read) until the check is done.
            reader.await??;
            drop(requests);
            TestResult::Ok(())
        }));
    }

    // Sharing must have happened: sample the subscribers while the streams run.
    let mut most_subscribers = 0.0f64;
    let mut most_shared = 0.0f64;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let subs = metric(&h, "etcd_guard_shared_watch_subscribers")?;
        if subs > most_subscribers {
            most_subscribers = subs;
            most_shared = metric(&h, "etcd_guard_shared_watches")?;
        }
    }
    // A last write that every watch of `s/a` and `s/` sees; then wait until everything has arrived.
    let mut last_writer = connections[0].clone();
    let last = last_writer.put("s/a", "last", None).await?.header().ok_or("no header")?.revision();
    let compacted = shared.compacted.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(15);
    let checked = loop {
        let history = shared.history.lock().unwrap().clone();
        let last_try = Instant::now() > deadline;
        let checked = check(&logs, &history, last, compacted, ordered, last_try);
        if (checked.complete && checked.problems.is_empty()) || last_try {
            break checked;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    shared.stop.store(true, Ordering::SeqCst);
    let detaches = metric(&h, "etcd_guard_shared_watch_detaches_total")?;
    let mut failed = Vec::new();
    for task in tasks {
        if let Err(e) = task.await? {
            failed.push(e.to_string());
        }
    }
    history_task.abort();
    eprintln!(
        "coalesce stress: seed {seed}, etcd {version}{}, {} revisions, {} watches, {} events checked, compacted at \
         {compacted}, {} progress answers (longest {} ms, {} not answered in 10 s), {detaches} detaches, at most \
         {most_subscribers} subscribers on {most_shared} shared watches, {:.1} s",
        if through_proxy { "" } else { " (watches straight to etcd)" },
        last,
        checked.watches,
        checked.events,
        shared.progress_answers.load(Ordering::Relaxed),
        shared.progress_longest.load(Ordering::Relaxed),
        shared.progress_timeouts.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        return Err(format!("seed {seed}: {failed:?}").into());
    }
    if !checked.problems.is_empty() {
        let shown: Vec<&String> = checked.problems.iter().take(20).collect();
        return Err(format!("seed {seed}: {} problems:\n{shown:#?}", checked.problems.len()).into());
    }
    if !checked.complete {
        return Err(format!("seed {seed}: the watches did not catch up with etcd within 15 s").into());
    }
    assert!(
        most_subscribers > most_shared || !through_proxy,
        "watches were shared ({most_subscribers} subscribers, {most_shared} shared)"
    );
    Ok(())
}
