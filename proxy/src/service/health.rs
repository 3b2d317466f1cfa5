//! `grpc.health.v1.Health`: forwarded to etcd for callers with the `status` capability.

use etcd_guard_proto::grpc_health_v1 as pb;

use super::{Answer, Guard, HttpRequest};
use crate::authz::capability;
use crate::policy::Capability;

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    let check = capability(Capability::Status);
    Some(match method {
        "Check" => g.unary::<pb::HealthCheckRequest, _>(req, "/grpc.health.v1.Health/Check", check).await,
        "Watch" => g.server_streaming::<pb::HealthCheckRequest, _>(req, "/grpc.health.v1.Health/Watch", check).await,
        _ => return None,
    })
}
