//! Shared upstream watches (`watch.coalesce: true`; docs/watch-coalescing.md).
//!
//! Identical watch creates of different client streams (same interval, filters, `prev_kv`, `progress_notify` and
//! forwarded metadata; no client-chosen watch ID, no fragments, no deadline) are served by one upstream watch on
//! a stream of its own. The proxy fans etcd's responses out to every subscriber, each with its own watch ID: a
//! response passes on as etcd's bytes when the IDs agree (a stream's first watch has ID 0 at etcd and at the
//! client), else rewritten with the subscriber's ID. A put then costs etcd one event, not one per watcher.
//!
//! What a client sees is what etcd would have sent it:
//! - A create that starts a shared watch is forwarded; etcd's `created` answer is its answer.
//! - A create "from now" (`start_revision` 0) that joins one asks etcd for the current revision `R` (a
//!   linearizable read sent after the create arrived), and joins only if the shared watch has delivered nothing
//!   after `R`; its `created` answer carries that read's header, and it receives exactly the events after `R`.
//! - A create from revision `S` joins only if the shared watch has delivered nothing from `S` on, and receives the
//!   events from `S`. Otherwise (history to replay, a shared watch being made, other creates of the stream still
//!   waiting for etcd) the create gets an upstream watch of its own, as without coalescing.
//! - Events of one revision come from etcd in one response, so what a subscriber has been given is always whole
//!   revisions: `Sub::delivered`. A subscriber that falls behind (its stream's queue is full) is *detached*: it
//!   leaves the shared watch, and its client stream makes an upstream watch of its own from `delivered + 1` with
//!   the same ID ([`Detached`]), so it loses nothing and slows nobody. A progress request moves every shared watch
//!   of its stream to a watch of the stream's own first (etcd answers it for the stream's own watches only): on
//!   etcd 3.5.8 and later by a hand-over from now ([`Subscription::hand_over`]), else by a detach.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use etcd_guard_proto::etcdserverpb as pb;
use etcd_guard_proto::methods;
use futures_util::StreamExt;
use http::HeaderValue;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::lease_keys::LOOKUP_TIMEOUT;
use crate::codec::Framed;
use crate::metrics::Metrics;
use crate::upstream::{CallMeta, StreamCall, Upstream};

/// How long a shared watch waits for the answer to its progress request during a hand-over before it asks again.
/// etcd 3.5.16 was seen to leave such a request unanswered for good (a watch that was not synced when it came, and
/// got no event afterwards), and to answer the next one (`tests/tests/coalesce_stress.rs`).
const PROGRESS_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a subscriber may wait for the shared watch to pass its hand-over revision. Past it, its client stream
/// ends with `Unavailable` (clients such as clientv3 then resume each watch from the last revision they got, on a
/// new stream): a hand-over that never ends would otherwise hold the stream's later frames back for good.
const HAND_OVER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A client stream's queue of what its shared watches send it (and of the proxy's answers that must follow them).
pub type Down = mpsc::Sender<HubItem>;

/// What a shared watch sends a client stream.
#[derive(Debug)]
pub enum HubItem {
    /// A frame to pass on.
    Frame(Bytes),
    /// A frame of the shared watch's to pass on, counted in the stream's `DetachQueue::queued` bytes until the
    /// stream takes it ([`DetachQueue::took`]).
    Counted(Bytes),
    /// The shared watch failed: the client stream ends with this status.
    Failed(Status),
    /// The subscriber with this ID has been given everything up to its hand-over revision and left: its own
    /// upstream watch goes on from there ([`Subscription::hand_over`]).
    HandedOver(i64),
}

/// A subscriber that left its shared watch without being canceled: its client stream must make an upstream watch
/// of its own, with the same ID, from `resume`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detached {
    pub watch_id: i64,
    pub token: u64,
    pub resume: i64,
    /// Whether the client has its `created` answer (else etcd's answer to the new watch is passed on).
    pub announced: bool,
}

/// Where detached subscribers are announced to their client streams.
pub type DetachTx = Arc<DetachQueue>;

/// A client stream's detached watches, waiting for the stream to make them watches of its own: a vector and a
/// wake-up (a tokio channel would cost the stream a 1 KiB block before anything is sent).
#[derive(Default)]
pub struct DetachQueue {
    queue: Mutex<Vec<Detached>>,
    ready: Notify,
    /// Bytes of the shared watches' frames waiting for the stream ([`HubItem::Counted`]): a subscriber whose frame
    /// would take them past [`QUEUED_BYTES`] is detached, as one whose frame finds the queue full.
    queued: AtomicUsize,
}

/// How many bytes of shared watches' frames may wait for one client stream (besides [`HubItem`]s counted by the
/// stream's queue): a stream that does not read cannot make the proxy hold more of them than an upstream watch
/// stream of its own would (its HTTP/2 window, `tls::STREAM_WINDOW`).
pub const QUEUED_BYTES: usize = crate::tls::STREAM_WINDOW as usize;

impl DetachQueue {
    /// The stream took a [`HubItem::Counted`] frame of `len` bytes.
    pub fn took(&self, len: usize) {
        let _ = self.queued.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(len)));
    }

    fn push(&self, detached: Detached) {
        lock(&self.queue).push(detached);
        self.ready.notify_one();
    }

    /// What is waiting now.
    pub fn take(&self) -> Vec<Detached> {
        std::mem::take(&mut *lock(&self.queue))
    }

    /// What is waiting, once something is.
    pub async fn next(&self) -> Vec<Detached> {
        loop {
            let waiting = self.take();
            if !waiting.is_empty() {
                return waiting;
            }
            self.ready.notified().await;
        }
    }
}

/// The shared watches, by what they watch.
pub struct Hub {
    watches: Arc<Mutex<HashMap<Key, Arc<SharedWatch>>>>,
    metrics: Arc<Metrics>,
    tokens: AtomicU64,
    /// Whether etcd answers a progress request only once the stream's watches are synced, in order with their
    /// events (etcd 3.5.8 and later), asked once.
    ordered_progress: tokio::sync::OnceCell<bool>,
    revisions: Revisions,
}

/// What makes two creates the same watch. Each worker thread has its own shared watches on its own upstream
/// connection, so events do not cross threads.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Key {
    worker: Option<usize>,
    forwarded: [Option<HeaderValue>; 2],
    key: Vec<u8>,
    range_end: Vec<u8>,
    filters: Vec<i32>,
    prev_kv: bool,
    progress_notify: bool,
}

/// One upstream watch and its subscribers.
struct SharedWatch {
    /// The `start_revision` etcd was asked for.
    start: i64,
    /// Requests to etcd on the shared watch's stream (progress requests).
    requests: mpsc::Sender<pb::WatchRequest>,
    state: Mutex<State>,
    /// Turns true once etcd answered the create (or the watch ended before).
    ready: watch::Sender<bool>,
    /// A subscriber left: the task looks whether any is left.
    left: Notify,
    /// A subscriber may be waiting for the shared watch to pass its hand-over revision: the task asks etcd for a
    /// progress answer again until none waits ([`PROGRESS_RETRY`]).
    hand_over_pending: AtomicBool,
}

#[derive(Default)]
struct State {
    created: bool,
    closed: bool,
    /// Every event up to this revision has been passed on; later ones are still to come.
    delivered: i64,
    /// etcd's last response header, encoded (for the proxy's own answers).
    header: Bytes,
    /// The revision etcd was at when it made the watch (the header of its `created` answer). Until the watch has
    /// passed everything up to there it may still be catching up from a past start, and a create from now does
    /// not join it: etcd's own watch from now is synced at once, while one catching up can be canceled by a
    /// compaction.
    made_at: i64,
    subs: Vec<Sub>,
    /// A progress answer's revision says how far the watch has passed everything on (see [`Hub::ordered_progress`]).
    trust_progress: bool,
}

/// A client watch served by a shared watch.
struct Sub {
    token: u64,
    /// Its ID on its client stream.
    watch_id: i64,
    down: Down,
    detach: DetachTx,
    /// Events before this revision are not for it (it joined later); 0 once none can come.
    from: i64,
    /// Every event up to this revision has been queued for it.
    delivered: i64,
    /// Its `created` answer is queued.
    announced: bool,
    /// Moving to a watch of its stream's own: never detached for being slow (what does not fit its queue waits in
    /// `spill`), and given nothing after `until` (0: not known yet).
    handing: bool,
    until: i64,
    /// Since when it waits for the shared watch to pass `until` ([`HAND_OVER_DEADLINE`]).
    waiting_since: Option<Instant>,
    spill: Option<mpsc::UnboundedSender<HubItem>>,
    /// While handing over and `until` is not known yet: the shared watch's responses, kept for it rather than
    /// given (the hand-over revision may be below them, and the client must not get events past it from the
    /// shared watch: etcd's progress answer, at or after that revision, would follow them).
    parked: Option<Vec<Resp>>,
}

/// One of etcd's responses on a shared watch, as the subscribers are given it.
#[derive(Clone)]
struct Resp {
    frame: Framed,
    /// etcd's watch ID in it.
    watch_id: i64,
    created: bool,
    has_events: bool,
    /// Its lowest event revision, if it has events.
    lowest: Option<i64>,
    /// Everything up to this revision has been passed on with it.
    upto: i64,
}

/// A client watch's place in a shared watch; leaves it when dropped.
pub struct Subscription {
    watch: Arc<SharedWatch>,
    token: u64,
    metrics: Arc<Metrics>,
}

/// Where a hand-over stands.
#[derive(Debug, PartialEq, Eq)]
pub enum HandOver {
    /// [`HubItem::HandedOver`] follows the subscriber's last frames (at once if it has had everything up to the
    /// hand-over revision, else once the shared watch passes it).
    Later,
    /// The subscriber had already left (the shared watch ended, or it was detached before the hand-over began).
    Gone,
}

/// How a create is served.
pub enum Joined {
    /// By a shared watch; its `created` answer is in the stream's queue (or will be, once etcd answers).
    Shared(Subscription),
    /// By an upstream watch of the stream's own: forward the create.
    Own,
}

/// Only what the proxy reads of etcd's responses on a shared watch.
#[derive(Clone, PartialEq, Message)]
struct Head {
    #[prost(bytes = "bytes", tag = "1")]
    header: Bytes,
    #[prost(int64, tag = "2")]
    watch_id: i64,
    #[prost(bool, tag = "3")]
    created: bool,
    #[prost(bool, tag = "4")]
    canceled: bool,
    #[prost(int64, tag = "5")]
    compact_revision: i64,
    #[prost(message, repeated, tag = "11")]
    events: Vec<EventHead>,
}

#[derive(Clone, PartialEq, Message)]
struct EventHead {
    #[prost(message, optional, tag = "2")]
    kv: Option<KvHead>,
}

#[derive(Clone, PartialEq, Message)]
struct KvHead {
    #[prost(int64, tag = "3")]
    mod_revision: i64,
}

#[derive(Clone, PartialEq, Message)]
struct HeaderHead {
    #[prost(int64, tag = "3")]
    revision: i64,
}

/// What the proxy reads of etcd's Status answer.
#[derive(Clone, PartialEq, Message)]
struct StatusHead {
    #[prost(string, tag = "2")]
    version: String,
}

/// Whether etcd `version` ("3.5.16") answers progress requests in order with its events (3.5.8 and later).
fn orders_progress(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor, patch) >= (3, 5, 8)
}

/// What is left of a Range answer: its header.
#[derive(Clone, PartialEq, Message)]
struct RangeHead {
    #[prost(bytes = "bytes", tag = "1")]
    header: Bytes,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// === impl Hub ===

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Hub {
        Hub {
            watches: Arc::default(),
            metrics,
            tokens: AtomicU64::new(1),
            ordered_progress: Default::default(),
            revisions: Revisions::default(),
        }
    }

    /// Whether etcd's progress answers are ordered with the events of their stream (etcd 3.5.8 and later): then
    /// a shared watch's progress answer says up to which revision it has passed everything on. Asked once
    /// (Maintenance/Status); `false` while etcd cannot be asked (asked again next time).
    pub async fn ordered_progress(&self, upstream: &Upstream) -> bool {
        let asked = self
            .ordered_progress
            .get_or_try_init(|| async {
                let meta = CallMeta::default().with_timeout(Some(LOOKUP_TIMEOUT));
                let status: StatusHead =
                    upstream.unary_decoded(methods::MAINTENANCE_STATUS, pb::StatusRequest {}, &meta).await?;
                Ok::<bool, Status>(orders_progress(&status.version))
            })
            .await;
        asked.copied().unwrap_or(false)
    }

    /// Serve `create` (already checked and recorded; `watch_id` is its ID on the client stream) from a shared
    /// watch if the rules above allow, else [`Joined::Own`].
    pub async fn join(
        &self,
        create: &pb::WatchCreateRequest,
        watch_id: i64,
        down: &Down,
        detach: &DetachTx,
        upstream: &Upstream,
        meta: &CallMeta,
    ) -> Joined {
        let Some(key) = Key::of(create, meta) else { return Joined::Own };
        let start = create.start_revision;
        // For a create from now: the current revision and the header that says so, read after it arrived.
        let mut now: Option<(i64, Bytes)> = None;
        // A shared watch being made is waited for, a lookup is made, then the rules decide: a few rounds at most.
        for _ in 0..4 {
            let next = {
                let mut map = lock(&self.watches);
                let open = map.get(&key).filter(|w| !lock(&w.state).closed).cloned();
                match open {
                    None => {
                        let (watch, requests) = SharedWatch::new(start);
                        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
                        let delivered = start.saturating_sub(1);
                        let sub = Sub::new(token, watch_id, down, detach, 0, delivered, false);
                        lock(&watch.state).subs.push(sub);
                        self.metrics.shared_watch_subscribers.inc();
                        map.insert(key.clone(), watch.clone());
                        let ready = watch.ready.subscribe();
                        let mut first = create.clone();
                        first.watch_id = 0;
                        let run = Run {
                            watches: self.watches.clone(),
                            key: key.clone(),
                            watch: watch.clone(),
                            metrics: self.metrics.clone(),
                        };
                        tokio::spawn(run.run(upstream.clone(), first, requests, meta.with_timeout(None)));
                        Next::Made(watch, token, ready)
                    }
                    Some(watch) => {
                        let mut st = lock(&watch.state);
                        if !st.created {
                            Next::Wait(watch.ready.subscribe())
                        } else {
                            let from = match (&now, start) {
                                (_, s) if s > 0 => Some(s),
                                // From now, of a watch still catching up (see `made_at`).
                                _ if st.delivered < st.made_at => return Joined::Own,
                                (Some((rev, _)), _) => Some(rev + 1),
                                (None, _) => None,
                            };
                            match from {
                                None => Next::Lookup,
                                Some(from) if st.delivered < from => {
                                    let header = match &now {
                                        Some((_, header)) if start == 0 => header.clone(),
                                        _ => st.header.clone(),
                                    };
                                    let created = pb::WatchResponse {
                                        header: pb::ResponseHeader::decode(header).ok(),
                                        watch_id,
                                        created: true,
                                        ..Default::default()
                                    };
                                    if down.try_send(HubItem::Frame(Framed::encode(&created).into_bytes())).is_err() {
                                        return Joined::Own;
                                    }
                                    let token = self.tokens.fetch_add(1, Ordering::Relaxed);
                                    st.subs.push(Sub::new(token, watch_id, down, detach, from, from - 1, true));
                                    self.metrics.shared_watch_subscribers.inc();
                                    drop(st);
                                    let metrics = self.metrics.clone();
                                    return Joined::Shared(Subscription { watch, token, metrics });
                                }
                                // It has delivered events this create must see again: etcd replays them.
                                Some(_) => return Joined::Own,
                            }
                        }
                    }
                }
            };
            match next {
                Next::Made(watch, token, mut ready) => {
                    // Its `created` answer (or the watch's end) is in the stream's queue once this is true.
                    let _ = ready.wait_for(|r| *r).await;
                    return Joined::Shared(Subscription { watch, token, metrics: self.metrics.clone() });
                }
                Next::Wait(mut ready) => {
                    let _ = ready.wait_for(|r| *r).await;
                }
                Next::Lookup => match self.revisions.current(upstream, meta, &self.metrics).await {
                    Some(found) => now = Some(found),
                    None => return Joined::Own,
                },
            }
        }
        Joined::Own
    }
}

/// What [`Hub::join`] does after it let go of its locks.
enum Next {
    /// Made a shared watch for this create: wait for etcd's answer.
    Made(Arc<SharedWatch>, u64, watch::Receiver<bool>),
    Wait(watch::Receiver<bool>),
    Lookup,
}

/// etcd's current revision and the header that says so, from a linearizable read of one key (the proxy's own
/// identity may read it; only the answer's header is used).
async fn current_revision(upstream: &Upstream, meta: &CallMeta) -> Option<(i64, Bytes)> {
    let req = pb::RangeRequest { key: b"\0".to_vec(), keys_only: true, ..Default::default() };
    let answer: RangeHead = upstream.unary_decoded(methods::KV_RANGE, req, meta).await.ok()?;
    let revision = HeaderHead::decode(answer.header.clone()).ok()?.revision;
    (revision > 0).then_some((revision, answer.header))
}

/// What a lookup of the current revision found (`None`: it failed), once it has.
type Found = Option<Option<(i64, Bytes)>>;

/// Lookups of etcd's current revision, shared by the creates from now that wait for one: at most one is in
/// flight; creates that arrive meanwhile wait for the *next*, sent as soon as it is answered, so each is answered
/// by a lookup sent after it arrived (as a lookup of its own would be). A burst of agents re-creating their
/// watches (after a restart of the proxy) then costs etcd a few reads, not one per watch.
#[derive(Default)]
struct Revisions {
    lane: Arc<Mutex<Lane>>,
}

#[derive(Default)]
struct Lane {
    in_flight: bool,
    /// The next lookup's answer, for the creates waiting for it.
    next: Option<watch::Sender<Found>>,
}

impl Revisions {
    /// The current revision, from a lookup sent after this call; `None` if etcd could not be asked.
    async fn current(&self, upstream: &Upstream, meta: &CallMeta, metrics: &Metrics) -> Option<(i64, Bytes)> {
        let mut answer = {
            let mut lane = lock(&self.lane);
            if lane.in_flight {
                lane.next.get_or_insert_with(|| watch::Sender::new(None)).subscribe()
            } else {
                lane.in_flight = true;
                let tx = watch::Sender::new(None);
                let rx = tx.subscribe();
                let run = Lookups { lane: self.lane.clone(), upstream: upstream.clone(), finished: false };
                tokio::spawn(run.run(tx, meta.with_timeout(Some(LOOKUP_TIMEOUT))));
                rx
            }
        };
        metrics.shared_watch_revision_waits.inc();
        answer.wait_for(Option::is_some).await.ok()?.clone().flatten()
    }
}

/// The task that makes the lookups one after the other while creates wait for them.
struct Lookups {
    lane: Arc<Mutex<Lane>>,
    upstream: Upstream,
    /// Ended by itself (the lane is already free); else dropped with its runtime.
    finished: bool,
}

impl Lookups {
    async fn run(mut self, mut answer: watch::Sender<Found>, meta: CallMeta) {
        loop {
            let found = current_revision(&self.upstream, &meta).await;
            answer.send_replace(Some(found));
            let mut lane = lock(&self.lane);
            match lane.next.take() {
                Some(next) => answer = next,
                None => {
                    // Nobody waits: the next create starts a lookup (and a task) of its own.
                    lane.in_flight = false;
                    drop(lane);
                    self.finished = true;
                    return;
                }
            }
        }
    }
}

impl Drop for Lookups {
    /// Dropped before it finished (its runtime shuts down): the creates waiting for it are let go (they get
    /// watches of their own), and the next create starts a lookup.
    fn drop(&mut self) {
        if !self.finished {
            let mut lane = lock(&self.lane);
            lane.in_flight = false;
            lane.next = None;
        }
    }
}

// === impl Key ===

impl Key {
    /// The key of a create that may share, or `None`.
    fn of(create: &pb::WatchCreateRequest, meta: &CallMeta) -> Option<Key> {
        let shareable = create.watch_id == 0
            && !create.fragment
            && create.start_revision >= 0
            && !create.key.is_empty()
            && !empty_range(create)
            && meta.timeout().is_none();
        shareable.then(|| Key {
            worker: crate::runtime::current_worker(),
            forwarded: meta.forwarded().clone(),
            key: create.key.clone(),
            range_end: create.range_end.clone(),
            filters: create.filters.clone(),
            prev_kv: create.prev_kv,
            progress_notify: create.progress_notify,
        })
    }
}

/// Whether etcd refuses `create`'s interval as empty (`range_end` at or before `key`; `"\0"` means "to the end").
pub fn empty_range(create: &pb::WatchCreateRequest) -> bool {
    !create.range_end.is_empty() && create.range_end.as_slice() != b"\0" && create.key >= create.range_end
}

// === impl SharedWatch ===

impl SharedWatch {
    fn new(start: i64) -> (Arc<SharedWatch>, mpsc::Receiver<pb::WatchRequest>) {
        let (requests, rx) = mpsc::channel(4);
        let watch = Arc::new(SharedWatch {
            start,
            requests,
            state: Mutex::new(State::default()),
            ready: watch::Sender::new(false),
            left: Notify::new(),
            hand_over_pending: AtomicBool::new(false),
        });
        (watch, rx)
    }

    /// Ask etcd for a progress answer on the shared watch's stream.
    fn request_progress(&self) {
        let request = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(pb::WatchProgressRequest {})),
        };
        let _ = self.requests.try_send(request);
    }

    /// Whether a subscriber waits for the shared watch to pass its hand-over revision; if none does, the task
    /// stops asking (under the state's lock, where [`Subscription::hand_over`] sets `hand_over_pending`).
    /// Subscribers that have waited longer than [`HAND_OVER_DEADLINE`] leave, and their streams end.
    fn hand_over_waits(&self, metrics: &Metrics) -> bool {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let overdue = |s: &Sub| s.waiting_since.is_some_and(|since| now.duration_since(since) >= HAND_OVER_DEADLINE);
        if st.subs.iter().any(overdue) {
            let (late, kept): (Vec<Sub>, Vec<Sub>) = std::mem::take(&mut st.subs).into_iter().partition(overdue);
            st.subs = kept;
            for mut sub in late {
                tracing::warn!(
                    watch_id = sub.watch_id,
                    until = sub.until,
                    delivered = sub.delivered,
                    "a shared watch did not reach a watch's hand-over revision in time; its client stream ends \
                     with Unavailable (clients resume their watches)"
                );
                metrics.shared_watch_subscribers.dec();
                let status = Status::unavailable("etcd-guard: a watch hand-over did not complete; resume the watches");
                let _ = send(&mut sub, HubItem::Failed(status));
            }
        }
        let waits = st.subs.iter().any(|s| s.until > 0);
        if !waits {
            self.hand_over_pending.store(false, Ordering::Relaxed);
        }
        waits
    }

    /// Pass one of etcd's responses on; false once the watch has ended.
    fn on_frame(&self, frame: Framed, metrics: &Metrics) -> bool {
        let Ok(head) = Head::decode(frame.message_bytes()) else {
            self.fail(Status::internal("etcd-guard: cannot decode etcd's watch response"), metrics);
            return false;
        };
        let mut st = lock(&self.state);
        if !head.header.is_empty() {
            st.header = head.header.clone();
        }
        let header_revision = HeaderHead::decode(head.header.clone()).map(|h| h.revision).unwrap_or(0);
        if head.created {
            if head.canceled {
                // etcd refused the create: its answer, as it came, is the first subscriber's.
                for sub in std::mem::take(&mut st.subs) {
                    let _ = sub.down.try_send(HubItem::Frame(frame.clone().into_bytes()));
                    metrics.shared_watch_subscribers.dec();
                }
                st.closed = true;
                self.ready.send_replace(true);
                return false;
            }
            st.created = true;
            st.made_at = header_revision;
            st.delivered = if self.start > 0 { self.start - 1 } else { header_revision };
            let resp = Resp::of(frame, &head, None, st.delivered);
            let subs = std::mem::take(&mut st.subs);
            st.subs = deliver(subs, &resp, metrics);
            self.ready.send_replace(true);
            return true;
        }
        if head.watch_id == -1 && !head.canceled && head.events.is_empty() {
            // The answer to the proxy's own progress request: for no subscriber. Where etcd orders it with the
            // events, everything up to its revision has been passed on.
            if st.trust_progress && header_revision > 0 {
                st.delivered = st.delivered.max(header_revision);
                // Not those whose frames are parked: they have been given nothing of late.
                let subs = std::mem::take(&mut st.subs);
                st.subs = subs
                    .into_iter()
                    .filter_map(
                        |sub| if sub.parked.is_some() { Some(sub) } else { advanced(sub, header_revision, metrics) },
                    )
                    .collect();
            }
            return true;
        }
        if head.canceled {
            // etcd ended the shared watch. A compaction cancels only the subscribers that still need compacted
            // revisions (as etcd would); the others go on with watches of their own. Any other reason is every
            // subscriber's.
            for mut sub in std::mem::take(&mut st.subs) {
                metrics.shared_watch_subscribers.dec();
                let gets_cancel = head.compact_revision == 0 || sub.delivered + 1 < head.compact_revision;
                if sub.handing {
                    // Its own watch exists already: the hand-over ends here (with etcd's cancel first if the
                    // subscriber needed compacted revisions), so the stream stops holding etcd's frames for it.
                    // Parked frames are not given (the hand-over revision is not known).
                    if gets_cancel {
                        let _ = rewrite(frame.message(), sub.watch_id, 0, 0).map(|b| send(&mut sub, HubItem::Frame(b)));
                    }
                    let id = sub.watch_id;
                    let _ = send(&mut sub, HubItem::HandedOver(id));
                } else if !gets_cancel {
                    detach(sub, metrics);
                } else if let Some(bytes) = rewrite(frame.message(), sub.watch_id, 0, 0)
                    && send(&mut sub, HubItem::Frame(bytes)) != Sent::Queued
                {
                    detach(sub, metrics);
                }
            }
            st.closed = true;
            return false;
        }
        let bounds = head.revisions();
        // A response without events is a progress notification: everything up to its header's revision is out.
        let upto = if head.events.is_empty() { header_revision } else { bounds.map_or(0, |(_, hi)| hi) };
        let resp = Resp::of(frame, &head, bounds.map(|(lo, _)| lo), upto);
        let subs = std::mem::take(&mut st.subs);
        st.subs = deliver(subs, &resp, metrics);
        st.delivered = st.delivered.max(upto);
        true
    }

    /// The shared watch failed: its subscribers' streams end with `status` (a subscriber whose queue is full goes
    /// on with a watch of its own instead).
    fn fail(&self, status: Status, metrics: &Metrics) {
        let mut st = lock(&self.state);
        for mut sub in std::mem::take(&mut st.subs) {
            metrics.shared_watch_subscribers.dec();
            if send(&mut sub, HubItem::Failed(status.clone())) != Sent::Queued {
                detach(sub, metrics);
            }
        }
        st.closed = true;
        drop(st);
        self.ready.send_replace(true);
    }
}

// === impl Sub ===

impl Sub {
    /// A subscriber of `watch_id` on the stream of `down` and `detach`, given everything up to `delivered`, that
    /// wants the events from `from` on (0: all), with its `created` answer queued (`announced`) or not.
    fn new(
        token: u64,
        watch_id: i64,
        down: &Down,
        detach: &DetachTx,
        from: i64,
        delivered: i64,
        announced: bool,
    ) -> Sub {
        let (down, detach) = (down.clone(), detach.clone());
        Sub {
            token,
            watch_id,
            down,
            detach,
            from,
            delivered,
            announced,
            handing: false,
            until: 0,
            waiting_since: None,
            spill: None,
            parked: None,
        }
    }

    /// Where its stream's own watch must resume if it leaves now.
    fn detached(&self) -> Detached {
        Detached { watch_id: self.watch_id, token: self.token, resume: self.delivered + 1, announced: self.announced }
    }
}

impl Resp {
    fn of(frame: Framed, head: &Head, lowest: Option<i64>, upto: i64) -> Resp {
        let (watch_id, created, has_events) = (head.watch_id, head.created, !head.events.is_empty());
        Resp { frame, watch_id, created, has_events, lowest, upto }
    }
}

/// Give `resp` to each subscriber (or park it for those whose hand-over revision is not known yet); the ones
/// still subscribed.
fn deliver(subs: Vec<Sub>, resp: &Resp, metrics: &Metrics) -> Vec<Sub> {
    let mut kept = Vec::with_capacity(subs.len());
    for mut sub in subs {
        if let Some(parked) = &mut sub.parked {
            parked.push(resp.clone());
            kept.push(sub);
        } else {
            kept.extend(offer(sub, resp, metrics));
        }
    }
    kept
}

/// Queue `resp` for `sub` (with its ID, without the events it must not see): `sub` if it stays subscribed.
fn offer(mut sub: Sub, resp: &Resp, metrics: &Metrics) -> Option<Sub> {
    let capped = sub.until > 0 && resp.upto > sub.until;
    let filtered = resp.has_events && (resp.lowest.is_some_and(|lo| sub.from > lo) || capped);
    let bytes = if filtered {
        rewrite(resp.frame.message(), sub.watch_id, sub.from, sub.until)
    } else if !resp.has_events && !resp.created && (sub.from > resp.upto + 1 || capped) {
        // A progress notification from before this subscriber's start, or after its hand-over.
        None
    } else if sub.watch_id == resp.watch_id {
        Some(resp.frame.clone().into_bytes())
    } else {
        rewrite(resp.frame.message(), sub.watch_id, 0, 0)
    };
    if let Some(bytes) = bytes {
        match send_counted(&mut sub, bytes) {
            Sent::Queued => {}
            Sent::Full => {
                metrics.shared_watch_subscribers.dec();
                detach(sub, metrics);
                return None;
            }
            Sent::Gone => {
                metrics.shared_watch_subscribers.dec();
                return None;
            }
        }
    }
    sub.announced = true;
    advanced(sub, resp.upto, metrics)
}

/// Give `sub` the responses parked for it during a hand-over, in order: `sub` if it stays subscribed.
fn unpark(mut sub: Sub, metrics: &Metrics) -> Option<Sub> {
    let parked = sub.parked.take().unwrap_or_default();
    parked.iter().try_fold(sub, |sub, resp| offer(sub, resp, metrics))
}

/// Tell a subscriber's stream to go on with a watch of its own.
fn detach(sub: Sub, metrics: &Metrics) {
    metrics.shared_watch_detaches.inc();
    sub.detach.push(sub.detached());
}

/// How an item went to a subscriber's stream.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Queued,
    /// Its queue is full (it is not handing over: it should be detached).
    Full,
    /// Its stream is gone.
    Gone,
}

/// Queue a frame of the shared watch for `sub`, counted in its stream's queued bytes: `Full` (as for a full queue)
/// if they would go past [`QUEUED_BYTES`], unless it is handing over (see [`send`]).
fn send_counted(sub: &mut Sub, bytes: Bytes) -> Sent {
    let len = bytes.len();
    let queued = &sub.detach.queued;
    // Counted before it is queued: the stream may take it (and count it off) at once.
    let before = queued.fetch_add(len, Ordering::Relaxed);
    // A frame larger than the bound still goes to a stream that has taken everything before it.
    if !sub.handing && before > 0 && before.saturating_add(len) > QUEUED_BYTES {
        sub.detach.took(len);
        return Sent::Full;
    }
    let sent = send(sub, HubItem::Counted(bytes));
    if sent != Sent::Queued {
        sub.detach.took(len);
    }
    sent
}

/// Queue `item` for `sub`. A subscriber handing over is never refused for being slow: what does not fit waits in
/// a spill queue that a task of its own empties into the stream's queue, in order (it holds at most what the
/// shared watch sends up to the hand-over revision).
fn send(sub: &mut Sub, item: HubItem) -> Sent {
    if let Some(spill) = &sub.spill {
        return if spill.send(item).is_ok() { Sent::Queued } else { Sent::Gone };
    }
    match sub.down.try_send(item) {
        Ok(()) => Sent::Queued,
        Err(mpsc::error::TrySendError::Closed(_)) => Sent::Gone,
        Err(mpsc::error::TrySendError::Full(item)) if sub.handing => {
            let (spill, mut rx) = mpsc::unbounded_channel();
            let down = sub.down.clone();
            tokio::spawn(async move {
                while let Some(item) = rx.recv().await {
                    if down.send(item).await.is_err() {
                        break;
                    }
                }
            });
            let queued = spill.send(item).is_ok();
            sub.spill = Some(spill);
            if queued { Sent::Queued } else { Sent::Gone }
        }
        Err(mpsc::error::TrySendError::Full(_)) => Sent::Full,
    }
}

/// Everything up to `upto` has gone to `sub` (or was not for it): `sub` if it stays; `None` once the shared
/// watch has passed its hand-over revision (it is told, and leaves).
fn advanced(mut sub: Sub, upto: i64, metrics: &Metrics) -> Option<Sub> {
    sub.delivered = sub.delivered.max(upto);
    // Once the shared watch is past the subscriber's start, no later response has events before it.
    if upto + 1 >= sub.from {
        sub.from = 0;
    }
    if sub.until == 0 || upto < sub.until {
        return Some(sub);
    }
    metrics.shared_watch_subscribers.dec();
    metrics.shared_watch_detaches.inc();
    let id = sub.watch_id;
    let _ = send(&mut sub, HubItem::HandedOver(id));
    None
}

/// One shared watch's task: reads etcd's responses and passes them on until the last subscriber leaves or the
/// watch ends.
struct Run {
    watches: Arc<Mutex<HashMap<Key, Arc<SharedWatch>>>>,
    key: Key,
    watch: Arc<SharedWatch>,
    metrics: Arc<Metrics>,
}

impl Run {
    async fn run(
        self,
        upstream: Upstream,
        create: pb::WatchCreateRequest,
        requests: mpsc::Receiver<pb::WatchRequest>,
        meta: CallMeta,
    ) {
        self.metrics.shared_watches.inc();
        // The create first, then progress requests; the request stream stays open while the shared watch lives.
        let request = pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) };
        let requests = futures_util::stream::once(async { request }).chain(ReceiverStream::new(requests));
        let mut call =
            StreamCall::new(async move { upstream.streaming(methods::WATCH_WATCH, Box::pin(requests), &meta).await });
        // Armed while a subscriber waits for its hand-over revision: the progress request is sent again.
        let mut retry: Option<Pin<Box<Sleep>>> = None;
        loop {
            let left = self.watch.left.notified();
            tokio::select! {
                () = async { if let Some(r) = retry.as_mut() { r.await } }, if retry.is_some() => {
                    retry = None;
                    if self.watch.hand_over_waits(&self.metrics) {
                        self.watch.request_progress();
                    }
                }
                next = call.next() => match next {
                    Some(Ok(frame)) => {
                        if !self.watch.on_frame(frame, &self.metrics) {
                            break;
                        }
                    }
                    Some(Err(status)) => {
                        self.watch.fail(status, &self.metrics);
                        break;
                    }
                    None => {
                        self.watch.fail(Status::unavailable("etcd-guard: etcd ended a shared watch"), &self.metrics);
                        break;
                    }
                },
                () = left => {}
            }
            if self.end_if_unused() {
                break;
            }
            if retry.is_none() && self.watch.hand_over_pending.load(Ordering::Relaxed) {
                retry = Some(Box::pin(tokio::time::sleep(PROGRESS_RETRY)));
            }
        }
        self.close();
        self.metrics.shared_watches.dec();
    }

    /// End the watch if nobody is subscribed (under the hub's lock, so nobody joins it meanwhile).
    fn end_if_unused(&self) -> bool {
        let mut map = lock(&self.watches);
        let mut st = lock(&self.watch.state);
        if !st.subs.is_empty() {
            return false;
        }
        st.closed = true;
        if map.get(&self.key).is_some_and(|w| Arc::ptr_eq(w, &self.watch)) {
            map.remove(&self.key);
        }
        true
    }

    /// Out of the hub, closed, and anyone waiting for it told.
    fn close(&self) {
        let mut map = lock(&self.watches);
        lock(&self.watch.state).closed = true;
        if map.get(&self.key).is_some_and(|w| Arc::ptr_eq(w, &self.watch)) {
            map.remove(&self.key);
        }
        drop(map);
        self.watch.ready.send_replace(true);
    }
}

// === impl Subscription ===

impl Subscription {
    /// Leave the shared watch (the client canceled its watch): the header etcd's cancel answer carries, or `None`
    /// if the subscriber had already left (detached, or the watch ended).
    pub fn leave(&self) -> Option<Option<pb::ResponseHeader>> {
        let st = lock(&self.watch.state);
        let at = self.position(&st)?;
        let (_, header) = self.take_out(st, at);
        Some(pb::ResponseHeader::decode(header).ok())
    }

    /// Whether it is still one of its shared watch's subscribers.
    #[cfg(test)]
    pub fn is_subscribed(&self) -> bool {
        self.position(&lock(&self.watch.state)).is_some()
    }

    /// Leave the shared watch to go on with a watch of the stream's own (where to resume), or `None` if the
    /// subscriber had already left.
    pub fn detach(&self) -> Option<Detached> {
        let st = lock(&self.watch.state);
        let at = self.position(&st)?;
        let (sub, _) = self.take_out(st, at);
        self.metrics.shared_watch_detaches.inc();
        Some(sub.detached())
    }

    /// Start moving to a watch of the stream's own ([`Subscription::hand_over`]): from now on the subscriber is
    /// not detached for being slow, and the shared watch's responses are kept for it until the hand-over revision
    /// is known. False if it has already left.
    pub fn begin_handover(&self) -> bool {
        let mut st = lock(&self.watch.state);
        let Some(at) = self.position(&st) else { return false };
        st.subs[at].handing = true;
        st.subs[at].parked = Some(Vec::new());
        true
    }

    /// End a hand-over at once (a reload withdrew the watch after etcd answered its own watch's create): the
    /// subscriber is given nothing more from the shared watch, and [`HubItem::HandedOver`] follows what it was
    /// given already, so that the stream stops holding etcd's frames for it. False if it had already left.
    pub fn cut_hand_over(&self) -> bool {
        let st = lock(&self.watch.state);
        let Some(at) = self.position(&st) else { return false };
        let (mut sub, _) = self.take_out(st, at);
        let id = sub.watch_id;
        let _ = send(&mut sub, HubItem::HandedOver(id));
        true
    }

    /// The hand-over did not happen (etcd refused the own watch's create): the subscriber stays, is given what was
    /// parked for it, and may be detached for being slow again.
    pub fn end_handover(&self) {
        let mut st = lock(&self.watch.state);
        let Some(at) = self.position(&st) else { return };
        let mut sub = st.subs.swap_remove(at);
        sub.handing = false;
        st.subs.extend(unpark(sub, &self.metrics));
        drop(st);
        self.watch.left.notify_one();
    }

    /// The stream's own watch for this subscriber's ID exists from `revision + 1` on (etcd's `created` answer to
    /// a create from now): the shared watch gives the subscriber what it has not yet been given up to
    /// `revision` (what was parked for it first), then it leaves ([`HubItem::HandedOver`]). What it had when the
    /// hand-over began is at most `revision` (etcd had sent it before it made the own watch), and it is given
    /// nothing past `revision`.
    pub fn hand_over(&self, revision: i64) -> HandOver {
        let mut st = lock(&self.watch.state);
        let Some(at) = self.position(&st) else { return HandOver::Gone };
        let mut sub = st.subs.swap_remove(at);
        sub.until = revision.max(1);
        let left = unpark(sub, &self.metrics);
        // Given everything up to `revision` already (or nothing came since the hand-over began): it leaves now.
        // Only then: `advanced` takes its revision for the shared watch's position, and a subscriber that joined
        // from now can be ahead of a shared watch still catching up (its `from` must keep cutting what comes).
        let left = left.and_then(|sub| {
            let upto = sub.delivered;
            if upto >= sub.until { advanced(sub, upto, &self.metrics) } else { Some(sub) }
        });
        let Some(sub) = left else {
            drop(st);
            self.watch.left.notify_one();
            return HandOver::Later;
        };
        st.subs.push(sub);
        st.trust_progress = true;
        if let Some(sub) = st.subs.last_mut() {
            sub.waiting_since = Some(Instant::now());
        }
        // The watch's task asks again while the answer does not come.
        self.watch.hand_over_pending.store(true, Ordering::Relaxed);
        drop(st);
        // A shared watch with nothing to send would not pass `revision`: its progress answer says it has (etcd
        // 3.5.8 and later answer in order with the events, once the watch has sent everything up to there).
        self.watch.request_progress();
        self.watch.left.notify_one();
        HandOver::Later
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    /// Where this subscriber is among the shared watch's, if it is still there.
    fn position(&self, st: &State) -> Option<usize> {
        st.subs.iter().position(|s| s.token == self.token)
    }

    /// Take this subscriber (at `at`) out of the shared watch, let go of its state, and tell its task: the
    /// subscriber and the header of etcd's last response.
    fn take_out(&self, mut st: MutexGuard<'_, State>, at: usize) -> (Sub, Bytes) {
        let sub = st.subs.swap_remove(at);
        let header = st.header.clone();
        drop(st);
        self.metrics.shared_watch_subscribers.dec();
        self.watch.left.notify_one();
        (sub, header)
    }
}

/// A subscription to a shared watch of no upstream watch, for tests of the stream's side.
#[cfg(test)]
pub fn test_subscription() -> Subscription {
    let (watch, _) = SharedWatch::new(0);
    Subscription { watch, token: 1, metrics: Arc::new(Metrics::new()) }
}

/// A subscription to a shared watch of no upstream watch, subscribed (its stream's queue is gone: what the shared
/// watch would give it is lost), for tests of the stream's side.
#[cfg(test)]
pub fn test_live_subscription() -> Subscription {
    let (watch, _) = SharedWatch::new(0);
    let (down, _) = mpsc::channel(1);
    let token = 1;
    lock(&watch.state).subs.push(Sub::new(token, 0, &down, &DetachTx::default(), 0, -1, true));
    Subscription { watch, token, metrics: Arc::new(Metrics::new()) }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.leave();
    }
}

/// etcd's response `message` as a frame for another watch ID, without the events before `from` or after `until`
/// (0: no bound); `None` if no event is left of a response that had some.
pub fn rewrite(message: &[u8], watch_id: i64, from: i64, until: i64) -> Option<Bytes> {
    let mut out = BytesMut::with_capacity(message.len() + 16);
    out.put_bytes(0, 5);
    let (mut kept, mut dropped) = (0usize, 0usize);
    let mut rest = message;
    while !rest.is_empty() {
        let before = rest;
        let key = read_varint(&mut rest)?;
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => {
                read_varint(&mut rest)?;
                None
            }
            1 => {
                rest = rest.get(8..)?;
                None
            }
            2 => {
                let len = usize::try_from(read_varint(&mut rest)?).ok()?;
                let payload = rest.get(..len)?;
                rest = rest.get(len..)?;
                Some(payload)
            }
            5 => {
                rest = rest.get(4..)?;
                None
            }
            _ => return None,
        };
        let whole = before.get(..before.len() - rest.len())?;
        match (field, payload) {
            // etcd's watch ID: replaced below.
            (2, _) => continue,
            (11, Some(event)) if from > 0 || until > 0 => {
                let revision = EventHead::decode(event).ok()?.kv.map(|kv| kv.mod_revision).unwrap_or(0);
                if revision < from || (until > 0 && revision > until) {
                    dropped += 1;
                    continue;
                }
                kept += 1;
            }
            _ => {}
        }
        out.put_slice(whole);
    }
    if dropped > 0 && kept == 0 {
        return None;
    }
    if watch_id != 0 {
        // Field 2, varint; a negative ID is ten bytes, as protobuf encodes every negative int64.
        out.put_u8(2 << 3);
        let mut v = watch_id as u64;
        while v >= 0x80 {
            out.put_u8((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.put_u8(v as u8);
    }
    let len = u32::try_from(out.len() - 5).ok()?;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Some(out.freeze())
}

impl Head {
    /// The lowest and highest revision of its events, if it has any.
    fn revisions(&self) -> Option<(i64, i64)> {
        let revisions = self.events.iter().filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision));
        revisions.fold(None, |acc, r| Some(acc.map_or((r, r), |(lo, hi): (i64, i64)| (lo.min(r), hi.max(r)))))
    }
}

/// A protobuf varint from the front of `buf`.
fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = buf.get(i + 1..)?;
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use etcd_guard_proto::mvccpb;

    fn event(key: &str, revision: i64) -> mvccpb::Event {
        mvccpb::Event {
            kv: Some(mvccpb::KeyValue {
                key: key.into(),
                value: b"secret".to_vec(),
                mod_revision: revision,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn response(watch_id: i64, revisions: &[i64]) -> pb::WatchResponse {
        pb::WatchResponse {
            header: Some(pb::ResponseHeader { revision: 42, cluster_id: 7, ..Default::default() }),
            watch_id,
            events: revisions.iter().map(|r| event("k", *r)).collect(),
            ..Default::default()
        }
    }

    fn decoded(frame: &Bytes) -> pb::WatchResponse {
        let framed = Framed::parse(frame.clone()).unwrap();
        pb::WatchResponse::decode(framed.message_bytes()).unwrap()
    }

    #[test]
    fn a_rewritten_response_is_etcds_with_another_watch_id() {
        let original = response(0, &[5, 6]);
        for id in [0, 1, 7, 300_000] {
            let frame = rewrite(&original.encode_to_vec(), id, 0, 0).unwrap();
            assert_eq!(decoded(&frame), pb::WatchResponse { watch_id: id, ..original.clone() });
        }
        let from_id = response(3, &[5]);
        let frame = rewrite(&from_id.encode_to_vec(), 0, 0, 0).unwrap();
        assert_eq!(decoded(&frame), pb::WatchResponse { watch_id: 0, ..from_id });
    }

    #[test]
    fn events_before_a_subscribers_start_are_left_out() {
        let original = response(0, &[5, 6, 6, 7]);
        let frame = rewrite(&original.encode_to_vec(), 2, 6, 0).unwrap();
        assert_eq!(decoded(&frame), pb::WatchResponse { watch_id: 2, ..response(0, &[6, 6, 7]) });
        assert_eq!(rewrite(&original.encode_to_vec(), 2, 8, 0), None);
        // Up to a hand-over revision.
        let frame = rewrite(&original.encode_to_vec(), 2, 0, 6).unwrap();
        assert_eq!(decoded(&frame), pb::WatchResponse { watch_id: 2, ..response(0, &[5, 6, 6]) });
        let frame = rewrite(&original.encode_to_vec(), 2, 6, 6).unwrap();
        assert_eq!(decoded(&frame), pb::WatchResponse { watch_id: 2, ..response(0, &[6, 6]) });
        assert_eq!(rewrite(&original.encode_to_vec(), 2, 0, 4), None);
        // A progress notification (no events) is not dropped by the filter.
        let progress = response(0, &[]);
        assert!(rewrite(&progress.encode_to_vec(), 2, 8, 0).is_some());
    }

    /// What a stream's queue gets up to and including [`HubItem::HandedOver`]: "watch created [revisions]" per
    /// frame, then "handed over ID".
    async fn until_handed_over(rx: &mut mpsc::Receiver<HubItem>) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let item = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await;
            match item.ok().flatten() {
                Some(HubItem::Frame(frame) | HubItem::Counted(frame)) => {
                    let r = decoded(&frame);
                    let revisions: Vec<i64> =
                        r.events.iter().filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision)).collect();
                    got.push(format!("{} {} {revisions:?}", r.watch_id, r.created));
                }
                Some(HubItem::HandedOver(id)) => {
                    got.push(format!("handed over {id}"));
                    return got;
                }
                other => panic!("{other:?} after {got:?}"),
            }
        }
    }

    /// A subscriber (token 1) of `watch` as [`Sub::new`] makes it, on a stream whose queue holds `queue` items:
    /// its subscription and the stream's queue.
    fn subscribed(
        watch: &Arc<SharedWatch>,
        queue: usize,
        (watch_id, from, delivered, announced): (i64, i64, i64, bool),
    ) -> (Subscription, mpsc::Receiver<HubItem>) {
        let (down, rx) = mpsc::channel(queue);
        let detach: DetachTx = Arc::default();
        lock(&watch.state).subs.push(Sub::new(1, watch_id, &down, &detach, from, delivered, announced));
        (Subscription { watch: watch.clone(), token: 1, metrics: Arc::new(Metrics::new()) }, rx)
    }

    /// A stream that does not read is detached from its shared watch once the shared watch's frames waiting for it
    /// pass `QUEUED_BYTES`, however few they are; what it takes is counted off.
    #[tokio::test]
    async fn a_stream_that_does_not_read_holds_at_most_queued_bytes_of_frames() {
        let metrics = Metrics::new();
        let (watch, _requests) = SharedWatch::new(0);
        let (_sub, mut rx) = subscribed(&watch, 256, (0, 0, -1, true));
        let big = |revision| {
            let mut r = response(0, &[revision]);
            if let Some(kv) = r.events[0].kv.as_mut() {
                kv.value = vec![b'x'; 1 << 20];
            }
            Framed::encode(&r)
        };
        // Three frames of a little over 1 MiB wait; a fourth would take them past 4 MiB.
        for revision in 1..=3 {
            assert!(watch.on_frame(big(revision), &metrics));
        }
        assert_eq!(lock(&watch.state).subs.len(), 1, "still subscribed with 3 MiB and more waiting");
        let detach = lock(&watch.state).subs[0].detach.clone();
        assert!(watch.on_frame(big(4), &metrics));
        assert!(lock(&watch.state).subs.is_empty(), "detached");
        assert_eq!(detach.take().len(), 1);
        // The stream takes what waits (its client side counts it off): nothing stays counted.
        while let Ok(item) = rx.try_recv() {
            if let HubItem::Counted(bytes) = item {
                detach.took(bytes.len());
            }
        }
        assert_eq!(detach.queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_subscriber_handing_over_is_given_nothing_past_the_hand_over_revision_then_told() {
        let metrics = Metrics::new();
        let (watch, _requests) = SharedWatch::new(0);
        // A stream whose queue holds two items: the rest spills.
        let (sub, mut rx) = subscribed(&watch, 2, (3, 0, -1, false));
        let header = Some(pb::ResponseHeader { revision: 10, ..Default::default() });
        let created = pb::WatchResponse { header, watch_id: 0, created: true, ..Default::default() };
        assert!(watch.on_frame(Framed::encode(&created), &metrics));
        assert!(watch.on_frame(Framed::encode(&response(0, &[11])), &metrics));
        assert!(sub.begin_handover());
        // Revisions 12 to 15 come while etcd makes the stream's own watch; etcd's answer says it starts after 13.
        for revision in 12..=15 {
            assert!(watch.on_frame(Framed::encode(&response(0, &[revision])), &metrics));
        }
        assert_eq!(sub.hand_over(13), HandOver::Later);
        // The client gets up to 13 from the shared watch, then the stream is told; 14 and 15 are the own watch's.
        let got = until_handed_over(&mut rx).await;
        assert_eq!(got, ["3 true []", "3 false [11]", "3 false [12]", "3 false [13]", "handed over 3"]);
        assert!(lock(&watch.state).subs.is_empty());
    }

    #[tokio::test]
    async fn a_subscriber_from_now_handing_over_from_a_shared_watch_still_catching_up_gets_no_earlier_events() {
        let metrics = Metrics::new();
        // A shared watch from revision 52, answered by etcd, that has passed nothing yet.
        let (watch, _requests) = SharedWatch::new(52);
        let header = Some(pb::ResponseHeader { revision: 102, ..Default::default() });
        let created = pb::WatchResponse { header, watch_id: 0, created: true, ..Default::default() };
        assert!(watch.on_frame(Framed::encode(&created), &metrics));
        // A watch from now joined when etcd was at 102: it wants 103 on.
        let (sub, mut rx) = subscribed(&watch, 8, (6, 103, 102, true));
        assert!(sub.begin_handover());
        assert_eq!(sub.hand_over(105), HandOver::Later);
        // The shared watch's catch-up comes after: only 103 to 105 are the subscriber's.
        assert!(watch.on_frame(Framed::encode(&response(0, &[52, 60, 103, 104, 105, 106])), &metrics));
        let got = until_handed_over(&mut rx).await;
        assert_eq!(got, ["6 false [103, 104, 105]", "handed over 6"]);
    }

    #[tokio::test]
    async fn a_hand_over_that_does_not_end_in_time_ends_the_client_stream() {
        let metrics = Metrics::new();
        let (watch, _requests) = SharedWatch::new(0);
        let (sub, mut rx) = subscribed(&watch, 8, (4, 0, 10, true));
        assert!(sub.begin_handover());
        // etcd's own watch starts after 20; the shared watch has passed 10 and nothing comes.
        assert_eq!(sub.hand_over(20), HandOver::Later);
        assert!(watch.hand_over_waits(&metrics), "it waits, and the task asks again");
        assert!(rx.try_recv().is_err());
        let started = Instant::now().checked_sub(HAND_OVER_DEADLINE).unwrap();
        lock(&watch.state).subs[0].waiting_since = Some(started);
        assert!(!watch.hand_over_waits(&metrics), "nobody waits any more");
        assert!(lock(&watch.state).subs.is_empty());
        match rx.try_recv() {
            Ok(HubItem::Failed(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn progress_answers_are_ordered_from_etcd_3_5_8() {
        for (version, ordered) in
            [("3.4.23", false), ("3.5.7", false), ("3.5.8", true), ("3.5.16", true), ("3.6.0", true), ("", false)]
        {
            assert_eq!(orders_progress(version), ordered, "{version}");
        }
    }

    #[test]
    fn a_broken_response_is_not_rewritten() {
        let mut bytes = response(0, &[5]).encode_to_vec();
        bytes.truncate(bytes.len() - 3);
        assert_eq!(rewrite(&bytes, 1, 0, 0), None);
        assert_eq!(rewrite(&[0xff; 12], 1, 0, 0), None);
    }
}
