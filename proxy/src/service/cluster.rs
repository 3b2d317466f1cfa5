//! `etcdserverpb.Cluster`. MemberList needs `status` and is answered with the proxy's own advertised client URLs,
//! so that clients which sync their endpoints from the member list (clientv3 `AutoSyncInterval`,
//! `etcdctl --cluster`) stay on the proxy and never learn etcd's addresses. Member changes need `members`.

use etcd_guard_proto::etcdserverpb as pb;
use sha2::{Digest, Sha256};

use super::{Answer, Guard, HttpRequest};
use crate::authz;
use crate::codec::Framed;

const MEMBER_LIST: &str = "/etcdserverpb.Cluster/MemberList";

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    Some(match method {
        "MemberList" => {
            g.unary_answered::<pb::MemberListRequest, _, _, _>(
                req,
                MEMBER_LIST,
                authz::member_list,
                |rpc, msg, meta| async move {
                    // Ask etcd anyway: the header (cluster id, revision) is real and an unreachable etcd is reported.
                    let timer = g.upstream_timer(rpc);
                    let upstream: pb::MemberListResponse =
                        g.shared.upstream.unary_decoded(MEMBER_LIST, msg, &meta).await?;
                    drop(timer);
                    let answer = pb::MemberListResponse {
                        header: upstream.header,
                        members: advertised_members(&g.shared.advertise_client_urls),
                    };
                    Ok(Framed::encode(&answer))
                },
            )
            .await
        }
        "MemberAdd" => {
            g.unary::<pb::MemberAddRequest, _>(req, "/etcdserverpb.Cluster/MemberAdd", authz::member_add).await
        }
        "MemberRemove" => {
            g.unary::<pb::MemberRemoveRequest, _>(req, "/etcdserverpb.Cluster/MemberRemove", authz::members).await
        }
        "MemberUpdate" => {
            g.unary::<pb::MemberUpdateRequest, _>(req, "/etcdserverpb.Cluster/MemberUpdate", authz::member_update).await
        }
        "MemberPromote" => {
            g.unary::<pb::MemberPromoteRequest, _>(req, "/etcdserverpb.Cluster/MemberPromote", authz::members).await
        }
        _ => return None,
    })
}

/// One member per advertised URL, with a stable ID derived from the URL and a non-empty name (clientv3 skips
/// members without a name when it syncs endpoints).
pub fn advertised_members(urls: &[String]) -> Vec<pb::Member> {
    urls.iter()
        .map(|url| {
            let digest = Sha256::digest(url.as_bytes());
            let mut id = [0u8; 8];
            id.copy_from_slice(&digest[..8]);
            pb::Member {
                id: u64::from_be_bytes(id),
                name: format!("etcd-guard-{}", hex::encode(&digest[..4])),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![url.clone()],
                is_learner: false,
            }
        })
        .collect()
}
