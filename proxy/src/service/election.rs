//! `v3electionpb.Election`: Campaign, Proclaim and Resign are read and write on the prefix `name/` (plus the
//! leader key and the lease they use); Leader and Observe are reads of it.

use etcd_guard_proto::v3electionpb as pb;

use super::{Answer, Guard, HttpRequest};
use crate::authz;

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    const OBSERVE: &str = "/v3electionpb.Election/Observe";
    Some(match method {
        "Campaign" => {
            g.unary_waiting::<pb::CampaignRequest, _>(req, "/v3electionpb.Election/Campaign", authz::campaign).await
        }
        "Proclaim" => g.unary::<pb::ProclaimRequest, _>(req, "/v3electionpb.Election/Proclaim", authz::proclaim).await,
        "Leader" => g.unary::<pb::LeaderRequest, _>(req, "/v3electionpb.Election/Leader", authz::leader).await,
        "Observe" => g.server_streaming::<pb::LeaderRequest, _>(req, OBSERVE, authz::leader).await,
        "Resign" => g.unary::<pb::ResignRequest, _>(req, "/v3electionpb.Election/Resign", authz::resign).await,
        _ => return None,
    })
}
