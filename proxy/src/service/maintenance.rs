//! `etcdserverpb.Maintenance`: each RPC needs its capability (Alarm GET only `status`).

use etcd_guard_proto::etcdserverpb as pb;

use super::{Answer, Guard, HttpRequest};
use crate::authz::{self, capability};
use crate::policy::Capability;

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    Some(match method {
        "Alarm" => g.unary::<pb::AlarmRequest, _>(req, "/etcdserverpb.Maintenance/Alarm", authz::alarm).await,
        "Status" => {
            g.unary::<pb::StatusRequest, _>(req, "/etcdserverpb.Maintenance/Status", capability(Capability::Status))
                .await
        }
        "Defragment" => {
            let check = capability(Capability::Defragment);
            g.unary::<pb::DefragmentRequest, _>(req, "/etcdserverpb.Maintenance/Defragment", check).await
        }
        "Hash" => {
            g.unary::<pb::HashRequest, _>(req, "/etcdserverpb.Maintenance/Hash", capability(Capability::Hash)).await
        }
        "HashKV" => {
            g.unary::<pb::HashKvRequest, _>(req, "/etcdserverpb.Maintenance/HashKV", capability(Capability::Hash)).await
        }
        "Snapshot" => {
            let check = capability(Capability::Snapshot);
            g.server_streaming::<pb::SnapshotRequest, _>(req, "/etcdserverpb.Maintenance/Snapshot", check).await
        }
        "MoveLeader" => {
            let check = capability(Capability::MoveLeader);
            g.unary::<pb::MoveLeaderRequest, _>(req, "/etcdserverpb.Maintenance/MoveLeader", check).await
        }
        "Downgrade" => {
            g.unary::<pb::DowngradeRequest, _>(req, "/etcdserverpb.Maintenance/Downgrade", authz::downgrade).await
        }
        _ => return None,
    })
}
