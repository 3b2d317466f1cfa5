//! `etcdserverpb.Watch`: one upstream stream per client stream, so watch IDs, ordering, progress requests and
//! fragments behave exactly as with etcd. With `watch.coalesce`, a create may instead be served by a shared
//! upstream watch ([`super::watch_hub`]); the stream then assigns watch IDs itself (as etcd does, and sends them
//! to etcd explicitly), answers cancels of shared watches, and moves them to watches of its own before a progress
//! request or when the hub detaches them.
//!
//! etcd's responses are read by the client's response stream itself (`ToClient`): an event goes from the
//! upstream connection to the client connection without a task or queue of the proxy's in between.
//!
//! Each create request is checked for read access on its interval. A denied create does not end the stream:
//! like etcd, the proxy answers it with a created-and-canceled response (`watch_id` -1, `cancel_reason`
//! "rpc error: code = PermissionDenied desc = etcdserver: permission denied"). clientv3 pairs `created`
//! responses with its creates in order, so a denial waits behind creates still pending at etcd.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use etcd_guard_proto::etcdserverpb as pb;
use futures_util::StreamExt;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::watch_hub::{self, Detached, HandOver, HubItem, Joined, Subscription};
use super::{Answer, Arrival, Guard, HttpRequest, Outbound, StreamEnd, Verdict, View};
use crate::audit::{Decision, Event};
use crate::authz;
use crate::codec::{self, Framed, Part};
use crate::http2::UnreadLimit;
use crate::limits::WatchSlot;
use crate::metrics::Counted;
use crate::policy::{Access, KeyRange, Mode};
use crate::upstream::{CallMeta, StreamCall};

const WATCH: &str = "/etcdserverpb.Watch/Watch";
const RPC: &str = "Watch/Watch";

/// The `cancel_reason` etcd sends for a denied watch.
pub const DENIED_REASON: &str = "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    Some(match method {
        "Watch" => {
            let g2 = g.clone();
            g.bidi::<pb::WatchRequest, _, _>(req, RPC, move |inbound, meta, unread| serve(g2, inbound, meta, unread))
                .await
        }
        _ => return None,
    })
}

/// Only what the proxy reads of etcd's watch responses; every other field is skipped while decoding and etcd's
/// frame is forwarded as it came.
#[derive(Clone, PartialEq, Message)]
struct WatchResponseHead {
    /// etcd's `ResponseHeader`, left encoded (a slice of etcd's frame): it is read only for the few answers that
    /// create or cancel a watch, not for every event.
    #[prost(bytes = "bytes", tag = "1")]
    header: Bytes,
    #[prost(int64, tag = "2")]
    watch_id: i64,
    #[prost(bool, tag = "3")]
    created: bool,
    #[prost(bool, tag = "4")]
    canceled: bool,
}

/// etcd's watch answers longer than this are passed on in parts as they arrive, not held whole: one answer replaying
/// a long history (a watch from an old revision) can be hundreds of MB.
const LONG_FRAME: usize = 1 << 20;

/// The most bytes of etcd's answers a stream holds back while its watches hand over from shared watches (their
/// later frames wait for the shared watches' last ones, [`etcd_frame`]). Past it the stream ends as a hand-over
/// past its deadline does, with `Unavailable` (clients resume their watches on a new stream): etcd may send
/// faster than a shared watch catches up, and nothing else bounds what waits.
const MAX_HELD_BYTES: usize = 64 << 20;

/// The field number of a watch answer's events. etcd writes a message's fields in the order of their numbers, so
/// every field the proxy reads comes before the first event.
const EVENTS_FIELD: u64 = 11;

/// The head of a watch answer from the start of its message (the fields before its events), if all of it is there,
/// it parses and it has etcd's header (which etcd always sends, first).
fn head_before_events(start: &[u8]) -> Option<WatchResponseHead> {
    use prost::encoding::decode_varint;
    let mut rest = start;
    loop {
        let field_start = rest;
        let key = decode_varint(&mut rest).ok()?;
        if key >> 3 == EVENTS_FIELD {
            let head_len = start.len() - field_start.len();
            let head = WatchResponseHead::decode(start.get(..head_len)?).ok()?;
            return (!head.header.is_empty()).then_some(head);
        }
        let skip = match key & 7 {
            0 => {
                decode_varint(&mut rest).ok()?;
                0
            }
            1 => 8,
            2 => usize::try_from(decode_varint(&mut rest).ok()?).ok()?,
            5 => 4,
            _ => return None,
        };
        rest = rest.get(skip..)?;
    }
}

/// A long answer of etcd's being handed on in parts ([`LONG_FRAME`]): until its last part nothing else reaches the
/// client.
enum Long {
    /// Passed on as it comes (an answer of this watch).
    Passing(i64),
    /// Of a watch a reload withdrew: dropped as it comes.
    Dropping,
    /// Gathered, then handled as a whole frame: one that answers a create or cancel, must wait while watches hand
    /// over, or whose head is not in its start.
    Gathering(BytesMut),
}

/// etcd's answer to a create whose client-chosen watch ID is already in use on the stream.
const DUPLICATE_ID_REASON: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// How many creates may wait for their answers on one stream (those the proxy refused wait behind those at etcd);
/// one more ends the stream with `ResourceExhausted`.
const MAX_PENDING_CREATES: usize = 4096;

/// How many frames of shared watches may wait for a client stream before its slowest shared watch is detached.
const HUB_QUEUE: usize = 256;

/// A create request waiting for its `created` answer, in the order the client sent them.
enum Pending {
    /// Forwarded to etcd; etcd's `created` response answers it. The interval is kept to re-check it when the
    /// policy changes; the ID is the one the proxy asked for (0: etcd chooses).
    Upstream(Option<KeyRange>, Option<WatchSlot>, i64),
    /// The proxy's own create for a client watch leaving a shared watch (same ID): etcd's `created` answer is not
    /// passed on, the client already had one.
    Internal(i64, Option<KeyRange>, Option<WatchSlot>, Option<Counted>),
    /// The same, from now, for a client watch handing over from its shared watch (in `handing`): etcd's
    /// `created` answer says from which revision on the own watch serves it ([`Subscription::hand_over`]).
    Handover(i64),
    /// Refused by the proxy (denied, or over a limit) with this cancel reason; answered as soon as everything
    /// before it is answered.
    Refused(String),
}

/// An open watch: what it watches and the limit slot it holds.
struct Active {
    range: Option<KeyRange>,
    _slot: Option<WatchSlot>,
    _counted: Option<Counted>,
}

#[derive(Default)]
struct Order {
    pending: VecDeque<Pending>,
    /// The header of etcd's last `created` response, reused in denials as etcd would fill it.
    header: Option<pb::ResponseHeader>,
    /// Open watches (etcd's watch id) and what they watch.
    active: HashMap<i64, Active>,
    /// Watches the proxy canceled because a reload withdrew the permission; etcd's cancel answer is replaced by
    /// etcd's permission-denied cancel.
    revoked: HashSet<i64>,
    /// The stream's watch IDs, when it may have shared watches.
    ids: Ids,
    /// Client watches served by shared watches, by ID.
    joined: HashMap<i64, JoinedWatch>,
    /// A progress request was seen: the stream's watches are its own from then on.
    no_share: bool,
    /// Client watches handing over from their shared watches to watches of the stream's own, by ID; while any
    /// is, etcd's frames for them (and progress answers) wait in `held`, and so does every frame etcd sent after
    /// the first held one (etcd's order on the stream is kept: a progress answer comes after every event up to
    /// its revision and before any later one).
    handing: HashMap<i64, JoinedWatch>,
    held: VecDeque<Framed>,
    /// The bytes in `held` (at most [`MAX_HELD_BYTES`]).
    held_bytes: usize,
    /// How many of the creates at the front of `pending` were decided before the last policy reload. A reload
    /// checks the open watches again, but these are not open yet: each watch etcd opens for one of them is
    /// checked as it opens ([`allowed_after_reload`]), so none escapes the reload.
    before_reload: usize,
    /// What the inbound loop still has to do for such watches, and for open watches a reload withdrew.
    after_reload: Vec<AfterReload>,
    /// The policy generation the open watches were last checked under. Whoever sees a newer one first (the
    /// stream to the client before its next frame, or the inbound loop woken by the reload) checks them
    /// ([`revoke_active`]), so nothing etcd sends for a withdrawn watch reaches the client once the reload is in
    /// force (frames of shared watches excepted: the inbound loop takes those back).
    checked: u64,
}

/// Work for the inbound loop about a watch a reload withdrew, or one etcd opened for a create decided before it.
enum AfterReload {
    /// The reload withdrew it (it is in `revoked` already): send etcd its cancel and record it.
    Cancel(i64, String),
    /// etcd refused its hand-over and it stays on its shared watch: check it as a reload checks shared watches.
    CheckShared(i64),
}

impl Order {
    /// A reload withdrew watch `id`: from now etcd's frames for it are dropped, its cancel answer becomes etcd's
    /// permission-denied cancel, and the inbound loop sends etcd its cancel and records it.
    fn revoke(&mut self, id: i64, reason: String) {
        self.revoked.insert(id);
        self.after_reload.push(AfterReload::Cancel(id, reason));
    }

    /// A create decided under policy generation `decided`, on its way to etcd. Decided before a reload that the
    /// open watches were already checked for (the check ran between the decision and now, and did not see it):
    /// it is checked again as etcd opens it, as the creates pending then were (an earlier create marked with it is
    /// only checked once more).
    fn push_create(&mut self, pending: Pending, decided: u64) {
        self.pending.push_back(pending);
        if decided < self.checked {
            self.before_reload = self.pending.len();
        }
    }

    /// The oldest pending create, now answered by etcd; `stale` says whether it was decided before the last
    /// reload.
    fn answered(&mut self) -> Option<(Pending, bool)> {
        let pending = self.pending.pop_front()?;
        let stale = self.before_reload > 0;
        self.before_reload = self.before_reload.saturating_sub(1);
        Some((pending, stale))
    }
}

/// A reload landed since the open watches were last checked: take back those `view` no longer lets the caller
/// read (nothing more of them reaches the client from now on) and leave their cancels and records to the inbound
/// loop (`Order::after_reload`). Creates still on their way to etcd are checked as etcd opens them.
fn revoke_active(view: &View, o: &mut Order) {
    o.checked = view.generation;
    o.before_reload = o.pending.len();
    let gone = withdrawn_from(view, o.active.iter().map(|(id, a)| (*id, a.range.as_ref())));
    for (id, reason) in gone {
        o.active.remove(&id);
        o.revoke(id, reason);
    }
    // A shared watch the reload withdrew gets nothing more from now on, even while the inbound loop, which records
    // it and answers the client (`revoke_withdrawn`), waits on something else (a join waiting for etcd).
    let shared = withdrawn_from(view, o.joined.iter().map(|(id, w)| (*id, w.range.as_ref())));
    for (id, _) in shared {
        if let Some(watch) = o.joined.get_mut(&id)
            && let Some(header) = watch.sub.leave()
        {
            watch.left = Some(header);
        }
    }
    // A watch handing over that the reload withdrew gets nothing more from its shared watch. If etcd has not opened
    // its own watch yet, it leaves the shared watch now (its own watch is checked as etcd opens it, and revoked
    // then; the hand-over ends there, `handed`). If etcd has (the own watch, in `active`, was revoked above), the
    // shared watch's frames up to the hand-over revision are cut short: the hand-over ends as the stream reads
    // `HandedOver`, and etcd's frames held for it are released, those of the revoked watch dropped.
    if !o.handing.is_empty() {
        let gone = withdrawn_from(view, o.handing.iter().map(|(id, w)| (*id, w.range.as_ref())));
        for (id, _) in gone {
            let unanswered = o.pending.iter().any(|p| matches!(p, Pending::Handover(w) if *w == id));
            if let Some(watch) = o.handing.get(&id) {
                if unanswered {
                    let _ = watch.sub.leave();
                } else {
                    watch.sub.cut_hand_over();
                }
            }
        }
    }
}

/// etcd opened watch `id` for a create decided before a reload: whether the policy in force still lets the caller
/// read it. If not, it is revoked at once (etcd's frames for it are dropped from now, its cancel answer becomes
/// etcd's permission-denied cancel) and the inbound loop sends etcd its cancel.
fn allowed_after_reload(g: &Guard, o: &mut Order, id: i64, range: Option<&KeyRange>) -> bool {
    let view = g.conn.view(&g.shared);
    match withdrawn_from(&view, std::iter::once((id, range))).pop() {
        None => true,
        Some((id, reason)) => {
            o.revoke(id, reason);
            false
        }
    }
}

/// A client watch served by a shared watch.
struct JoinedWatch {
    sub: Subscription,
    /// Set when a reload made it leave its shared watch ahead of the inbound loop's revocation: the header of
    /// etcd's last response on the shared watch then, for the cancel the client gets.
    left: Option<Option<pb::ResponseHeader>>,
    /// Its create (with the start revision replaced when it moves to a watch of its own).
    create: pb::WatchCreateRequest,
    range: Option<KeyRange>,
    slot: Option<WatchSlot>,
    counted: Option<Counted>,
}

/// Watch IDs as etcd assigns them on a stream: a requested ID if unused, else the lowest unused one from a counter
/// that only goes up.
#[derive(Default)]
struct Ids {
    next: i64,
    used: HashSet<i64>,
    /// IDs of the stream's own watches whose cancel is on its way to etcd: etcd frees such an ID as it reads the
    /// cancel, before the next create, so a create may take it again at once.
    canceling: HashSet<i64>,
    /// IDs taken again that way, with how many of etcd's cancel answers for the earlier watches are still to come
    /// (each frees nothing: the ID is the new watch's).
    taken_again: HashMap<i64, u32>,
}

impl Ids {
    fn auto(&mut self) -> i64 {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        let id = self.next;
        self.next += 1;
        self.used.insert(id);
        id
    }

    /// Take `id`; false if it is in use (and its cancel is not on its way to etcd).
    fn claim(&mut self, id: i64) -> bool {
        if self.used.insert(id) {
            return true;
        }
        if self.canceling.remove(&id) {
            *self.taken_again.entry(id).or_default() += 1;
            return true;
        }
        false
    }

    /// The cancel of the stream's own watch `id` goes to etcd.
    fn canceling(&mut self, id: i64) {
        if self.used.contains(&id) {
            self.canceling.insert(id);
        }
    }

    /// etcd ended watch `id` (or refused its create).
    fn free(&mut self, id: i64) {
        if let Some(left) = self.taken_again.get_mut(&id) {
            *left -= 1;
            if *left == 0 {
                self.taken_again.remove(&id);
            }
            return;
        }
        self.canceling.remove(&id);
        self.used.remove(&id);
    }
}

/// The stream's side of the hub: its queue of shared watches' frames and where detached watches are announced.
struct HubSide {
    down: watch_hub::Down,
    detach: watch_hub::DetachTx,
}

/// The proxy's own messages to the client (refusals as whole frames, errors), beside etcd's.
type Down = mpsc::Sender<Result<Bytes, Status>>;

/// The checked requests on their way to etcd, boxed: a channel allocates room for 32 items when it is made, and a
/// `WatchRequest` is 96 bytes, so unboxed this channel alone would cost 3 KiB per watch stream.
type Up = mpsc::Sender<Box<pb::WatchRequest>>;

/// The client's side of one watch stream: etcd's responses, passed on as they are read (with queued refusals
/// released after each `created`), and the proxy's own messages.
struct ToClient {
    /// The upstream call, then etcd's responses.
    upstream: StreamCall,
    /// Refusals released by the last `created`, and etcd's frames held while watches handed over: sent before
    /// anything else.
    released: Released,
    /// Frames of shared watches (and the proxy's answers that must follow them), when the stream may have any;
    /// with the stream's count of their bytes.
    hub: Option<(mpsc::Receiver<HubItem>, watch_hub::DetachTx)>,
    own: mpsc::Receiver<Result<Bytes, Status>>,
    own_closed: bool,
    /// etcd's messages passed on since the proxy's own channel was last looked at.
    since_own: u32,
    /// A long answer of etcd's being handed on in parts.
    long: Option<Long>,
    /// Why the stream ends, when it must end on its way (too much held back while watches hand over).
    failed: Option<Status>,
    order: Arc<Mutex<Order>>,
    /// Checks watches etcd opens for creates decided before a reload.
    guard: Guard,
    /// Wakes the inbound loop for `Order::after_reload`.
    recheck: Arc<Notify>,
    /// The policy generation last seen (`Order::checked`, without taking the lock for every frame).
    checked: u64,
    gauge: prometheus_client::metrics::gauge::Gauge,
    /// The stream's end record, written as the stream ended for the client.
    end: StreamEnd,
}

async fn serve(
    g: Guard,
    mut inbound: Streaming<pb::WatchRequest>,
    meta: CallMeta,
    unread: Option<UnreadLimit>,
) -> Result<Outbound, Status> {
    let (down_tx, down_rx) = mpsc::channel(64);
    let (up_tx, up_rx): (Up, _) = mpsc::channel(64);
    let checked = g.shared.generation();
    let order = Arc::new(Mutex::new(Order { checked, ..Order::default() }));
    let stream_id = g.shared.audit.stream_id();
    let recheck = Arc::new(Notify::new());
    let (hub, hub_rx) = if g.shared.watch_hub.is_some() {
        let (down, hub_rx) = mpsc::channel(HUB_QUEUE);
        let detach = watch_hub::DetachTx::default();
        (Some(HubSide { down, detach: detach.clone() }), Some((hub_rx, detach)))
    } else {
        (None, None)
    };

    // etcd sends the stream's headers only with its first message, so the upstream call is made by the outbound
    // stream, beside the inbound loop, rather than before it; and only with the first message forwarded: a stream
    // whose messages are all refused (a client bound to nothing), or all served by shared watches, never opens
    // one at etcd. Until then (and for good, if none comes) it is open and silent, as an etcd stream without
    // watches (etcd does not end a Watch stream when the client ends its side).
    let upstream = g.shared.upstream.for_streams(&g.conn.streams);
    let up_meta = meta.clone();
    let upstream = StreamCall::new(async move {
        let mut up_rx = up_rx;
        let Some(first) = up_rx.recv().await else { return std::future::pending().await };
        let messages = futures_util::stream::iter([first]).chain(ReceiverStream::new(up_rx));
        let frames = upstream.streaming(WATCH, Box::pin(messages), &up_meta).await?;
        Ok(frames.in_parts_over(LONG_FRAME))
    });
    let to_client = ToClient {
        upstream,
        released: Released::default(),
        hub: hub_rx,
        own: down_rx,
        own_closed: false,
        since_own: 0,
        long: None,
        failed: None,
        order: order.clone(),
        guard: g.clone(),
        recheck: recheck.clone(),
        checked,
        gauge: g.shared.metrics.open_watches.clone(),
        end: StreamEnd::bidi(&g, RPC, stream_id, Arrival::now()).noting(unread),
    };

    tokio::spawn(async move {
        let streams = Streams { down: &down_tx, up: &up_tx, hub: hub.as_ref(), recheck: &recheck };
        inbound_loop(&g, &mut inbound, &meta, stream_id, &order, &streams).await;
        drop(hub);
        drop(up_tx);
    });

    Ok(Box::pin(to_client))
}

fn lock(order: &Mutex<Order>) -> MutexGuard<'_, Order> {
    order.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where the inbound loop sends: the client (the proxy's own messages), etcd, and the hub.
struct Streams<'a> {
    down: &'a Down,
    up: &'a Up,
    hub: Option<&'a HubSide>,
    /// Wakes the loop for `Order::after_reload`.
    recheck: &'a Notify,
}

/// The shared watches of this stream that the hub detached, once there are any (never without a hub).
async fn next_detached(hub: Option<&HubSide>) -> Vec<Detached> {
    match hub {
        Some(hub) => hub.detach.next().await,
        None => std::future::pending().await,
    }
}

/// Check, record and forward the client's messages, until the stream ends (its end is recorded by [`ToClient`],
/// as it ended for the client).
async fn inbound_loop(
    g: &Guard,
    inbound: &mut Streaming<pb::WatchRequest>,
    meta: &CallMeta,
    stream_id: Option<u64>,
    order: &Mutex<Order>,
    streams: &Streams<'_>,
) {
    let (down_tx, up_tx) = (streams.down, streams.up);
    let mut reloads = g.shared.subscribe_reloads();
    let mut half_closed = false;
    loop {
        let next = tokio::select! {
            m = inbound.message(), if !half_closed => m,
            // Half-closed: until the client goes away or etcd ends the stream.
            () = down_tx.closed(), if half_closed => return,
            _ = g.shared.shutdown_begun() => {
                let _ = down_tx.send(Err(super::shutting_down())).await;
                return;
            }
            changed = reloads.changed() => {
                if changed.is_ok() && !revoke_withdrawn(g, stream_id, order, streams, Revoke::All).await {
                    return;
                }
                continue;
            }
            _ = streams.recheck.notified() => {
                if !revoke_withdrawn(g, stream_id, order, streams, Revoke::AfterReload).await {
                    return;
                }
                continue;
            }
            detached = next_detached(streams.hub) => {
                let creates: Vec<_> = {
                    let mut o = lock(order);
                    detached.into_iter().filter_map(|d| own_watch(&mut o, d)).collect()
                };
                for create in creates {
                    if up_tx.send(create).await.is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => {
                // The client sends nothing more, but etcd keeps a half-closed watch stream going, and so does the
                // proxy (its side to etcd stays open, for its cancels): reloads still take back what they
                // withdraw, until the stream ends.
                half_closed = true;
                continue;
            }
            Err(status) => {
                // As etcd: a message that cannot be read ends the whole stream with the error (and so with it
                // every watch on it, shared ones too, which only this loop rechecks after a reload).
                let _ = down_tx.send(Err(status)).await;
                return;
            }
        };
        let at = Arrival::now();
        let is_create = matches!(msg.request_union, Some(pb::watch_request::RequestUnion::CreateRequest(_)));
        let range = match &msg.request_union {
            Some(pb::watch_request::RequestUnion::CreateRequest(c)) => {
                let key = if c.key.is_empty() { &b"\0"[..] } else { &c.key[..] };
                KeyRange::from_etcd(key, &c.range_end).ok()
            }
            _ => None,
        };
        let mut record = g.record(RPC, Event::Message, stream_id, &msg, at);
        // No newer than the policy the decision is made under (a create decided before a reload that overtakes it
        // on its way to etcd is checked again, `Order::push_create`).
        let decided = g.shared.generation();
        let verdict = match g.decide(&authz::watch(&msg), meta, &mut record).await {
            Ok(v) => v,
            Err(status) => {
                // The check itself failed: end the stream.
                let v = Verdict { decision: Decision::Deny, reason: status.message().to_string() };
                let _ = g.audit_refusal(RPC, record, Cow::Owned(v), status.code(), at).await;
                let _ = down_tx.send(Err(status)).await;
                return;
            }
        };
        let mut verdict = verdict;
        let mut served = verdict.decision != Decision::Deny;
        // A create within the policy still needs a slot under the identity's limits.
        let mut slot = None;
        let mut limited = None;
        if served && is_create {
            match g.watch_slot() {
                Ok(s) => slot = Some(s),
                Err(status) => {
                    served = false;
                    verdict = Verdict { decision: Decision::Deny, reason: status.message().to_string() };
                    limited = Some(format!("rpc error: code = ResourceExhausted desc = {}", status.message()));
                }
            }
        }
        let admitted = if served { g.shared.audit.admit() } else { Ok(()) };
        let code = match &admitted {
            Ok(()) if served => Code::Ok,
            Ok(()) if limited.is_some() => Code::ResourceExhausted,
            Ok(()) => Code::PermissionDenied,
            Err(status) => status.code(),
        };
        let audited = g.audit_refusal(RPC, record, Cow::Borrowed(&verdict), code, at).await;
        if let Err(status) = admitted.and(audited) {
            let _ = down_tx.send(Err(status)).await;
            return;
        }
        let mut msg = msg;
        let refusal = if served {
            if let Some(hub) = streams.hub {
                match shared_first(g, &mut msg, meta, order, hub, up_tx, (range, slot, decided)).await {
                    Handled::Done => continue,
                    Handled::Refused(reason) => Some(reason),
                    Handled::Forward => None,
                    Handled::Gone => return,
                }
            } else {
                if is_create {
                    lock(order).push_create(Pending::Upstream(range, slot, 0), decided);
                }
                None
            }
        } else {
            Some(limited.unwrap_or_else(|| DENIED_REASON.to_string()))
        };
        match refusal {
            None => {
                if up_tx.send(Box::new(msg)).await.is_err() {
                    return;
                }
            }
            Some(reason) if is_create => {
                // Behind creates still pending at etcd, the refusal waits for their answers; else it goes now.
                let (now, too_many) = {
                    let mut o = lock(order);
                    if o.pending.is_empty() {
                        (Some(denial(o.header, &reason)), false)
                    } else if o.pending.len() >= MAX_PENDING_CREATES {
                        (None, true)
                    } else {
                        o.pending.push_back(Pending::Refused(reason));
                        (None, false)
                    }
                };
                if too_many {
                    // Nothing else bounds refusals waiting behind creates whose answers from etcd the client does
                    // not read: the stream ends.
                    let status = Status::resource_exhausted(format!(
                        "etcd-guard: more than {MAX_PENDING_CREATES} watch creates wait for their answers on this stream"
                    ));
                    let _ = down_tx.send(Err(status)).await;
                    return;
                }
                if let Some(answer) = now {
                    // With shared watches, in their queue: answers the proxy made for earlier creates are there.
                    let sent = match streams.hub {
                        Some(hub) => hub.down.send(HubItem::Frame(answer)).await.is_ok(),
                        None => down_tx.send(Ok(answer)).await.is_ok(),
                    };
                    if !sent {
                        return;
                    }
                }
            }
            Some(_) => {}
        }
        // A denied message that is not a create (an unknown request type) is dropped, as etcd ignores requests
        // it does not understand.
    }
}

/// What [`shared_first`] did with a served message.
enum Handled {
    /// Answered by the proxy (joined a shared watch, canceled one).
    Done,
    /// Refused as etcd would refuse it (a create is answered with this cancel reason).
    Refused(String),
    /// To be forwarded to etcd (possibly rewritten: an explicit watch ID).
    Forward,
    /// The client is gone.
    Gone,
}

/// A served message on a stream that may have shared watches: creates get their ID from the stream and may join a
/// shared watch; cancels of shared watches are answered by the proxy; a progress request first moves the stream's
/// shared watches to watches of its own. Everything else is forwarded.
#[allow(clippy::too_many_arguments)]
async fn shared_first(
    g: &Guard,
    msg: &mut pb::WatchRequest,
    meta: &CallMeta,
    order: &Mutex<Order>,
    hub: &HubSide,
    up: &Up,
    (range, slot, decided): (Option<KeyRange>, Option<WatchSlot>, u64),
) -> Handled {
    use pb::watch_request::RequestUnion;
    match &mut msg.request_union {
        Some(RequestUnion::CreateRequest(create)) => {
            let (id, may_share) = {
                let mut o = lock(order);
                if create.watch_id != 0 {
                    // The client's own ID: etcd refuses one in use.
                    if !o.ids.claim(create.watch_id) {
                        return Handled::Refused(DUPLICATE_ID_REASON.to_string());
                    }
                    (create.watch_id, false)
                } else if watch_hub::empty_range(create) {
                    // etcd refuses it before it takes an ID.
                    o.push_create(Pending::Upstream(range, slot, 0), decided);
                    return Handled::Forward;
                } else {
                    (o.ids.auto(), !o.no_share && o.pending.is_empty())
                }
            };
            if may_share && let Some(hubs) = &g.shared.watch_hub {
                let joined = hubs.join(create, id, &hub.down, &hub.detach, &g.shared.upstream, meta).await;
                if let Joined::Shared(sub) = joined {
                    let counted = Counted::new(&g.shared.metrics.open_watches);
                    let watch =
                        JoinedWatch { sub, left: None, create: create.clone(), range, slot, counted: Some(counted) };
                    lock(order).joined.insert(id, watch);
                    return Handled::Done;
                }
            }
            create.watch_id = id;
            lock(order).push_create(Pending::Upstream(range, slot, id), decided);
            Handled::Forward
        }
        Some(RequestUnion::CancelRequest(cancel)) => {
            let id = cancel.watch_id;
            let answer = {
                let mut o = lock(order);
                let Some(watch) = o.joined.remove(&id) else {
                    // One of the stream's own watches (or no watch): etcd answers it.
                    o.ids.canceling(id);
                    return Handled::Forward;
                };
                o.ids.free(id);
                let header = watch.sub.leave().or(watch.left).flatten().or(o.header);
                let resp = pb::WatchResponse {
                    header: Some(header.unwrap_or_default()),
                    watch_id: id,
                    canceled: true,
                    ..Default::default()
                };
                Framed::encode(&resp).into_bytes()
            };
            // Behind the shared watch's last frames for it, in the same queue.
            if hub.down.send(HubItem::Frame(answer)).await.is_err() {
                return Handled::Gone;
            }
            Handled::Done
        }
        Some(RequestUnion::ProgressRequest(_)) => {
            // etcd answers a progress request for the watches on its stream: the shared ones move there first,
            // and the stream shares nothing from then on. Where etcd answers only once the stream's watches are
            // synced (3.5.8 and later), a watch resuming from a past revision would hold the answer back, so they
            // hand over to watches from now instead; older etcd answers at once, and they resume where they were.
            let hand_over = match &g.shared.watch_hub {
                Some(hubs) if !lock(order).joined.is_empty() => hubs.ordered_progress(&g.shared.upstream).await,
                _ => false,
            };
            let creates = {
                let mut o = lock(order);
                o.no_share = true;
                let mut creates: Vec<Box<pb::WatchRequest>> = Vec::new();
                if hand_over {
                    let ids: Vec<i64> =
                        o.joined.iter().filter(|(_, w)| w.sub.begin_handover()).map(|(id, _)| *id).collect();
                    for id in ids {
                        creates.extend(handover_watch(&mut o, id));
                    }
                }
                let leaving: Vec<Detached> = o.joined.values().filter_map(|w| w.sub.detach()).collect();
                creates.extend(leaving.into_iter().filter_map(|d| own_watch(&mut o, d)));
                // Those the hub detached meanwhile are announced already (under the shared watch's lock).
                for d in hub.detach.take() {
                    creates.extend(own_watch(&mut o, d));
                }
                creates
            };
            // Before the progress request, in the same stream: etcd answers it once these are synced too.
            for create in creates {
                if up.send(create).await.is_err() {
                    return Handled::Gone;
                }
            }
            Handled::Forward
        }
        _ => Handled::Forward,
    }
}

/// `create` as a message for etcd.
fn create_request(create: pb::WatchCreateRequest) -> Box<pb::WatchRequest> {
    Box::new(pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) })
}

/// A shared watch of this stream hands over to a watch of the stream's own from now (same ID): the create to
/// send etcd; the shared watch goes on giving the client what it has not yet had up to the revision etcd's
/// answer names.
fn handover_watch(o: &mut Order, id: i64) -> Option<Box<pb::WatchRequest>> {
    let watch = o.joined.remove(&id)?;
    let mut create = watch.create.clone();
    create.watch_id = id;
    create.start_revision = 0;
    // Checked again as etcd opens it (stale, as if decided under no policy): a reload the inbound loop has not
    // rechecked its shared watches for yet may have withdrawn it.
    o.push_create(Pending::Handover(id), 0);
    o.handing.insert(id, watch);
    Some(create_request(create))
}

/// A shared watch of this stream goes on as a watch of the stream's own: the create to send etcd (same ID, from
/// the first revision not yet given to the client), or `None` if the client canceled it meanwhile.
fn own_watch(o: &mut Order, d: Detached) -> Option<Box<pb::WatchRequest>> {
    if o.joined.get(&d.watch_id).is_none_or(|w| w.sub.token() != d.token) {
        return None;
    }
    let watch = o.joined.remove(&d.watch_id)?;
    let mut create = watch.create;
    create.watch_id = d.watch_id;
    create.start_revision = d.resume.max(0);
    // Checked again as etcd opens it, as a hand-over is (`handover_watch`).
    if d.announced {
        o.push_create(Pending::Internal(d.watch_id, watch.range, watch.slot, watch.counted), 0);
    } else {
        o.push_create(Pending::Upstream(watch.range, watch.slot, d.watch_id), 0);
    }
    Some(create_request(create))
}

/// A shared watch of the stream whose permission a reload withdrew: the cancel the client gets, its ID, and why.
type SharedRevocation = (Bytes, i64, String);

/// Which watches [`revoke_withdrawn`] checks.
enum Revoke {
    /// After a reload: every open watch and every shared one (creates still pending at etcd are checked as it
    /// opens them), and `Order::after_reload`.
    All,
    /// Only `Order::after_reload`.
    AfterReload,
}

/// After a policy reload: cancel the open watches the caller may no longer read, as etcd cancels them
/// (`PermissionDenied` cancel reason), and record each. Returns false if etcd's stream is gone.
async fn revoke_withdrawn(
    g: &Guard,
    stream_id: Option<u64>,
    order: &Mutex<Order>,
    streams: &Streams<'_>,
    which: Revoke,
) -> bool {
    let view = g.conn.view(&g.shared);
    let (withdrawn, shared): (Vec<(i64, String)>, Vec<SharedRevocation>) = {
        let mut o = lock(order);
        if matches!(which, Revoke::All) {
            // Always, even if etcd's last frame already did it for this generation: a create decided before the
            // reload may have joined `pending` since (its `created` answer is then checked as it arrives).
            revoke_active(&view, &mut o);
        }
        // Revoked already (by the check above, by etcd's last frame, or as etcd opened them), or to be checked now.
        let mut withdrawn = Vec::new();
        let mut check_shared = Vec::new();
        for item in std::mem::take(&mut o.after_reload) {
            match item {
                AfterReload::Cancel(id, reason) => withdrawn.push((id, reason)),
                AfterReload::CheckShared(id) => check_shared.push(id),
            }
        }
        if matches!(which, Revoke::All) {
            check_shared = o.joined.keys().copied().collect();
        }
        let gone_shared = withdrawn_from(
            &view,
            check_shared.iter().filter_map(|id| o.joined.get(id).map(|w| (*id, w.range.as_ref()))),
        );
        let mut shared = Vec::with_capacity(gone_shared.len());
        for (id, reason) in gone_shared {
            if let Some(watch) = o.joined.remove(&id) {
                o.ids.free(id);
                let header = watch.sub.leave().or(watch.left).flatten().or(o.header);
                shared.push((revoked(header, id), id, reason));
            }
        }
        (withdrawn, shared)
    };
    for (watch_id, reason) in withdrawn {
        let cancel = record_revocation(g, stream_id, watch_id, &reason).await;
        if streams.up.send(Box::new(cancel)).await.is_err() {
            return false;
        }
    }
    for (answer, watch_id, reason) in shared {
        record_revocation(g, stream_id, watch_id, &reason).await;
        // Behind the shared watch's last frames for it.
        if let Some(hub) = streams.hub
            && hub.down.send(HubItem::Frame(answer)).await.is_err()
        {
            return false;
        }
    }
    true
}

/// The watches (ID, interval) the view may no longer read, and why (none where only `audit-only` bindings
/// apply: they never take anything away).
fn withdrawn_from<'a>(view: &View, watches: impl Iterator<Item = (i64, Option<&'a KeyRange>)>) -> Vec<(i64, String)> {
    if view.permissions.mode() == Mode::AuditOnly {
        return Vec::new();
    }
    watches
        .filter_map(|(id, range)| view.permissions.check(Access::Read, range?).err().map(|d| (id, d.reason)))
        .collect()
}

/// Record the cancel of a watch whose permission a reload withdrew; the cancel, for etcd.
async fn record_revocation(g: &Guard, stream_id: Option<u64>, watch_id: i64, reason: &str) -> pb::WatchRequest {
    let cancel = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CancelRequest(pb::WatchCancelRequest { watch_id })),
    };
    let at = Arrival::now();
    let record = g.record(RPC, Event::Message, stream_id, &cancel, at);
    let _ = g.audit(RPC, record, &super::withdrawal(reason), Code::PermissionDenied, None, at).await;
    cancel
}

// === impl WatchResponseHead ===

impl WatchResponseHead {
    /// The header etcd sent, if it sent one that parses.
    fn header(&self) -> Option<pb::ResponseHeader> {
        if self.header.is_empty() {
            return None;
        }
        pb::ResponseHeader::decode(self.header.clone()).ok()
    }
}

// === impl ToClient ===

impl ToClient {
    /// A reload is in force that the open watches were not checked under yet (the inbound loop has not acted on
    /// it): its withdrawals apply from the next frame on. One atomic load when nothing changed.
    fn revoke_if_reloaded(&mut self) {
        let now = self.guard.shared.generation();
        if now == self.checked {
            return;
        }
        self.checked = now;
        let mut o = lock(&self.order);
        if o.checked != now {
            revoke_active(&self.guard.conn.view(&self.guard.shared), &mut o);
            if !o.after_reload.is_empty() {
                self.recheck.notify_one();
            }
        }
    }

    /// The start of a long answer of etcd's: passed on (or dropped) part by part when it is an event answer that
    /// may go now, else gathered whole first. What to pass on now, if anything.
    fn on_long_start(&mut self, start: Bytes, rest: usize) -> Option<Bytes> {
        let head = start.get(codec::PREFIX_BYTES..).and_then(head_before_events);
        let mut o = lock(&self.order);
        match head.filter(|head| !head.created && !head.canceled) {
            // Dropped whether or not it would wait: released, it would be dropped then (its cancel comes after it).
            Some(head) if o.revoked.contains(&head.watch_id) => {
                self.long = Some(Long::Dropping);
                None
            }
            Some(head) if !waits(&o, &head) => {
                self.long = Some(Long::Passing(head.watch_id));
                Some(start)
            }
            // To wait whole for watches handing over, but more than a stream holds back: it ends.
            Some(_) if o.held_bytes.saturating_add(start.len()).saturating_add(rest) > MAX_HELD_BYTES => {
                self.failed = hold(&mut o, start.len().saturating_add(rest)).err();
                self.long = Some(Long::Dropping);
                None
            }
            _ => {
                // Grown as etcd's bytes come (etcd declares the length, up to 2 GiB: not reserved up front).
                let mut gathered = BytesMut::with_capacity(start.len() + rest.min(LONG_FRAME));
                gathered.extend_from_slice(&start);
                self.long = Some(Long::Gathering(gathered));
                None
            }
        }
    }

    /// The next part of a long answer of etcd's: what to pass on, if anything (`Ready(None)`: nothing now).
    fn poll_long(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Status>>> {
        let (more, last) = match std::task::ready!(self.upstream.poll_part(cx)) {
            Some(Ok(Part::More { more, last })) => (more, last),
            Some(Err(status)) => {
                self.long = None;
                return Poll::Ready(Some(Err(status)));
            }
            // Not reached: `Frames` hands out a long frame's parts to its last, and ends a stream cut inside one with
            // an error.
            Some(Ok(Part::Whole(_) | Part::Start { .. })) | None => {
                self.long = None;
                self.upstream.close();
                return Poll::Ready(Some(Err(Status::internal("etcd-guard: etcd's answer was cut short"))));
            }
        };
        match self.long.take() {
            Some(Long::Passing(watch_id)) => {
                // A reload that withdrew the watch while its answer passes: the rest of it is not sent, and since
                // part of a message cannot be taken back, the stream ends (the client watches again, checked).
                self.revoke_if_reloaded();
                if lock(&self.order).revoked.contains(&watch_id) {
                    self.upstream.close();
                    let why = format!("watch {watch_id}, whose answer was passing: the stream ends");
                    let verdict = super::withdrawal(&why);
                    self.end.set_reason(verdict.decision, verdict.reason);
                    return Poll::Ready(Some(Err(super::permission_denied())));
                }
                self.long = (!last).then_some(Long::Passing(watch_id));
                Poll::Ready(Some(Ok(more)))
            }
            Some(Long::Dropping) => {
                self.long = (!last).then_some(Long::Dropping);
                Poll::Ready(None)
            }
            Some(Long::Gathering(mut gathered)) => {
                gathered.extend_from_slice(&more);
                if !last {
                    self.long = Some(Long::Gathering(gathered));
                    return Poll::Ready(None);
                }
                match Framed::parse(gathered.freeze()) {
                    Ok(frame) => Poll::Ready(self.on_response(frame).map(Ok)),
                    Err(message) => {
                        self.upstream.close();
                        Poll::Ready(Some(Err(Status::internal(format!("etcd-guard: {message}")))))
                    }
                }
            }
            None => Poll::Ready(None),
        }
    }

    /// Note what one of etcd's responses means for the open watches; the frame to pass on, if any.
    fn on_response(&mut self, frame: Framed) -> Option<Bytes> {
        let head = WatchResponseHead::decode(frame.message_bytes()).unwrap_or_default();
        let mut o = lock(&self.order);
        if !head.created {
            return match etcd_frame(&mut o, frame, &head) {
                Ok(passed) => passed,
                Err(status) => {
                    self.failed = Some(status);
                    None
                }
            };
        }
        if let Some(header) = head.header() {
            o.header = Some(header);
        }
        let mut answer = Some(frame);
        match o.pending.front() {
            Some(Pending::Upstream(..)) => {
                if let Some((Pending::Upstream(range, slot, id), stale)) = o.answered() {
                    if !head.canceled {
                        if !stale || allowed_after_reload(&self.guard, &mut o, head.watch_id, range.as_ref()) {
                            let counted = Some(Counted::new(&self.gauge));
                            o.active.insert(head.watch_id, Active { range, _slot: slot, _counted: counted });
                        }
                    } else if id != 0 {
                        o.ids.free(id);
                    }
                }
            }
            Some(Pending::Handover(..)) => {
                if let Some((Pending::Handover(id), stale)) = o.answered() {
                    answer = None;
                    handed(&mut self.released, &mut o, id, &head);
                    if stale && head.canceled {
                        // Back on its shared watch.
                        o.after_reload.push(AfterReload::CheckShared(id));
                    } else if stale {
                        let range = o.active.get(&head.watch_id).and_then(|a| a.range.clone());
                        if !allowed_after_reload(&self.guard, &mut o, head.watch_id, range.as_ref()) {
                            o.active.remove(&head.watch_id);
                        }
                    }
                }
            }
            Some(Pending::Internal(..)) => {
                if let Some((Pending::Internal(id, range, slot, counted), stale)) = o.answered() {
                    if !head.canceled {
                        answer = None;
                        if !stale || allowed_after_reload(&self.guard, &mut o, head.watch_id, range.as_ref()) {
                            o.active.insert(head.watch_id, Active { range, _slot: slot, _counted: counted });
                        }
                    } else {
                        // The client's watch cannot go on: it is canceled with etcd's reason.
                        o.ids.free(id);
                        let reason = answer.as_ref().map(answer_reason).unwrap_or_default();
                        let resp = pb::WatchResponse {
                            header: head.header(),
                            watch_id: id,
                            canceled: true,
                            cancel_reason: reason,
                            ..Default::default()
                        };
                        answer = Some(Framed::encode(&resp));
                    }
                }
            }
            _ => {}
        }
        while let Some(Pending::Refused(_)) = o.pending.front() {
            let Some((Pending::Refused(reason), _)) = o.answered() else { break };
            self.released.push(denial(o.header, &reason), None);
        }
        if !o.after_reload.is_empty() {
            self.recheck.notify_one();
        }
        answer.map(Framed::into_bytes)
    }
}

/// One of etcd's responses that answers no create: the frame to pass on now, if any. While watches hand over,
/// etcd's frames for them and progress answers wait for the shared watches' last frames, and every frame after
/// one that waits waits too.
fn etcd_frame(o: &mut Order, frame: Framed, head: &WatchResponseHead) -> Result<Option<Bytes>, Status> {
    if waits(o, head) {
        hold(o, frame.message().len())?;
        o.held.push_back(frame);
        return Ok(None);
    }
    Ok(pass_on(o, frame, head))
}

/// Count `bytes` more held back while watches hand over; past [`MAX_HELD_BYTES`] the stream ends (and what it held
/// is let go).
fn hold(o: &mut Order, bytes: usize) -> Result<(), Status> {
    o.held_bytes = o.held_bytes.saturating_add(bytes);
    if o.held_bytes <= MAX_HELD_BYTES {
        return Ok(());
    }
    (o.held, o.held_bytes) = (VecDeque::new(), 0);
    tracing::warn!(
        max_bytes = MAX_HELD_BYTES,
        "etcd sent more for a watch stream than the proxy holds while its watches hand over from shared watches; \
         the client stream ends with Unavailable (clients resume their watches)"
    );
    Err(Status::unavailable("etcd-guard: a watch hand-over held back too much; resume the watches"))
}

/// Whether one of etcd's responses that answers no create must wait for the shared watches' last frames.
fn waits(o: &Order, head: &WatchResponseHead) -> bool {
    !o.held.is_empty() || (!o.handing.is_empty() && (head.watch_id == -1 || o.handing.contains_key(&head.watch_id)))
}

/// One of etcd's responses that answers no create, as the client gets it, if at all; a cancel ends the watch.
fn pass_on(o: &mut Order, frame: Framed, head: &WatchResponseHead) -> Option<Bytes> {
    if head.canceled {
        o.active.remove(&head.watch_id);
        o.ids.free(head.watch_id);
        if o.revoked.remove(&head.watch_id) {
            return Some(revoked(head.header(), head.watch_id));
        }
    } else if !o.revoked.is_empty() && o.revoked.contains(&head.watch_id) {
        // A watch a reload withdrew: nothing more of it reaches the client; etcd's cancel is on its way.
        return None;
    }
    Some(frame.into_bytes())
}

/// etcd answered the create of a watch handing over: it serves the client from the answer's revision on.
fn handed(released: &mut Released, o: &mut Order, id: i64, head: &WatchResponseHead) {
    let Some(watch) = o.handing.get_mut(&id) else { return };
    if head.canceled {
        // etcd refused the create: the watch stays shared.
        if let Some(watch) = o.handing.remove(&id) {
            watch.sub.end_handover();
            o.joined.insert(id, watch);
        }
    } else {
        let range = watch.range.clone();
        let (slot, counted) = (watch.slot.take(), watch.counted.take());
        let revision = head.header().map(|h| h.revision).unwrap_or(0);
        match watch.sub.hand_over(revision) {
            HandOver::Later => {}
            HandOver::Gone => {
                o.handing.remove(&id);
            }
        }
        o.active.insert(head.watch_id, Active { range, _slot: slot, _counted: counted });
    }
    release_held(released, o);
}

/// Once no watch is handing over, etcd's held frames go first, in order, as they would have gone.
fn release_held(released: &mut Released, o: &mut Order) {
    if o.handing.is_empty() {
        o.held_bytes = 0;
        while let Some(frame) = o.held.pop_front() {
            let head = WatchResponseHead::decode(frame.message_bytes()).unwrap_or_default();
            let of = (!head.created && !head.canceled && head.watch_id >= 0).then_some(head.watch_id);
            if let Some(bytes) = pass_on(o, frame, &head) {
                released.push(bytes, of);
            }
        }
    }
}

/// What goes to the client before anything else: refusals released by a `created`, and etcd's frames released
/// after a hand-over — with, for a frame of one watch's events, its ID: a reload may withdraw the watch while its
/// frames wait here, and then they are dropped as they would have been at etcd's side ([`pass_on`]).
#[derive(Default)]
struct Released(VecDeque<(Bytes, Option<i64>)>);

impl Released {
    fn push(&mut self, bytes: Bytes, of: Option<i64>) {
        self.0.push_back((bytes, of));
    }

    /// The next one to send, skipping those of watches revoked since they were released.
    fn next(&mut self, order: &Mutex<Order>) -> Option<Bytes> {
        while let Some((bytes, of)) = self.0.pop_front() {
            if of.is_some_and(|id| lock(order).revoked.contains(&id)) {
                continue;
            }
            return Some(bytes);
        }
        None
    }
}

/// A watch's hand-over is over ([`HubItem::HandedOver`]); if etcd has not yet answered the create of its own
/// watch (the shared watch ended first), it is over once etcd has ([`handed`]).
fn handed_over(released: &mut Released, o: &mut Order, id: i64) {
    if o.pending.iter().any(|p| matches!(p, Pending::Handover(waiting) if *waiting == id)) {
        return;
    }
    o.handing.remove(&id);
    release_held(released, o);
}

/// The cancel reason of one of etcd's watch responses.
fn answer_reason(frame: &Framed) -> String {
    pb::WatchResponse::decode(frame.message_bytes()).map(|r| r.cancel_reason).unwrap_or_default()
}

/// While etcd's messages keep coming, the proxy's own channel is looked at once per this many of them (and always
/// before the stream waits): a shutdown or an error then waits behind at most this many events, and a flood of
/// events does not pay for a look at an empty channel each.
const OWN_EVERY: u32 = 16;

impl futures_util::Stream for ToClient {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = std::task::ready!(this.poll_item(cx));
        Poll::Ready(this.end.note(item))
    }
}

impl ToClient {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Status>>> {
        let this = self;
        loop {
            if let Some(status) = this.failed.take() {
                this.long = None;
                this.upstream.close();
                return Poll::Ready(Some(Err(status)));
            }
            // A long answer of etcd's goes on alone to its last part: nothing may come between its bytes.
            if this.long.is_some() {
                match std::task::ready!(this.poll_long(cx)) {
                    Some(item) => return Poll::Ready(Some(item)),
                    None => continue,
                }
            }
            // Shared watches are rechecked after a reload by the inbound loop alone: once it has ended (and with it
            // the proxy's side of the stream), their frames stop.
            if this.hub.is_some() && this.own.is_closed() {
                this.hub = None;
            }
            this.revoke_if_reloaded();
            // Refusals released by a `created` follow it before anything else (clients pair them in order).
            if let Some(bytes) = this.released.next(&this.order) {
                return Poll::Ready(Some(Ok(bytes)));
            }
            // Frames of shared watches come before etcd's frames on this stream: a watch detached from a shared
            // watch gets its last shared frames before the first ones of its own upstream watch.
            if let Some((hub, queued)) = this.hub.as_mut() {
                if let Poll::Ready(Some(item)) = hub.poll_recv(cx) {
                    match item {
                        HubItem::Frame(bytes) => return Poll::Ready(Some(Ok(bytes))),
                        HubItem::Counted(bytes) => {
                            queued.took(bytes.len());
                            return Poll::Ready(Some(Ok(bytes)));
                        }
                        HubItem::Failed(status) => return Poll::Ready(Some(Err(status))),
                        HubItem::HandedOver(id) => {
                            handed_over(&mut this.released, &mut lock(&this.order), id);
                            continue;
                        }
                    }
                }
                // Frames are waiting but the task's budget for this turn is spent (tokio's cooperative
                // scheduling; it wakes the task again): etcd's frames must not overtake them meanwhile.
                if !hub.is_empty() {
                    return Poll::Pending;
                }
            }
            // The proxy's own messages come before etcd's: they are few, and a shutdown or an error must not wait
            // behind a flood of events.
            if this.since_own >= OWN_EVERY
                && let Poll::Ready(item) = this.poll_own(cx)
            {
                return Poll::Ready(item);
            }
            if let Poll::Ready(Some(item)) = this.upstream.poll_part(cx) {
                this.since_own += 1;
                let passed = match item {
                    Ok(Part::Whole(frame)) => this.on_response(frame),
                    Ok(Part::Start { start, rest }) => this.on_long_start(start, rest),
                    Ok(Part::More { .. }) => {
                        this.upstream.close();
                        return Poll::Ready(Some(Err(Status::internal("etcd-guard: etcd's answer lost its start"))));
                    }
                    Err(status) => return Poll::Ready(Some(Err(status))),
                };
                match passed {
                    Some(bytes) => return Poll::Ready(Some(Ok(bytes))),
                    // Answered a create of the proxy's own, or the start of an answer gathered first: nothing for
                    // the client yet.
                    None => continue,
                }
            }
            // Before waiting, the own channel is always looked at (which also asks to be woken by it).
            if let Poll::Ready(item) = this.poll_own(cx) {
                return Poll::Ready(item);
            }
            // Ends when etcd's side and the proxy's side have both ended.
            if this.own_closed && this.upstream.is_done() {
                return Poll::Ready(None);
            }
            return Poll::Pending;
        }
    }
}

impl ToClient {
    /// The next of the proxy's own messages, if one is waiting (`Pending` once the channel has closed).
    fn poll_own(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Status>>> {
        self.since_own = 0;
        if self.own_closed {
            return Poll::Pending;
        }
        match self.own.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Ready(None) => {
                self.own_closed = true;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The cancel a client sees for a watch whose permission a reload withdrew (a whole frame).
fn revoked(header: Option<pb::ResponseHeader>, watch_id: i64) -> Bytes {
    let resp = pb::WatchResponse {
        header: Some(header.unwrap_or_default()),
        watch_id,
        canceled: true,
        cancel_reason: DENIED_REASON.to_string(),
        ..Default::default()
    };
    Framed::encode(&resp).into_bytes()
}

/// etcd's answer to a refused watch create (a whole frame).
fn denial(header: Option<pb::ResponseHeader>, reason: &str) -> Bytes {
    let resp = pb::WatchResponse {
        header: Some(header.unwrap_or_default()),
        watch_id: -1,
        created: true,
        canceled: true,
        cancel_reason: reason.to_string(),
        ..Default::default()
    };
    Framed::encode(&resp).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    use etcd_guard_proto::mvccpb;

    fn decoded(bytes: &Bytes) -> pb::WatchResponse {
        let framed = Framed::parse(bytes.clone()).unwrap();
        pb::WatchResponse::decode(framed.message_bytes()).unwrap()
    }

    /// One of etcd's responses as the stream reads it.
    fn from_etcd(o: &mut Order, resp: pb::WatchResponse) -> Option<pb::WatchResponse> {
        let frame = Framed::encode(&resp);
        let head = WatchResponseHead::decode(frame.message_bytes()).unwrap();
        etcd_frame(o, frame, &head).unwrap().map(|b| decoded(&b))
    }

    fn at(revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader { revision, ..Default::default() })
    }

    fn event(watch_id: i64, revision: i64) -> pb::WatchResponse {
        let kv = mvccpb::KeyValue { key: b"k".to_vec(), mod_revision: revision, ..Default::default() };
        let events = vec![mvccpb::Event { kv: Some(kv), ..Default::default() }];
        pb::WatchResponse { header: at(revision), watch_id, events, ..Default::default() }
    }

    fn active() -> Active {
        Active { range: None, _slot: None, _counted: None }
    }

    #[test]
    fn the_head_of_a_long_answer_is_read_from_its_start() {
        let mut resp = event(7, 42);
        resp.fragment = true;
        resp.compact_revision = 3;
        let kv = mvccpb::KeyValue { key: b"big".to_vec(), value: vec![b'v'; 100_000], ..Default::default() };
        resp.events.push(mvccpb::Event { kv: Some(kv), ..Default::default() });
        let message = resp.encode_to_vec();
        let whole = WatchResponseHead::decode(&message[..]).unwrap();
        for cut in [20, 64, 4096, message.len()] {
            let head = head_before_events(&message[..cut]).unwrap();
            assert_eq!(head, whole, "cut at {cut}");
            assert_eq!((head.watch_id, head.header().map(|h| h.revision)), (7, Some(42)));
        }
        // Not all of the head there, or no events at all (a create's or cancel's answer): gathered whole instead.
        assert_eq!(head_before_events(&message[..3]), None);
        let created = pb::WatchResponse { header: at(5), watch_id: 1, created: true, ..Default::default() };
        assert_eq!(head_before_events(&created.encode_to_vec()), None);
        assert_eq!(head_before_events(&[0xff, 0xff]), None, "a broken varint");
        // Events before the header (etcd writes the header first): not taken for a head of watch 0.
        let events = pb::WatchResponse { events: resp.events.clone(), ..Default::default() }.encode_to_vec();
        let head = pb::WatchResponse { events: Vec::new(), ..resp.clone() }.encode_to_vec();
        assert_eq!(head_before_events(&[&head[..], &events[..]].concat()), Some(whole.clone()));
        assert_eq!(head_before_events(&[&events[..], &head[..]].concat()), None);
    }

    /// A client watch on a shared watch (`sub`), watching `range`.
    fn joined(sub: Subscription, range: Option<KeyRange>) -> JoinedWatch {
        JoinedWatch { sub, left: None, create: pb::WatchCreateRequest::default(), range, slot: None, counted: None }
    }

    /// The view of an identity that may read the keys under `prefix`, under policy generation `generation`.
    fn view_reading(prefix: &str, generation: u64) -> View {
        let yaml = format!(
            r#"
roles: [ {{ name: r, keys: [ {{ prefix: "{prefix}", access: read }} ] }} ]
bindings: [ {{ role: r, subjects: [ {{ common_name: "c" }} ] }} ]
"#
        );
        let policy = crate::policy::Policy::from_yaml(&yaml, "test").unwrap();
        let identity = crate::identity::Identity { common_name: Some("c".into()), ..Default::default() };
        View::new(1, "127.0.0.1:1".parse().unwrap(), &identity, generation, &policy)
    }

    /// etcd frees an ID as it reads the cancel: a create right behind the cancel may take it again, and etcd's
    /// answer to the cancel, which comes later, does not free the new watch's ID.
    #[test]
    fn a_watch_id_is_free_again_once_its_cancel_is_on_its_way() {
        let mut ids = Ids::default();
        assert!(ids.claim(5) && !ids.claim(5));
        ids.canceling(5);
        assert!(ids.claim(5), "taken again behind its cancel");
        assert!(!ids.claim(5), "in use by the new watch");
        ids.free(5);
        assert!(!ids.claim(5), "etcd's answer to the cancel freed nothing");
        ids.free(5);
        assert!(ids.claim(5), "the new watch ended");
        assert_eq!(ids.auto(), 0);
        ids.canceling(7);
        assert!(ids.claim(7), "an ID not in use");
    }

    #[test]
    fn a_reload_takes_back_the_open_watches_it_withdrew_before_their_next_frame() {
        let view = view_reading("a/", 4);
        let mut o = Order::default();
        o.active.insert(1, Active { range: Some(KeyRange::prefix("a/")), ..active() });
        o.active.insert(2, Active { range: Some(KeyRange::prefix("b/")), ..active() });
        revoke_active(&view, &mut o);
        assert_eq!(o.checked, 4);
        assert!(o.active.contains_key(&1) && !o.active.contains_key(&2));
        assert!(matches!(o.after_reload.as_slice(), [AfterReload::Cancel(2, _)]));
        // From now on nothing of watch 2 reaches the client but etcd's cancel, which becomes etcd's denial.
        assert_eq!(from_etcd(&mut o, event(2, 30)), None);
        assert_eq!(from_etcd(&mut o, event(1, 30)), Some(event(1, 30)));
        let cancel = pb::WatchResponse { header: at(31), watch_id: 2, canceled: true, ..Default::default() };
        let answer = from_etcd(&mut o, cancel);
        assert!(answer.is_some_and(|a| a.canceled && a.cancel_reason == DENIED_REASON));
    }

    /// A create decided before a reload but queued after the open watches were checked for it (the check did not
    /// see it) is checked again when etcd opens it; one decided under the policy in force is not.
    #[test]
    fn a_create_that_a_reload_overtook_on_its_way_is_checked_when_it_opens() {
        let view = view_reading("b/", 5);
        let mut o = Order::default();
        revoke_active(&view, &mut o);
        o.push_create(Pending::Upstream(Some(KeyRange::prefix("a/")), None, 0), 4);
        assert!(matches!(o.answered(), Some((Pending::Upstream(..), true))), "decided under 4, checked under 5");
        o.push_create(Pending::Upstream(Some(KeyRange::prefix("b/")), None, 0), 5);
        assert!(matches!(o.answered(), Some((Pending::Upstream(..), false))));
    }

    #[test]
    fn a_watch_a_reload_withdrew_gets_nothing_more_but_the_permission_denied_cancel() {
        let mut o = Order::default();
        o.active.insert(2, active());
        o.revoked.insert(3);
        assert_eq!(from_etcd(&mut o, event(3, 21)), None);
        assert_eq!(from_etcd(&mut o, event(2, 21)), Some(event(2, 21)));
        let cancel = pb::WatchResponse { header: at(21), watch_id: 3, canceled: true, ..Default::default() };
        let answer = from_etcd(&mut o, cancel);
        assert!(answer.as_ref().is_some_and(|a| a.canceled && a.cancel_reason == DENIED_REASON), "{answer:?}");
        // The ID is free again: a later watch with it is passed on.
        assert!(o.revoked.is_empty());
        assert_eq!(from_etcd(&mut o, event(3, 22)), Some(event(3, 22)));
    }

    /// A reload that withdrew a shared watch stops its frames at once; the inbound loop records it and answers the
    /// client (it stays in `joined` for that).
    #[test]
    fn a_reload_stops_the_frames_of_a_shared_watch_it_withdrew_at_once() {
        let view = view_reading("a/", 3);
        let mut o = Order::default();
        for (id, prefix) in [(1, "a/"), (2, "b/")] {
            let joined = joined(watch_hub::test_live_subscription(), Some(KeyRange::prefix(prefix)));
            o.joined.insert(id, joined);
        }
        revoke_active(&view, &mut o);
        assert!(o.joined[&1].sub.is_subscribed());
        assert!(!o.joined[&2].sub.is_subscribed(), "withdrawn: nothing more from its shared watch");
        assert!(o.joined.contains_key(&2), "left for the inbound loop to record and answer");
        assert!(o.joined[&2].left.is_some(), "with the shared watch's header then, for the cancel");
    }

    /// A watch handing over to a watch of its own gets its shared watch's frames up to the hand-over revision; a
    /// reload that withdrew it ends that at once, whether etcd has opened its own watch yet or not (if not, that
    /// watch is revoked as etcd opens it).
    #[test]
    fn a_reload_ends_the_shared_frames_of_a_watch_it_withdrew_while_it_hands_over() {
        let view = view_reading("a/", 3);
        let mut o = Order::default();
        let handing = |prefix| joined(watch_hub::test_live_subscription(), Some(KeyRange::prefix(prefix)));
        for (id, prefix) in [(1, "a/"), (2, "b/"), (3, "b/")] {
            o.handing.insert(id, handing(prefix));
        }
        o.push_create(Pending::Handover(1), 0);
        o.push_create(Pending::Handover(2), 0);
        // etcd has answered watch 3's create already: its hand-over revision (30) precedes the reload.
        assert!(matches!(o.handing[&3].sub.hand_over(30), HandOver::Later));
        revoke_active(&view, &mut o);
        assert!(o.handing[&1].sub.is_subscribed(), "still allowed: it goes on until its hand-over");
        assert!(!o.handing[&2].sub.is_subscribed(), "withdrawn: nothing more from its shared watch");
        assert!(!o.handing[&3].sub.is_subscribed(), "answered and withdrawn: cut short, nothing more either");
        // The hand-over ends as etcd answers the own watch's create (checked then, as it was pushed stale).
        assert!(matches!(o.handing[&2].sub.hand_over(30), HandOver::Gone));
    }

    /// etcd's frames released after a hand-over wait for the client to read them: a reload that withdraws their
    /// watch meanwhile drops them there too (the watch's cancel, when etcd sends it, becomes etcd's denial).
    #[test]
    fn released_frames_of_a_watch_a_reload_withdrew_are_dropped_as_they_leave() {
        let order = Mutex::new(Order::default());
        let mut released = Released::default();
        {
            let mut o = lock(&order);
            o.active.insert(2, active());
            o.active.insert(4, active());
            o.handing.insert(1, joined(watch_hub::test_subscription(), None));
            let progress = pb::WatchResponse { header: at(20), watch_id: -1, ..Default::default() };
            for resp in [progress, event(2, 21), event(4, 21), event(2, 22)] {
                assert_eq!(from_etcd(&mut o, resp), None, "held while watch 1 hands over");
            }
            o.handing.remove(&1);
            release_held(&mut released, &mut o);
            released.push(denial(at(22), "refused"), None);
            // The client has not read them yet when a reload withdraws watch 2.
            o.revoke(2, "withdrawn".into());
        }
        let left: Vec<pb::WatchResponse> = std::iter::from_fn(|| released.next(&order)).map(|b| decoded(&b)).collect();
        assert_eq!(left.len(), 3, "{left:?}");
        assert_eq!(left[0].watch_id, -1);
        assert_eq!(left[1], event(4, 21));
        assert!(left[2].canceled, "{:?}", left[2]);
    }

    /// What waits for a hand-over is bounded: past `MAX_HELD_BYTES` the stream ends (`Unavailable`) and lets it go.
    #[test]
    fn frames_held_while_a_watch_hands_over_are_bounded() {
        let mut o = Order::default();
        o.handing.insert(1, joined(watch_hub::test_subscription(), None));
        let big = |revision: i64| {
            let kv = mvccpb::KeyValue { key: b"k".to_vec(), value: vec![0; 8 << 20], ..Default::default() };
            let event = mvccpb::Event { kv: Some(kv), ..Default::default() };
            let resp =
                pb::WatchResponse { header: at(revision), watch_id: 1, events: vec![event], ..Default::default() };
            let frame = Framed::encode(&resp);
            let head = WatchResponseHead::decode(frame.message_bytes()).unwrap();
            (frame, head)
        };
        let fits = MAX_HELD_BYTES / (8 << 20) - 1;
        for revision in 0..fits {
            let (frame, head) = big(revision as i64 + 10);
            let held = etcd_frame(&mut o, frame, &head).map(|passed| passed.is_none()).map_err(|s| s.code());
            assert_eq!(held, Ok(true), "held");
        }
        assert_eq!(o.held.len(), fits);
        let (frame, head) = big(99);
        let (frame2, head2) = big(100);
        let ended = etcd_frame(&mut o, frame, &head).and_then(|_| etcd_frame(&mut o, frame2, &head2));
        assert_eq!(ended.map(|passed| passed.is_none()).map_err(|s| s.code()), Err(tonic::Code::Unavailable));
        assert!(o.held.is_empty() && o.held_bytes == 0, "let go");
    }

    #[test]
    fn while_a_watch_hands_over_etcds_later_frames_wait_in_order_and_cancels_are_still_noted() {
        let mut o = Order::default();
        let joined = joined(watch_hub::test_subscription(), None);
        o.handing.insert(1, joined);
        o.active.insert(2, active());
        o.active.insert(3, active());
        // A reload withdrew watch 3's permission: etcd's cancel answer becomes etcd's permission-denied cancel.
        o.revoked.insert(3);
        // etcd's progress answer waits for watch 1's last frames from its shared watch; the events etcd sent
        // after it (of a watch that does not hand over) and a cancel wait behind it.
        let progress = pb::WatchResponse { header: at(20), watch_id: -1, ..Default::default() };
        assert_eq!(from_etcd(&mut o, progress.clone()), None);
        assert_eq!(from_etcd(&mut o, event(2, 21)), None);
        let cancel = pb::WatchResponse { header: at(21), watch_id: 3, canceled: true, ..Default::default() };
        assert_eq!(from_etcd(&mut o, cancel), None);
        // Watch 1 has handed over: they go, in etcd's order, and the cancel ends watch 3.
        o.handing.remove(&1);
        let mut released = Released::default();
        release_held(&mut released, &mut o);
        let released: Vec<pb::WatchResponse> = released.0.iter().map(|(bytes, _)| decoded(bytes)).collect();
        assert_eq!(released.len(), 3, "{released:?}");
        assert_eq!(released[0], progress);
        assert_eq!(released[1], event(2, 21));
        assert!(released[2].canceled && released[2].watch_id == 3, "{:?}", released[2]);
        assert_eq!(released[2].cancel_reason, DENIED_REASON);
        assert!(!o.active.contains_key(&3) && o.active.contains_key(&2));
        // Nothing waits any more.
        assert_eq!(from_etcd(&mut o, event(2, 22)), Some(event(2, 22)));
    }
}
