//! `etcdserverpb.Lease`. Lease IDs are global in etcd, so leases are a channel between tenants: revoking or
//! keeping alive a lease acts on every key attached to it, and the proxy asks etcd which keys those are.

use bytes::Bytes;
use etcd_guard_proto::etcdserverpb as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::{Answer, Arrival, Guard, HttpRequest, Outbound, StreamEnd, Verdict, permission_denied};
use crate::audit::{Decision, Event};
use crate::authz;
use crate::upstream::CallMeta;

const KEEP_ALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
const RPC: &str = "Lease/LeaseKeepAlive";

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
            g.unary::<pb::LeaseTimeToLiveRequest, _>(req, path, authz::lease_time_to_live).await
        }
        "LeaseLeases" => {
            g.unary::<pb::LeaseLeasesRequest, _>(req, "/etcdserverpb.Lease/LeaseLeases", authz::lease_leases).await
        }
        "LeaseKeepAlive" => {
            let g2 = g.clone();
            g.bidi::<pb::LeaseKeepAliveRequest, _, _>(req, move |inbound, meta| keep_alive(g2, inbound, meta)).await
        }
        _ => return None,
    })
}

/// Every keep-alive is checked on its own. A denied one ends the stream with `PermissionDenied`, as etcd does.
async fn keep_alive(
    g: Guard,
    mut inbound: Streaming<pb::LeaseKeepAliveRequest>,
    meta: CallMeta,
) -> Result<Outbound, Status> {
    let (down_tx, down_rx) = mpsc::channel::<Result<Bytes, Status>>(16);
    let (up_tx, up_rx) = mpsc::channel::<pb::LeaseKeepAliveRequest>(16);

    // etcd answers the stream's headers only with its first message, so the upstream call runs beside the
    // inbound loop rather than before it.
    let upstream = g.shared.upstream.clone();
    let up_meta = meta.clone();
    let down = down_tx.clone();
    let pump = tokio::spawn(async move {
        match upstream.streaming(KEEP_ALIVE, ReceiverStream::new(up_rx), &up_meta).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(frame)) => {
                        if down.send(Ok(frame.into_bytes())).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = down.send(Err(status)).await;
                        break;
                    }
                }
            },
            Err(status) => {
                let _ = down.send(Err(status)).await;
            }
        }
    });

    let stream_id = g.shared.audit.stream_id();
    let mut end = StreamEnd::bidi(&g, RPC, stream_id, Arrival::now());
    tokio::spawn(async move {
        let code = loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = g.shared.shutdown_begun() => {
                    pump.abort();
                    let _ = down_tx.send(Err(super::shutting_down())).await;
                    break Code::Unavailable;
                }
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => break Code::Ok,
                Err(status) => break status.code(),
            };
            let at = Arrival::now();
            let record = g.record(RPC, Event::Message, stream_id, &msg, at);
            let (verdict, code) = match g.decide(&authz::lease_keep_alive(&msg), &meta).await {
                Ok(v) if v.decision == Decision::Deny => (v, Code::PermissionDenied),
                Ok(v) => match g.shared.audit.admit() {
                    Ok(()) => (v, Code::Ok),
                    Err(status) => (v, status.code()),
                },
                Err(status) => {
                    (Verdict { decision: Decision::Deny, reason: status.message().to_string() }, status.code())
                }
            };
            let audited = g.audit(RPC, record, &verdict, code, None, at).await;
            let refusal = match (code, audited) {
                (Code::Ok, Ok(())) => None,
                (Code::Ok, Err(status)) => Some(status),
                (Code::PermissionDenied, _) => Some(permission_denied()),
                (code, _) => Some(Status::new(code, verdict.reason.clone())),
            };
            if let Some(status) = refusal {
                // A refused keep-alive ends the stream, as etcd ends it.
                pump.abort();
                end.set_reason(verdict.decision, verdict.reason);
                let code = status.code();
                let _ = down_tx.send(Err(status)).await;
                break code;
            }
            if up_tx.send(msg).await.is_err() {
                break Code::Unavailable;
            }
        };
        // The client closed its side (or we ended it): close ours towards etcd and let the pump finish.
        drop(up_tx);
        end.finish(code);
    });

    Ok(Box::pin(ReceiverStream::new(down_rx)))
}
