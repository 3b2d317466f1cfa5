//! What a request does, for its audit record: the `ops` array, rendered from the decoded request.
//!
//! Values are never read here: not a Put's value, not a Compare's value, not a campaign or proclaim value, not a
//! password. RPCs without arguments worth recording write nothing, and the record gets `{"op": "<method>"}`.

use etcd_guard_proto::etcdserverpb as pb;
use etcd_guard_proto::grpc_health_v1 as health;
use etcd_guard_proto::{v3electionpb as election, v3lockpb as lock};

use super::record::{Op, Ops};

/// Renders a request's operations into an audit record.
pub trait Describe {
    /// Write this request's ops; writing none leaves the record with `{"op": "<method>"}`.
    fn describe(&self, _ops: &mut Ops) {}
}

/// `{"op": "<method in snake_case>"}` for RPCs that describe nothing.
pub fn method_op(ops: &mut Ops, rpc: &str) {
    let method = rpc.rsplit('/').next().unwrap_or(rpc);
    let mut name = String::with_capacity(method.len() + 4);
    for (i, c) in method.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                name.push('_');
            }
            name.push(c.to_ascii_lowercase());
        } else {
            name.push(c);
        }
    }
    ops.op(&name, |_| {});
}

// === KV ===

impl Describe for pb::RangeRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("range", |o| range_fields(o, self));
    }
}

fn range_fields(o: &mut Op<'_>, r: &pb::RangeRequest) {
    o.interval(&r.key, &r.range_end);
    o.num("limit", r.limit);
    o.num("revision", r.revision);
    o.flag("count_only", r.count_only);
    o.flag("keys_only", r.keys_only);
    o.flag("serializable", r.serializable);
    o.num("min_mod_revision", r.min_mod_revision);
    o.num("max_mod_revision", r.max_mod_revision);
    o.num("min_create_revision", r.min_create_revision);
    o.num("max_create_revision", r.max_create_revision);
}

impl Describe for pb::PutRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("put", |o| put_fields(o, self));
    }
}

fn put_fields(o: &mut Op<'_>, p: &pb::PutRequest) {
    o.key("key", &p.key);
    o.num("lease", p.lease);
    o.flag("prev_kv", p.prev_kv);
    o.flag("ignore_value", p.ignore_value);
    o.flag("ignore_lease", p.ignore_lease);
}

impl Describe for pb::DeleteRangeRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("delete", |o| delete_fields(o, self));
    }
}

fn delete_fields(o: &mut Op<'_>, d: &pb::DeleteRangeRequest) {
    o.interval(&d.key, &d.range_end);
    o.flag("prev_kv", d.prev_kv);
}

impl Describe for pb::TxnRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("txn", |o| txn_fields(o, self));
    }
}

fn txn_fields(o: &mut Op<'_>, t: &pb::TxnRequest) {
    o.ops("compare", |ops| {
        for c in &t.compare {
            ops.op("compare", |o| {
                let target = pb::compare::CompareTarget::try_from(c.target)
                    .map(|t| t.as_str_name().to_ascii_lowercase())
                    .unwrap_or_else(|_| c.target.to_string());
                let result = pb::compare::CompareResult::try_from(c.result)
                    .map(|r| r.as_str_name().to_ascii_lowercase())
                    .unwrap_or_else(|_| c.result.to_string());
                o.text("target", &target);
                o.text("result", &result);
                o.interval(&c.key, &c.range_end);
                // What the compare tests against: revisions and lease IDs are metadata; a value is not recorded.
                match &c.target_union {
                    Some(pb::compare::TargetUnion::Version(v)) => o.num_always("version", *v),
                    Some(pb::compare::TargetUnion::CreateRevision(v)) => o.num_always("create_revision", *v),
                    Some(pb::compare::TargetUnion::ModRevision(v)) => o.num_always("mod_revision", *v),
                    Some(pb::compare::TargetUnion::Lease(v)) => o.num_always("lease", *v),
                    Some(pb::compare::TargetUnion::Value(_)) | None => {}
                }
            });
        }
    });
    o.ops("success", |ops| request_ops(ops, &t.success));
    o.ops("failure", |ops| request_ops(ops, &t.failure));
}

fn request_ops(ops: &mut Ops, list: &[pb::RequestOp]) {
    for op in list {
        match &op.request {
            Some(pb::request_op::Request::RequestRange(r)) => ops.op("range", |o| range_fields(o, r)),
            Some(pb::request_op::Request::RequestPut(p)) => ops.op("put", |o| put_fields(o, p)),
            Some(pb::request_op::Request::RequestDeleteRange(d)) => ops.op("delete", |o| delete_fields(o, d)),
            Some(pb::request_op::Request::RequestTxn(t)) => ops.op("txn", |o| txn_fields(o, t)),
            None => ops.op("empty", |_| {}),
        }
    }
}

impl Describe for pb::CompactionRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("compact", |o| {
            o.num_always("revision", self.revision);
            o.flag("physical", self.physical);
        });
    }
}

// === Watch ===

impl Describe for pb::WatchRequest {
    fn describe(&self, ops: &mut Ops) {
        match &self.request_union {
            Some(pb::watch_request::RequestUnion::CreateRequest(c)) => ops.op("watch_create", |o| {
                // An empty key watches everything from "\x00" on, as etcd reads it.
                if c.key.is_empty() {
                    o.interval(b"\0", &c.range_end);
                } else {
                    o.interval(&c.key, &c.range_end);
                }
                o.num("start_revision", c.start_revision);
                o.flag("prev_kv", c.prev_kv);
                o.num("watch_id", c.watch_id);
                o.flag("progress_notify", c.progress_notify);
                o.flag("fragment", c.fragment);
                let filters: Vec<&str> = c
                    .filters
                    .iter()
                    .map(|f| match pb::watch_create_request::FilterType::try_from(*f) {
                        Ok(pb::watch_create_request::FilterType::Noput) => "noput",
                        Ok(pb::watch_create_request::FilterType::Nodelete) => "nodelete",
                        Err(_) => "unknown",
                    })
                    .collect();
                o.texts("filters", &filters);
            }),
            Some(pb::watch_request::RequestUnion::CancelRequest(c)) => {
                ops.op("watch_cancel", |o| o.num_always("watch_id", c.watch_id))
            }
            Some(pb::watch_request::RequestUnion::ProgressRequest(_)) => ops.op("watch_progress", |_| {}),
            None => ops.op("watch_empty", |_| {}),
        }
    }
}

// === Lease ===

impl Describe for pb::LeaseGrantRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("lease_grant", |o| {
            o.num_always("ttl", self.ttl);
            o.num("lease", self.id);
        });
    }
}

impl Describe for pb::LeaseRevokeRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("lease_revoke", |o| o.num_always("lease", self.id));
    }
}

impl Describe for pb::LeaseKeepAliveRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("lease_keepalive", |o| o.num_always("lease", self.id));
    }
}

impl Describe for pb::LeaseTimeToLiveRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("lease_timetolive", |o| {
            o.num_always("lease", self.id);
            o.flag("keys", self.keys);
        });
    }
}

// === Maintenance and Cluster (arguments that say what was done) ===

impl Describe for pb::AlarmRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("alarm", |o| {
            let action = pb::alarm_request::AlarmAction::try_from(self.action)
                .map(|a| a.as_str_name().to_ascii_lowercase())
                .unwrap_or_else(|_| self.action.to_string());
            o.text("action", &action);
            let alarm = pb::AlarmType::try_from(self.alarm)
                .map(|a| a.as_str_name().to_ascii_lowercase())
                .unwrap_or_else(|_| self.alarm.to_string());
            o.text("alarm", &alarm);
            o.num("member_id", self.member_id as i64);
        });
    }
}

impl Describe for pb::MoveLeaderRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("move_leader", |o| o.text("target_id", &format!("{:x}", self.target_id)));
    }
}

impl Describe for pb::MemberRemoveRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("member_remove", |o| o.text("id", &format!("{:x}", self.id)));
    }
}

impl Describe for pb::HashKvRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("hash_kv", |o| o.num("revision", self.revision));
    }
}

impl Describe for pb::DowngradeRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("downgrade", |o| {
            let action = pb::downgrade_request::DowngradeAction::try_from(self.action)
                .map(|a| a.as_str_name().to_ascii_lowercase())
                .unwrap_or_else(|_| self.action.to_string());
            o.text("action", &action);
            o.text("version", &self.version);
        });
    }
}

// === Lock and Election ===

impl Describe for lock::LockRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("lock", |o| {
            o.key("name", &self.name);
            o.num("lease", self.lease);
        });
    }
}

impl Describe for lock::UnlockRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("unlock", |o| o.key("key", &self.key));
    }
}

impl Describe for election::CampaignRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("campaign", |o| {
            o.key("name", &self.name);
            o.num("lease", self.lease);
        });
    }
}

impl Describe for election::ProclaimRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("proclaim", |o| leader_key(o, self.leader.as_ref()));
    }
}

impl Describe for election::ResignRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("resign", |o| leader_key(o, self.leader.as_ref()));
    }
}

fn leader_key(o: &mut Op<'_>, leader: Option<&election::LeaderKey>) {
    if let Some(l) = leader {
        o.key("name", &l.name);
        o.key("key", &l.key);
        o.num("lease", l.lease);
    }
}

impl Describe for election::LeaderRequest {
    fn describe(&self, ops: &mut Ops) {
        ops.op("leader", |o| o.key("name", &self.name));
    }
}

// === No arguments recorded ===

macro_rules! described_by_method {
    ($($t:ty),* $(,)?) => { $(impl Describe for $t {})* };
}

described_by_method!(
    pb::LeaseLeasesRequest,
    pb::MemberListRequest,
    pb::MemberAddRequest,
    pb::MemberUpdateRequest,
    pb::MemberPromoteRequest,
    pb::StatusRequest,
    pb::DefragmentRequest,
    pb::HashRequest,
    pb::SnapshotRequest,
    pb::DowngradeVersionTestRequest,
    // Auth: user names, role names and passwords are not recorded (passwords must never be).
    pb::AuthEnableRequest,
    pb::AuthDisableRequest,
    pb::AuthStatusRequest,
    pb::AuthenticateRequest,
    pb::AuthUserAddRequest,
    pb::AuthUserGetRequest,
    pb::AuthUserDeleteRequest,
    pb::AuthUserChangePasswordRequest,
    pb::AuthUserGrantRoleRequest,
    pb::AuthUserRevokeRoleRequest,
    pb::AuthRoleAddRequest,
    pb::AuthRoleGetRequest,
    pb::AuthUserListRequest,
    pb::AuthRoleListRequest,
    pb::AuthRoleDeleteRequest,
    pb::AuthRoleGrantPermissionRequest,
    pb::AuthRoleRevokePermissionRequest,
    health::HealthCheckRequest,
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{MAX_KEY_BYTES, MAX_OPS_BYTES};

    fn render(d: &dyn Describe) -> serde_json::Value {
        let mut ops = Ops::new();
        d.describe(&mut ops);
        serde_json::from_str(&ops.finish()).unwrap_or_default()
    }

    #[test]
    fn txn_tree_without_values() {
        let txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: pb::compare::CompareResult::Equal as i32,
                target: pb::compare::CompareTarget::Value as i32,
                key: b"cilium/a".to_vec(),
                range_end: vec![],
                target_union: Some(pb::compare::TargetUnion::Value(b"SECRET-COMPARE".to_vec())),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: b"cilium/b".to_vec(),
                    value: b"SECRET-VALUE".to_vec(),
                    lease: 7,
                    ..Default::default()
                })),
            }],
            failure: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                            key: b"x".to_vec(),
                            range_end: b"\0".to_vec(),
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                })),
            }],
        };
        let mut ops = Ops::new();
        txn.describe(&mut ops);
        let text = ops.finish();
        assert!(!text.contains("SECRET"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(v[0]["op"], "txn");
        assert_eq!(v[0]["compare"][0]["target"], "value");
        assert_eq!(v[0]["compare"][0]["result"], "equal");
        assert_eq!(v[0]["compare"][0]["key"], "cilium/a");
        assert_eq!(v[0]["success"][0]["op"], "put");
        assert_eq!(v[0]["success"][0]["lease"], 7);
        assert_eq!(v[0]["failure"][0]["success"][0]["from"], "x");
        assert!(v[0]["failure"][0]["success"][0].get("to").is_none());
    }

    /// A request of `max_request_bytes` makes a record of bounded size, whatever it holds: a million empty
    /// compares, long keys, nested transactions.
    #[test]
    fn records_of_the_largest_requests_are_bounded() {
        let nested = |txn: pb::TxnRequest| pb::RequestOp { request: Some(pb::request_op::Request::RequestTxn(txn)) };
        let compares = vec![pb::Compare::default(); 1_000_000];
        let long_key = vec![0xffu8; 1 << 20];
        let mut txn = pb::TxnRequest {
            compare: compares,
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: long_key.clone(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        for _ in 0..16 {
            txn = pb::TxnRequest { compare: txn.compare.clone(), success: vec![nested(txn)], ..Default::default() };
        }
        let mut ops = Ops::new();
        txn.describe(&mut ops);
        let text = ops.finish();
        assert!(text.len() < 2 * MAX_OPS_BYTES, "{} bytes", text.len());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let compare = v[0]["compare"].as_array().cloned().unwrap_or_default();
        let last = compare.last().cloned().unwrap_or_default();
        assert_eq!(last["op"], "omitted", "{last}");
        let shown = compare.len() as u64 - 1;
        assert_eq!(last["count"].as_u64().map(|c| c + shown), Some(1_000_000));
        // Lists once the record is full: nothing but the count.
        assert_eq!(v[0]["success"], serde_json::json!([{"op": "omitted", "count": 1}]));

        // Filled within a nested list: that list says what it left out, and the record is still whole JSON.
        let inner = pb::TxnRequest { compare: vec![pb::Compare::default(); 100_000], ..Default::default() };
        let outer = pb::TxnRequest { success: vec![nested(inner.clone()), nested(inner)], ..Default::default() };
        let mut ops = Ops::new();
        outer.describe(&mut ops);
        let v: serde_json::Value = serde_json::from_str(&ops.finish()).unwrap_or_default();
        let inner = v[0]["success"][0]["compare"].as_array().cloned().unwrap_or_default();
        assert_eq!(inner.last().map(|l| l["op"].clone()), Some("omitted".into()));
        assert_eq!(v[0]["success"][1], serde_json::json!({"op": "omitted", "count": 1}));

        let mut ops = Ops::new();
        pb::PutRequest { key: long_key, ..Default::default() }.describe(&mut ops);
        let v: serde_json::Value = serde_json::from_str(&ops.finish()).unwrap_or_default();
        assert_eq!(v[0]["key"].as_str().map(|k| k.len()), Some(MAX_KEY_BYTES * "\\xff".len()));
        assert_eq!(v[0]["key_len"], 1 << 20);
    }

    #[test]
    fn watch_create_with_empty_key_is_from_nul() {
        let w = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: vec![],
                range_end: b"\0".to_vec(),
                watch_id: 5,
                ..Default::default()
            })),
        };
        let v = render(&w);
        assert_eq!(v[0]["op"], "watch_create");
        assert_eq!(v[0]["from"], "\\x00");
        assert_eq!(v[0]["watch_id"], 5);
    }

    #[test]
    fn method_names_become_snake_case() {
        let mut ops = Ops::new();
        method_op(&mut ops, "Maintenance/MoveLeader");
        assert_eq!(ops.finish(), r#"[{"op":"move_leader"}]"#);
    }
}
