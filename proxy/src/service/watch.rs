//! `etcdserverpb.Watch`: one upstream stream per client stream, so watch IDs, ordering, progress requests and
//! fragments behave exactly as with etcd.
//!
//! etcd's responses are read by the client's response stream itself ([`ToClient`]): an event goes from the
//! upstream connection to the client connection without a task or queue of the proxy's in between.
//!
//! Each create request is checked for read access on its interval. A denied create does not end the stream:
//! like etcd, the proxy answers it with a created-and-canceled response (`watch_id` -1, `cancel_reason`
//! "rpc error: code = PermissionDenied desc = etcdserver: permission denied"). clientv3 pairs `created`
//! responses with its creates in order, so a denial waits behind creates still pending at etcd.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use etcd_guard_proto::etcdserverpb as pb;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::{Answer, Arrival, Guard, HttpRequest, Outbound, StreamEnd, Verdict};
use crate::audit::{Decision, Event};
use crate::authz;
use crate::codec::Framed;
use crate::limits::WatchSlot;
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
            g.bidi::<pb::WatchRequest, _, _>(req, move |inbound, meta| serve(g2, inbound, meta)).await
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

/// A create request waiting for its `created` answer, in the order the client sent them.
enum Pending {
    /// Forwarded to etcd; etcd's `created` response answers it. The interval is kept to re-check it when the
    /// policy changes.
    Upstream(Option<KeyRange>, Option<WatchSlot>),
    /// Refused by the proxy (denied, or over a limit) with this cancel reason; answered as soon as everything
    /// before it is answered.
    Refused(String),
}

/// An open watch: what it watches and the limit slot it holds.
struct Active {
    range: Option<KeyRange>,
    _slot: Option<WatchSlot>,
    _counted: Counted,
}

/// Counts an open watch in `etcd_guard_open_watches` while it lives.
struct Counted(prometheus_client::metrics::gauge::Gauge);

impl Counted {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
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
    /// Refusals released by the last `created`: sent before anything else.
    released: VecDeque<Bytes>,
    own: mpsc::Receiver<Result<Bytes, Status>>,
    own_closed: bool,
    /// etcd's messages passed on since the proxy's own channel was last looked at.
    since_own: u32,
    order: Arc<Mutex<Order>>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

async fn serve(g: Guard, mut inbound: Streaming<pb::WatchRequest>, meta: CallMeta) -> Result<Outbound, Status> {
    let (down_tx, down_rx) = mpsc::channel(64);
    let (up_tx, up_rx): (Up, _) = mpsc::channel(64);
    let order = Arc::new(Mutex::new(Order::default()));

    // etcd sends the stream's headers only with its first message, so the upstream call is made by the outbound
    // stream, beside the inbound loop, rather than before it.
    let upstream = g.shared.upstream.clone();
    let up_meta = meta.clone();
    let upstream =
        StreamCall::new(async move { upstream.streaming(WATCH, ReceiverStream::new(up_rx), &up_meta).await });
    let to_client = ToClient {
        upstream,
        released: VecDeque::new(),
        own: down_rx,
        own_closed: false,
        since_own: 0,
        order: order.clone(),
        gauge: g.shared.metrics.open_watches.clone(),
    };

    let stream_id = g.shared.audit.stream_id();
    let end = StreamEnd::bidi(&g, RPC, stream_id, Arrival::now());
    tokio::spawn(async move {
        let code = inbound_loop(&g, &mut inbound, &meta, stream_id, &order, &down_tx, &up_tx).await;
        drop(up_tx);
        end.finish(code);
    });

    Ok(Box::pin(to_client))
}

fn lock(order: &Mutex<Order>) -> MutexGuard<'_, Order> {
    order.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Check, record and forward the client's messages; returns the code the stream ends with.
async fn inbound_loop(
    g: &Guard,
    inbound: &mut Streaming<pb::WatchRequest>,
    meta: &CallMeta,
    stream_id: Option<u64>,
    order: &Mutex<Order>,
    down_tx: &Down,
    up_tx: &Up,
) -> Code {
    let mut reloads = g.shared.subscribe_reloads();
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = g.shared.shutdown_begun() => {
                let _ = down_tx.send(Err(super::shutting_down())).await;
                return Code::Unavailable;
            }
            changed = reloads.changed() => {
                if changed.is_ok() && !revoke_withdrawn(g, stream_id, order, up_tx).await {
                    return Code::Unavailable;
                }
                continue;
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => return Code::Ok,
            Err(status) => return status.code(),
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
        let record = g.record(RPC, Event::Message, stream_id, &msg, at);
        let verdict = match g.decide(&authz::watch(&msg), meta).await {
            Ok(v) => v,
            Err(status) => {
                // The check itself failed: end the stream.
                let v = Verdict { decision: Decision::Deny, reason: status.message().to_string() };
                let _ = g.audit(RPC, record, &v, status.code(), None, at).await;
                let code = status.code();
                let _ = down_tx.send(Err(status)).await;
                return code;
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
        let audited = g.audit(RPC, record, &verdict, code, None, at).await;
        if let Err(status) = admitted.and(audited) {
            let code = status.code();
            let _ = down_tx.send(Err(status)).await;
            return code;
        }
        let refusal = if served {
            if is_create {
                lock(order).pending.push_back(Pending::Upstream(range, slot.flatten()));
            }
            None
        } else {
            Some(limited.unwrap_or_else(|| DENIED_REASON.to_string()))
        };
        match refusal {
            None => {
                if up_tx.send(Box::new(msg)).await.is_err() {
                    return Code::Unavailable;
                }
            }
            Some(reason) if is_create => {
                // Behind creates still pending at etcd, the refusal waits for their answers; else it goes now.
                let now = {
                    let mut o = lock(order);
                    if o.pending.is_empty() {
                        Some(denial(o.header, &reason))
                    } else {
                        o.pending.push_back(Pending::Refused(reason));
                        None
                    }
                };
                if let Some(answer) = now {
                    if down_tx.send(Ok(answer)).await.is_err() {
                        return Code::Cancelled;
                    }
                }
            }
            Some(_) => {}
        }
        // A denied message that is not a create (an unknown request type) is dropped, as etcd ignores requests
        // it does not understand.
    }
}

/// After a policy reload: cancel the open watches the caller may no longer read, as etcd cancels them
/// (`PermissionDenied` cancel reason), and record each. Returns false if etcd's stream is gone.
async fn revoke_withdrawn(g: &Guard, stream_id: Option<u64>, order: &Mutex<Order>, up_tx: &Up) -> bool {
    let view = g.conn.view(&g.shared);
    if view.permissions.mode() == Mode::AuditOnly {
        return true;
    }
    let withdrawn: Vec<(i64, String)> = {
        let mut o = lock(order);
        let gone: Vec<(i64, String)> = o
            .active
            .iter()
            .filter_map(|(id, a)| {
                let range = a.range.as_ref()?;
                view.permissions.check(Access::Read, range).err().map(|d| (*id, d.reason))
            })
            .collect();
        for (id, _) in &gone {
            o.active.remove(id);
            o.revoked.insert(*id);
        }
        gone
    };
    for (watch_id, reason) in withdrawn {
        let at = Arrival::now();
        let cancel = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CancelRequest(pb::WatchCancelRequest { watch_id })),
        };
        let record = g.record(RPC, Event::Message, stream_id, &cancel, at);
        let verdict =
            Verdict { decision: Decision::Deny, reason: format!("permission withdrawn by a policy reload: {reason}") };
        let _ = g.audit(RPC, record, &verdict, Code::PermissionDenied, None, at).await;
        if up_tx.send(Box::new(cancel)).await.is_err() {
            return false;
        }
    }
    true
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
    /// Note what one of etcd's responses means for the open watches; the frame to pass on.
    fn on_response(&mut self, frame: Framed) -> Bytes {
        let head = WatchResponseHead::decode(frame.message_bytes()).unwrap_or_default();
        let mut o = lock(&self.order);
        if !head.created {
            if head.canceled {
                o.active.remove(&head.watch_id);
                if o.revoked.remove(&head.watch_id) {
                    return revoked(head.header(), head.watch_id);
                }
            }
            return frame.into_bytes();
        }
        if let Some(header) = head.header() {
            o.header = Some(header);
        }
        if let Some(Pending::Upstream(..)) = o.pending.front() {
            if let Some(Pending::Upstream(range, slot)) = o.pending.pop_front() {
                if !head.canceled {
                    let counted = Counted::new(&self.gauge);
                    o.active.insert(head.watch_id, Active { range, _slot: slot, _counted: counted });
                }
            }
        }
        while let Some(Pending::Refused(_)) = o.pending.front() {
            let Some(Pending::Refused(reason)) = o.pending.pop_front() else { break };
            self.released.push_back(denial(o.header, &reason));
        }
        frame.into_bytes()
    }
}

/// While etcd's messages keep coming, the proxy's own channel is looked at once per this many of them (and always
/// before the stream waits): a shutdown or an error then waits behind at most this many events, and a flood of
/// events does not pay for a look at an empty channel each.
const OWN_EVERY: u32 = 16;

impl futures_util::Stream for ToClient {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Refusals released by a `created` follow it before anything else (clients pair them in order).
        if let Some(bytes) = this.released.pop_front() {
            return Poll::Ready(Some(Ok(bytes)));
        }
        // The proxy's own messages come before etcd's: they are few, and a shutdown or an error must not wait
        // behind a flood of events.
        if this.since_own >= OWN_EVERY {
            if let Poll::Ready(item) = this.poll_own(cx) {
                return Poll::Ready(item);
            }
        }
        if let Poll::Ready(Some(item)) = Pin::new(&mut this.upstream).poll_next(cx) {
            return Poll::Ready(Some(item.map(|frame| {
                this.since_own += 1;
                this.on_response(frame)
            })));
        }
        // Before waiting, the own channel is always looked at (which also asks to be woken by it).
        if let Poll::Ready(item) = this.poll_own(cx) {
            return Poll::Ready(item);
        }
        // Ends when etcd's side and the proxy's side have both ended.
        if this.own_closed && this.upstream.is_done() {
            return Poll::Ready(None);
        }
        Poll::Pending
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
