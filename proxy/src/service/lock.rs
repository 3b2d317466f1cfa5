//! `v3lockpb.Lock`: Lock(name) is read and write on the prefix `name/` plus the lease it takes; Unlock(key) is a
//! delete of that key.

use etcd_guard_proto::v3lockpb as pb;

use super::{Answer, Guard, HttpRequest};
use crate::authz;

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    Some(match method {
        "Lock" => g.unary_waiting::<pb::LockRequest, _>(req, "/v3lockpb.Lock/Lock", authz::lock).await,
        "Unlock" => g.unary::<pb::UnlockRequest, _>(req, "/v3lockpb.Lock/Unlock", authz::unlock).await,
        _ => return None,
    })
}
