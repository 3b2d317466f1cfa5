//! Our .proto files must produce etcd's exact wire format: field numbers and types checked byte for byte.

use std::collections::BTreeSet;

use etcd_guard_proto::etcdserverpb::{self as pb, compare, request_op, watch_request};
use etcd_guard_proto::{grpc_health_v1 as health, methods};
use prost::Message;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex is valid")).collect()
}

#[test]
fn range_request_bytes_match_etcd() {
    let r = pb::RangeRequest { key: b"foo".to_vec(), range_end: b"\0".to_vec(), ..Default::default() };
    assert_eq!(hex(&r.encode_to_vec()), "0a03666f6f120100");
}

#[test]
fn present_but_empty_range_end_reencodes_canonically() -> Result<(), prost::DecodeError> {
    let r = pb::RangeRequest::decode(unhex("0a03666f6f1200").as_slice())?;
    assert_eq!(r.key, b"foo");
    assert!(r.range_end.is_empty());
    assert_eq!(hex(&r.encode_to_vec()), "0a03666f6f");
    Ok(())
}

#[test]
fn range_request_revision_filters_are_fields_10_to_13() {
    let r = pb::RangeRequest {
        min_mod_revision: 1,
        max_mod_revision: 2,
        min_create_revision: 3,
        max_create_revision: 4,
        ..Default::default()
    };
    assert_eq!(hex(&r.encode_to_vec()), "5001580260036804");
}

#[test]
fn range_stream_response_wraps_range_response_in_field_1() {
    let r = pb::RangeStreamResponse { range_response: Some(pb::RangeResponse { count: 1, ..Default::default() }) };
    assert_eq!(hex(&r.encode_to_vec()), "0a022001");
}

#[test]
fn compare_range_end_is_field_64() {
    let c = pb::Compare { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    // key (field 3), then range_end: field 64, wire type 2 = varint 0x82 0x04.
    assert_eq!(hex(&c.encode_to_vec()), "1a016b8204016c");
    let c = pb::Compare { target_union: Some(compare::TargetUnion::Lease(5)), ..Default::default() };
    assert_eq!(hex(&c.encode_to_vec()), "4005");
}

#[test]
fn request_op_txn_is_field_4() {
    let op = pb::RequestOp { request: Some(request_op::Request::RequestTxn(pb::TxnRequest::default())) };
    assert_eq!(hex(&op.encode_to_vec()), "2200");
}

#[test]
fn nested_txn_round_trips() -> Result<(), prost::DecodeError> {
    let inner = pb::TxnRequest {
        compare: vec![pb::Compare { key: b"c".to_vec(), range_end: b"d".to_vec(), ..Default::default() }],
        success: vec![pb::RequestOp {
            request: Some(request_op::Request::RequestPut(pb::PutRequest { key: b"a".to_vec(), ..Default::default() })),
        }],
        ..Default::default()
    };
    let outer = pb::TxnRequest {
        failure: vec![pb::RequestOp { request: Some(request_op::Request::RequestTxn(inner)) }],
        ..Default::default()
    };
    let bytes = outer.encode_to_vec();
    let back = pb::TxnRequest::decode(bytes.as_slice())?;
    assert_eq!(back, outer);
    assert_eq!(back.encode_to_vec(), bytes);
    Ok(())
}

/// A `oneof` message field sent twice: etcd's decoder keeps the last one whole (protobuf's merge would keep the
/// first one's value under the second one's key).
#[test]
fn a_oneof_message_sent_twice_is_the_last_one_whole() -> Result<(), prost::DecodeError> {
    // request_put { key: "a" value: "s" }, then request_put { key: "b" }.
    let op = unhex("12060a016112017312030a0162");
    let put = |key: &[u8], value: &[u8]| pb::RequestOp {
        request: Some(request_op::Request::RequestPut(pb::PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })),
    };
    assert_eq!(pb::RequestOp::decode(op.as_slice())?, put(b"b", b""));
    // The same inside a transaction's op list, and with another variant in between.
    let mut txn = vec![0x12, op.len() as u8];
    txn.extend(&op);
    assert_eq!(pb::TxnRequest::decode(txn.as_slice())?.success, vec![put(b"b", b"")]);
    let op = unhex("12060a01611201731a030a016312030a0162");
    assert_eq!(pb::RequestOp::decode(op.as_slice())?, put(b"b", b""));

    // create_request { key: "a" range_end: "\0" }, then create_request { key: "b" }: a watch on "b" alone.
    let w = pb::WatchRequest::decode(unhex("0a060a01611201000a030a0162").as_slice())?;
    let create = pb::WatchCreateRequest { key: b"b".to_vec(), ..Default::default() };
    assert_eq!(w.request_union, Some(watch_request::RequestUnion::CreateRequest(create)));
    // Each occurrence is decoded whole, errors included; encoding is unchanged.
    assert!(pb::WatchRequest::decode(unhex("0a060a01611201000a020a05").as_slice()).is_err());
    assert_eq!(hex(&put(b"b", b"").encode_to_vec()), "12030a0162");
    Ok(())
}

#[test]
fn watch_fields_have_etcds_numbers() {
    // watch_id is field 7, fragment field 8.
    let w = pb::WatchCreateRequest { watch_id: 7, fragment: true, ..Default::default() };
    assert_eq!(hex(&w.encode_to_vec()), "38074001");
    // cancel_reason is field 6, fragment field 7, events field 11.
    let w = pb::WatchResponse {
        cancel_reason: "x".into(),
        fragment: true,
        events: vec![Default::default()],
        ..Default::default()
    };
    assert_eq!(hex(&w.encode_to_vec()), "32017838015a00");
    let w = pb::WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(pb::WatchProgressRequest {})),
    };
    assert_eq!(hex(&w.encode_to_vec()), "1a00");
}

#[test]
fn maintenance_fields_have_etcds_numbers() {
    let s = pb::StatusResponse {
        storage_version: "3.6".into(),
        db_size_quota: 1,
        downgrade_info: Some(pb::DowngradeInfo { enabled: true, target_version: "3.5".into() }),
        ..Default::default()
    };
    assert_eq!(hex(&s.encode_to_vec()), "5a03332e3660016a0708011203332e35");
    let h = pb::HashKvResponse { hash_revision: 2, ..Default::default() };
    assert_eq!(hex(&h.encode_to_vec()), "2002");
    let s = pb::SnapshotResponse { version: "v".into(), ..Default::default() };
    assert_eq!(hex(&s.encode_to_vec()), "220176");
    let d =
        pb::DowngradeRequest { action: pb::downgrade_request::DowngradeAction::Enable.into(), version: "3.6".into() };
    assert_eq!(hex(&d.encode_to_vec()), "08011203332e36");
    let d = pb::DowngradeResponse { version: "3.6".into(), ..Default::default() };
    assert_eq!(hex(&d.encode_to_vec()), "1203332e36");
}

#[test]
fn cluster_and_auth_fields_have_etcds_numbers() {
    assert_eq!(hex(&pb::MemberListRequest { linearizable: true }.encode_to_vec()), "0801");
    let m = pb::Member { is_learner: true, ..Default::default() };
    assert_eq!(hex(&m.encode_to_vec()), "2801");
    let u = pb::AuthUserAddRequest { hashed_password: "h".into(), ..Default::default() };
    assert_eq!(hex(&u.encode_to_vec()), "220168");
    let u = pb::AuthUserChangePasswordRequest { hashed_password: "h".into(), ..Default::default() };
    assert_eq!(hex(&u.encode_to_vec()), "1a0168");
    let s = pb::AuthStatusResponse { enabled: true, auth_revision: 3, ..Default::default() };
    assert_eq!(hex(&s.encode_to_vec()), "10011803");
}

#[test]
fn health_status_values() {
    let r = health::HealthCheckResponse { status: health::health_check_response::ServingStatus::Serving.into() };
    assert_eq!(hex(&r.encode_to_vec()), "0801");
    assert_eq!(health::health_check_response::ServingStatus::ServiceUnknown as i32, 3);
}

/// The `"/pkg.Service/Method" => {` match arms of the generated servers: exactly the RPCs they serve.
fn generated_server_paths() -> BTreeSet<String> {
    let sources = [
        include_str!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs")),
        include_str!(concat!(env!("OUT_DIR"), "/v3lockpb.rs")),
        include_str!(concat!(env!("OUT_DIR"), "/v3electionpb.rs")),
        include_str!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs")),
    ];
    sources
        .iter()
        .flat_map(|src| src.lines())
        .filter_map(|line| line.trim().strip_prefix('"')?.strip_suffix("\" => {").map(str::to_owned))
        .collect()
}

#[test]
fn methods_are_exactly_the_generated_rpcs() {
    let consts: BTreeSet<String> = methods::ALL.iter().map(|m| (*m).to_owned()).collect();
    assert_eq!(consts.len(), methods::ALL.len(), "duplicate method constants");
    let generated = generated_server_paths();
    assert_eq!(generated.len(), 51);
    assert_eq!(consts, generated);
    assert!(consts.contains(methods::KV_RANGE_STREAM));
    assert_eq!(methods::MAINTENANCE_HASH_KV, "/etcdserverpb.Maintenance/HashKV");
}
