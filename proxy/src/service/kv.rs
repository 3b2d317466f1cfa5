//! `etcdserverpb.KV`: Range, RangeStream, Put, DeleteRange, Txn, Compact.

use etcd_guard_proto::etcdserverpb as pb;

use super::{Answer, Guard, HttpRequest};
use crate::authz;

pub async fn route(g: &Guard, method: &str, req: HttpRequest) -> Option<Answer> {
    Some(match method {
        "Range" => g.unary::<pb::RangeRequest, _>(req, "/etcdserverpb.KV/Range", authz::range).await,
        "RangeStream" => {
            g.server_streaming::<pb::RangeRequest, _>(req, "/etcdserverpb.KV/RangeStream", authz::range).await
        }
        "Put" => g.unary::<pb::PutRequest, _>(req, "/etcdserverpb.KV/Put", authz::put).await,
        "DeleteRange" => {
            g.unary::<pb::DeleteRangeRequest, _>(req, "/etcdserverpb.KV/DeleteRange", authz::delete_range).await
        }
        "Txn" => {
            let max_ops = g.shared.max_txn_ops;
            g.unary::<pb::TxnRequest, _>(req, "/etcdserverpb.KV/Txn", move |r| authz::txn(r, max_ops)).await
        }
        "Compact" => g.unary::<pb::CompactionRequest, _>(req, "/etcdserverpb.KV/Compact", authz::compact).await,
        _ => return None,
    })
}
