//! `etcdserverpb.Lease`. Lease IDs are global in etcd, so leases are a channel between tenants: revoking or
//! keeping alive a lease acts on every key attached to it, and the proxy asks etcd which keys those are.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream as _;

use bytes::Bytes;
use etcd_guard_proto::etcdserverpb as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::{Answer, Arrival, Guard, HttpRequest, Outbound, StreamEnd, Verdict, permission_denied};
use crate::audit::{Decision, Event};
use crate::authz;
use crate::codec::Framed;
use crate::http2::UnreadLimit;
use crate::upstream::{CallMeta, StreamCall};

const KEEP_ALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
const RPC: &str = "Lease/LeaseKeepAlive";

/// How a grant's record names it (`service::rpc_name`).
pub const GRANT_RPC: &str = "Lease/LeaseGrant";

/// Only the ID of etcd's `LeaseGrantResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct Granted {
    #[prost(int64, tag = "2")]
    id: i64,
}

/// Add the lease etcd granted (its pick when the request left the ID 0) to the grant's op as `granted`, so that
/// `audit review --lease` finds the grant. The op is `{"op":"lease_grant",…}`, the only one in its record.
pub fn record_granted(ops: &mut String, answer: &Framed) {
    let id = match <Granted as prost::Message>::decode(answer.message()) {
        Ok(Granted { id }) if id != 0 => id,
        _ => return,
    };
    if ops.starts_with(r#"[{"op":"lease_grant""#) && ops.ends_with("}]") {
        ops.truncate(ops.len() - 2);
        ops.push_str(&format!(",\"granted\":{id}}}]"));
    }
}

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    Some(match method {
        "LeaseGrant" => {
            g.unary::<pb::LeaseGrantRequest, _>(req, "/etcdserverpb.Lease/LeaseGrant", authz::lease_grant).await
        }
        "LeaseRevoke" => {
            g.unary::<pb::LeaseRevokeRequest, _>(req, "/etcdserverpb.Lease/LeaseRevoke", authz::lease_revoke).await
        }
        "LeaseTimeToLive" => {
            let path = "/etcdserverpb.Lease/LeaseTimeToLive";
            let keys = |r: &pb::LeaseTimeToLiveRequest| r.keys;
            let inspected = (keys as fn(&_) -> bool, super::lease_keys::unreadable_key_in as _);
            g.unary_inspected::<pb::LeaseTimeToLiveRequest, _>(req, path, authz::lease_time_to_live, inspected).await
        }
        "LeaseLeases" => {
            g.unary::<pb::LeaseLeasesRequest, _>(req, "/etcdserverpb.Lease/LeaseLeases", authz::lease_leases).await
        }
        "LeaseKeepAlive" => {
            let g2 = g.clone();
            g.bidi::<pb::LeaseKeepAliveRequest, _, _>(req, RPC, move |inbound, meta, unread| {
                keep_alive(g2, inbound, meta, unread)
            })
            .await
        }
        _ => return None,
    })
}

/// Every keep-alive is checked on its own. A denied one ends the stream with `PermissionDenied`, as etcd does.
///
/// etcd's answers are read by the client's response stream itself ([`ToClient`]), as for watches: no task or
/// queue of the proxy's between the two connections. The proxy's only message of its own is the status that ends
/// the stream early (a refusal, a shutdown, a message that cannot be read), handed over once. The stream's end
/// is recorded by the response stream, as it ended for the client.
async fn keep_alive(
    g: Guard,
    mut inbound: Streaming<pb::LeaseKeepAliveRequest>,
    meta: CallMeta,
    unread: Option<UnreadLimit>,
) -> Result<Outbound, Status> {
    let (end_tx, end_rx) = oneshot::channel::<Ending>();
    let (up_tx, up_rx) = mpsc::channel::<pb::LeaseKeepAliveRequest>(16);

    // etcd answers the stream's headers only with its first message, so the upstream call is made by the client's
    // response stream, beside the inbound loop, rather than before it; and only with the first keep-alive
    // forwarded: a stream whose keep-alives are all refused (a client bound to nothing) opens none at etcd. One
    // whose client ends its side having sent nothing ends as etcd ends it then (OK, no answers).
    let upstream = g.shared.upstream.for_streams(&g.conn.streams);
    let up_meta = meta.clone();
    let upstream = StreamCall::unless(async move {
        let mut up_rx = up_rx;
        let first = up_rx.recv().await?;
        let messages = futures_util::StreamExt::chain(futures_util::stream::iter([first]), ReceiverStream::new(up_rx));
        Some(upstream.streaming(KEEP_ALIVE, Box::pin(messages), &up_meta).await)
    });
    let stream_id = g.shared.audit.stream_id();
    let end = StreamEnd::bidi(&g, RPC, stream_id, Arrival::now()).noting(unread);
    let to_client = ToClient { upstream, ending: Some(end_rx), end };

    tokio::spawn(async move {
        let ending = loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = g.shared.shutdown_begun() => break Some(Ending { status: super::shutting_down(), why: None }),
            };
            let msg = match next {
                Ok(Some(m)) => m,
                // Half-closed: etcd ends the stream once it has answered what it got.
                Ok(None) => break None,
                // Ends the stream as etcd ends it (or, if the client's side is gone, only notes that).
                Err(status) => break Some(Ending { status, why: None }),
            };
            let at = Arrival::now();
            let mut record = g.record(RPC, Event::Message, stream_id, &msg, at);
            // The status a keep-alive is refused with, when the proxy refuses it for a reason of its own.
            let mut refused_with = None;
            // Each keep-alive counts against the identity's rate, as a call: otherwise one stream could make etcd
            // list a large lease's keys (the lookup below) dozens of times a second beyond the rate.
            let decided = match g.rate_one() {
                Ok(()) => g.decide(&authz::lease_keep_alive(&msg), &meta, &mut record).await,
                Err(status) => Err(status),
            };
            let (verdict, code) = match decided {
                Ok(v) if v.decision == Decision::Deny => (v, Code::PermissionDenied),
                Ok(v) => match g.shared.audit.admit() {
                    Ok(()) => (v, Code::Ok),
                    // Allowed, but not served (shutting down, or the audit log cannot be written): the client
                    // hears why, not the rule that allowed it.
                    Err(status) => (v, refused_with.insert(status).code()),
                },
                Err(status) => {
                    (Verdict { decision: Decision::Deny, reason: status.message().to_string() }, status.code())
                }
            };
            let audited = g.audit_refusal(RPC, record, Cow::Borrowed(&verdict), code, at).await;
            let refusal = match (code, audited) {
                (Code::Ok, Ok(())) => None,
                (Code::Ok, Err(status)) => Some(status),
                (Code::PermissionDenied, _) => Some(permission_denied()),
                (code, _) => Some(refused_with.unwrap_or_else(|| Status::new(code, verdict.reason.clone()))),
            };
            if let Some(status) = refusal {
                // A refused keep-alive ends the stream, as etcd ends it.
                break Some(Ending { status, why: Some((verdict.decision, verdict.reason)) });
            }
            if up_tx.send(msg).await.is_err() {
                // etcd's side has ended: the response stream passes on how.
                break None;
            }
        };
        // Handed over before our side towards etcd closes, so the client sees this status rather than etcd's end.
        if let Some(ending) = ending {
            let _ = end_tx.send(ending);
        }
        drop(up_tx);
    });

    Ok(Box::pin(to_client))
}

/// How the inbound side ends a keep-alive stream early.
struct Ending {
    status: Status,
    /// For the end record, when the proxy refused a keep-alive: the decision and why.
    why: Option<(Decision, String)>,
}

/// The client's side of one keep-alive stream: etcd's answers as they are read, or the status the proxy ended
/// the stream with; records how the stream ended.
struct ToClient {
    upstream: StreamCall,
    /// How the inbound side ends the stream, if it ends it (closed without one: it ended quietly).
    ending: Option<oneshot::Receiver<Ending>>,
    end: StreamEnd,
}

// === impl ToClient ===

impl ToClient {
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Status>>> {
        // etcd's answers that are ready go first: they answer keep-alives sent before a refusal.
        if let Poll::Ready(Some(answer)) = Pin::new(&mut self.upstream).poll_next(cx) {
            return Poll::Ready(Some(answer.map(Framed::into_bytes)));
        }
        if let Some(ending) = self.ending.as_mut() {
            match Pin::new(ending).poll(cx) {
                Poll::Ready(Ok(Ending { status, why })) => {
                    // The stream ends here: etcd's side is dropped (which resets it).
                    self.ending = None;
                    self.upstream.close();
                    if let Some((decision, reason)) = why {
                        self.end.set_reason(decision, reason);
                    }
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Err(_)) => self.ending = None,
                Poll::Pending => {}
            }
        }
        // Ends when etcd's side has ended and the inbound side has ended without a status of its own.
        if self.ending.is_none() && self.upstream.is_done() {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

/// A stream let go before it took the inbound side's end (the client went away first): its end record still says
/// why the proxy refused.
impl Drop for ToClient {
    fn drop(&mut self) {
        if let Some(Ok(Ending { why: Some((decision, reason)), .. })) = self.ending.as_mut().map(|e| e.try_recv()) {
            self.end.set_reason(decision, reason);
        }
    }
}

impl futures_util::Stream for ToClient {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = std::task::ready!(this.poll_item(cx));
        Poll::Ready(this.end.note(item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_records_the_lease_etcd_granted() -> Result<(), String> {
        let answer =
            |id| Framed::parse(crate::codec::frame(&pb::LeaseGrantResponse { id, ttl: 60, ..Default::default() }));
        let mut ops = r#"[{"op":"lease_grant","ttl":60}]"#.to_owned();
        record_granted(&mut ops, &answer(0x694d_7a0e_7bd5_d60a)?);
        assert_eq!(ops, r#"[{"op":"lease_grant","ttl":60,"granted":7587855149814896138}]"#);
        // No lease granted (etcd's error), or an op of another shape: nothing added.
        let mut ops = r#"[{"op":"lease_grant","ttl":60}]"#.to_owned();
        record_granted(&mut ops, &answer(0)?);
        assert_eq!(ops, r#"[{"op":"lease_grant","ttl":60}]"#);
        let mut ops = r#"[{"op":"omitted","count":1}]"#.to_owned();
        record_granted(&mut ops, &answer(5)?);
        assert_eq!(ops, r#"[{"op":"omitted","count":1}]"#);
        Ok(())
    }
}
