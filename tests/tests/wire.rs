//! Requests whose encoding differs from their canonical form are checked and forwarded as the proxy decoded
//! them: never the client's original bytes.
//!
//! etcd ≤ 3.6 reads a *present but empty* `range_end` as "every key ≥ key" while its authorization sees a
//! single key; a proxy forwarding the original bytes would leak the whole keyspace above the key.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use etcd_guard_proto::etcdserverpb::RangeResponse;
use etcd_guard_tests::{ClientCert, Harness, TestResult};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// Sends hand-made bytes, decodes etcd's answer.
struct RawRequest<R>(PhantomData<R>);
struct RawEncoder;
struct ProstDecoder<R>(PhantomData<R>);

impl<R: prost::Message + Default + Send + 'static> Codec for RawRequest<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<R>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<R> {
        ProstDecoder(PhantomData)
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl<R: prost::Message + Default> Decoder for ProstDecoder<R> {
    type Item = R;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        R::decode(bytes).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

async fn channel(h: &Harness, who: &ClientCert) -> TestResult<Channel> {
    channel_to(h, &h.proxy_url(), who).await
}

async fn channel_to(h: &Harness, url: &str, who: &ClientCert) -> TestResult<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(h.pki.ca_file())?))
        .identity(Identity::from_pem(std::fs::read(&who.cert)?, std::fs::read(&who.key)?))
        .domain_name("localhost");
    Ok(Endpoint::from_shared(url.to_string())?.tls_config(tls)?.connect().await?)
}

async fn raw_range(ch: &Channel, bytes: &[u8]) -> Result<RangeResponse, Status> {
    raw_unary(ch, "/etcdserverpb.KV/Range", bytes).await
}

async fn raw_unary<R: prost::Message + Default + Send + 'static>(
    ch: &Channel,
    path: &'static str,
    bytes: &[u8],
) -> Result<R, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    let resp =
        grpc.unary(tonic::Request::new(Bytes::copy_from_slice(bytes)), path, RawRequest::<R>(PhantomData)).await?;
    Ok(resp.into_inner())
}

/// Field 1 (key) and field 2 (range_end) of a RangeRequest, length-delimited.
fn field(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![tag, value.len() as u8];
    v.extend_from_slice(value);
    v
}

fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn non_canonical_encodings_are_forwarded_as_decoded() -> TestResult {
    let h = Harness::start().await?;
    for k in ["cilium/a", "cilium/b", "secret", "zzz"] {
        assert!(h.ctl_direct(&["put", k, "v"])?.status.success());
    }
    let ch = channel(&h, &h.cilium()?).await?;

    // A present but empty range_end: the proxy reads "one key", and etcd must see exactly that.
    let mut req = field(0x0a, b"cilium/a");
    req.extend(field(0x12, b""));
    assert_eq!(keys(&raw_range(&ch, &req).await?), vec!["cilium/a"], "present-but-empty range_end leaked keys");

    // An unknown field is dropped, not forwarded.
    let mut req = field(0x0a, b"cilium/b");
    req.extend([0xf8, 0x06, 0x01]); // field 111, varint 1
    assert_eq!(keys(&raw_range(&ch, &req).await?), vec!["cilium/b"]);

    // A duplicated key field: protobuf's last one wins, for the check and for etcd alike.
    let mut req = field(0x0a, b"secret");
    req.extend(field(0x0a, b"cilium/a"));
    assert_eq!(keys(&raw_range(&ch, &req).await?), vec!["cilium/a"]);
    let mut req = field(0x0a, b"cilium/a");
    req.extend(field(0x0a, b"secret"));
    let denied = raw_range(&ch, &req).await.err().map(|s| (s.code(), s.message().to_string()));
    assert_eq!(denied, Some((Code::PermissionDenied, "etcdserver: permission denied".to_string())));

    // A request that does not parse is refused, not forwarded, and recorded.
    let garbage = raw_range(&ch, &[0x0a, 0x7f, 0x01]).await.err().map(|s| s.code());
    assert_eq!(garbage, Some(Code::Internal));
    let record = audited(h, |r| r["code"] == "Internal").await?;
    assert_eq!((&record["rpc"], &record["decision"]), (&"KV/Range".into(), &"deny".into()), "{record}");
    assert!(record["reason"].as_str().is_some_and(|r| r.contains("unmarshal")), "{record}");
    Ok(())
}

/// A Txn op whose `request_put` is sent twice: etcd's decoder keeps the second one whole (its key, its empty
/// value), and so must what the proxy forwards. protobuf's merge (prost's default) sent etcd the second's key with
/// the first's value, a meaning the client's bytes do not have for etcd.
#[tokio::test(flavor = "multi_thread")]
async fn a_oneof_message_sent_twice_means_what_it_means_to_etcd() -> TestResult {
    use etcd_guard_proto::etcdserverpb::TxnResponse;

    let h = Harness::start().await?;
    let first = [field(0x0a, b"cilium/one"), field(0x12, b"first-value")].concat();
    let op = [field(0x12, &first), field(0x12, &field(0x0a, b"cilium/two"))].concat();
    let txn = field(0x12, &op); // success: [op]
    let direct = channel_to(&h, &h.etcd.client_url, &h.pki.upstream_client()).await?;
    let through = channel(&h, &h.cilium()?).await?;
    let mut seen = Vec::new();
    for ch in [&direct, &through] {
        let answer: TxnResponse = raw_unary(ch, "/etcdserverpb.KV/Txn", &txn).await?;
        assert!(answer.succeeded);
        let got = h.ctl_direct(&["get", "--prefix", "cilium/", "-w", "json"])?;
        let kvs: serde_json::Value = serde_json::from_slice(&got.stdout)?;
        let kvs: Vec<(String, String)> = kvs["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|kv| (kv["key"].as_str().unwrap_or("?").to_string(), kv["value"].as_str().unwrap_or("").to_string()))
            .collect();
        seen.push(kvs);
        assert!(h.ctl_direct(&["del", "--prefix", "cilium/"])?.status.success());
    }
    // etcdctl's JSON has keys and values in base64: "cilium/two" and "" (etcd stored no value).
    assert_eq!(seen[0], vec![("Y2lsaXVtL3R3bw==".to_string(), String::new())], "etcd directly");
    assert_eq!(seen[1], seen[0], "through the proxy");
    Ok(())
}

/// The audit records of `h` (the proxy stopped first, so that all are written); the first that `pick` picks.
async fn audited(mut h: Harness, pick: impl Fn(&serde_json::Value) -> bool) -> TestResult<serde_json::Value> {
    h.stop_proxy().await;
    let log = std::fs::read_to_string(h.audit_dir().join("audit.log"))?;
    let records: Vec<serde_json::Value> = log.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    Ok(records.into_iter().find(|r| pick(r)).ok_or("no such record")?)
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_methods_are_unimplemented() -> TestResult {
    let h = Harness::start().await?;
    let ch = channel(&h, &h.admin()?).await?;
    for path in [
        "/etcdserverpb.KV/Frobnicate",
        "/etcdserverpb.Nope/Range",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ] {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        grpc.ready().await?;
        let p = http::uri::PathAndQuery::from_maybe_shared(path)?;
        let r = grpc.unary(tonic::Request::new(Bytes::new()), p, RawRequest::<RangeResponse>(PhantomData)).await;
        assert_eq!(r.err().map(|s| s.code()), Some(Code::Unimplemented), "{path}");
    }
    // Each is recorded, denied, with its path.
    let record = audited(h, |r| r["ops"][0]["path"] == "/etcdserverpb.Nope/Range").await?;
    assert_eq!((&record["rpc"], &record["code"]), (&"Unknown".into(), &"Unimplemented".into()), "{record}");
    assert_eq!(record["ops"][0]["op"], "unknown_method");
    Ok(())
}

/// A stream of messages in a compression etcd does not know is refused as etcd refuses it, and recorded.
#[tokio::test(flavor = "multi_thread")]
async fn compressed_streams_are_refused_and_recorded() -> TestResult {
    let h = Harness::start().await?;
    let ch = channel(&h, &h.admin()?).await?;
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await?;
    let messages = futures_util::stream::iter([Bytes::new()]);
    let mut request = tonic::Request::new(messages);
    request.metadata_mut().insert("grpc-encoding", "gzip".parse()?);
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    let answered = grpc.streaming(request, path, RawRequest::<RangeResponse>(PhantomData)).await;
    let status = answered.err().ok_or("the stream was opened")?;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("gzip"), "{status:?}");
    let record = audited(h, |r| r["rpc"] == "Watch/Watch").await?;
    assert_eq!((&record["decision"], &record["code"]), (&"deny".into(), &"Unimplemented".into()), "{record}");
    Ok(())
}

/// Metadata etcd's clients never send is not forwarded: etcd 3.4 panics on a `client-api-version` that is not
/// UTF-8 (it becomes a metric label, etcd issue 13553), so one such header through the proxy stopped etcd for
/// every client. The call is served without it, and etcd keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_etcd_could_choke_on_is_not_forwarded() -> TestResult {
    use etcd_guard_proto::etcdserverpb::RangeRequest;
    use http_body_util::BodyExt;
    use tonic::codegen::Service;

    let h = Harness::start().await?;
    let admin = h.admin()?;
    let mut conn = etcd_guard_tests::bare_h2(&h, &admin, None).await?;
    for (name, value) in
        [("client-api-version", &b"\xff\xfe"[..]), ("client-api-version", b"3.5\xc3"), ("hasleader", b"\xff")]
    {
        let msg = RangeRequest { key: b"app/x".to_vec(), ..Default::default() };
        let body = tonic::body::Body::new(http_body_util::Full::new(etcd_guard_tests::grpc_message(&msg)));
        let mut request = etcd_guard_tests::grpc_request(etcd_guard_proto::methods::KV_RANGE, body)?;
        request.headers_mut().insert(name, http::HeaderValue::from_bytes(value)?);
        std::future::poll_fn(|cx| conn.poll_ready(cx)).await?;
        let response = conn.call(request).await?;
        let status = match response.headers().get("grpc-status").cloned() {
            Some(status) => Some(status),
            None => response.into_body().collect().await?.trailers().and_then(|t| t.get("grpc-status").cloned()),
        };
        assert_eq!(status.as_ref().map(http::HeaderValue::as_bytes), Some(&b"0"[..]), "{name}: {value:?}");
    }
    // etcd is still there.
    let mut c = h.client(&admin).await?;
    c.put("app/after", "1", None).await?;
    assert_eq!(h.client_direct().await?.get("app/after", None).await?.count(), 1);
    Ok(())
}

/// Enum values outside etcd's crash etcd 3.4 and 3.5: a Range whose sort target is not one of theirs (they sort
/// with a nil comparator), an Alarm whose action is not (a nil answer). The proxy refuses every value it does not
/// know, in Range (also inside Txn), compares, watch filters, Alarm, Downgrade and permissions, as any field it
/// does not understand; here the admin (every capability) sends them, and etcd is still there after each.
#[tokio::test(flavor = "multi_thread")]
async fn enum_values_etcd_does_not_know_are_refused_not_forwarded() -> TestResult {
    use etcd_guard_proto::etcdserverpb::kv_client::KvClient;
    use etcd_guard_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use etcd_guard_proto::etcdserverpb::{AlarmRequest, RangeRequest, RequestOp, TxnRequest, request_op};

    let h = Harness::start().await?;
    let admin = h.admin()?;
    let mut kv =
        KvClient::with_origin(etcd_guard_tests::bare_h2(&h, &admin, None).await?, "https://localhost".parse()?);
    let mut maintenance = MaintenanceClient::with_origin(
        etcd_guard_tests::bare_h2(&h, &admin, None).await?,
        "https://localhost".parse()?,
    );
    let range = |sort_order, sort_target| RangeRequest {
        key: b"app/x".to_vec(),
        sort_order,
        sort_target,
        ..Default::default()
    };
    let mut direct = h.client_direct().await?;
    for (what, r) in
        [("sort target 9", range(0, 9)), ("sort order 9 with target 9", range(9, 9)), ("sort order 7", range(7, 0))]
    {
        let denied = kv.range(r.clone()).await.err().map(|s| s.code());
        assert_eq!(denied, Some(tonic::Code::PermissionDenied), "{what}");
        let op = RequestOp { request: Some(request_op::Request::RequestRange(r)) };
        let denied = kv.txn(TxnRequest { success: vec![op], ..Default::default() }).await.err().map(|s| s.code());
        assert_eq!(denied, Some(tonic::Code::PermissionDenied), "{what} in a txn");
        direct.get("app/x", None).await.map_err(|e| format!("etcd is gone after {what}: {e}"))?;
    }
    let denied = maintenance.alarm(AlarmRequest { action: 7, member_id: 0, alarm: 0 }).await.err().map(|s| s.code());
    assert_eq!(denied, Some(tonic::Code::PermissionDenied), "alarm action 7");
    direct.get("app/x", None).await.map_err(|e| format!("etcd is gone after alarm action 7: {e}"))?;
    // The values etcd knows still go through: a Range sorted by value, descending.
    kv.range(range(2, 4)).await?;
    Ok(())
}

/// Requests that are not gRPC calls as etcd's clients make them are refused before their message is read, and
/// recorded: another `:method` (a HEAD got a body), a `content-type` other than protobuf gRPC (a JSON body would
/// have been read as protobuf), a path with a query, a `grpc-timeout` gRPC does not define (it was ignored: the
/// call ran without a deadline). etcd's own clients' requests (`application/grpc`, `+proto`) are served.
#[tokio::test(flavor = "multi_thread")]
async fn requests_that_are_not_grpc_calls_are_refused_and_recorded() -> TestResult {
    use etcd_guard_proto::etcdserverpb::RangeRequest;
    use http_body_util::BodyExt;
    use tonic::codegen::Service;

    let h = Harness::start().await?;
    let mut conn = etcd_guard_tests::bare_h2(&h, &h.admin()?, None).await?;
    let msg = RangeRequest { key: b"app/x".to_vec(), ..Default::default() };
    let range = etcd_guard_proto::methods::KV_RANGE;
    /// `:method`, path, `content-type`, `grpc-timeout`, the HTTP status and grpc-status expected (grpc-go's).
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, u16, &'a str);
    let cases: [Case; 11] = [
        ("POST", range, Some("application/grpc"), None, 200, "0"),
        ("POST", range, Some("application/grpc+proto"), Some("5S"), 200, "0"),
        ("POST", range, Some("application/grpc; charset=utf-8"), None, 200, "0"),
        ("GET", range, Some("application/grpc"), None, 405, "13"),
        ("HEAD", range, Some("application/grpc"), None, 405, "13"),
        ("POST", range, None, None, 415, "3"),
        ("POST", range, Some("application/json"), None, 415, "3"),
        ("POST", range, Some("application/grpc+json"), None, 415, "3"),
        ("POST", "/etcdserverpb.KV/Range?x=1", Some("application/grpc"), None, 200, "12"),
        ("POST", range, Some("application/grpc"), Some("abc"), 400, "13"),
        ("POST", range, Some("application/grpc"), Some("-5m"), 400, "13"),
    ];
    for (method, path, content_type, timeout, http_status, expected) in cases {
        let body = tonic::body::Body::new(http_body_util::Full::new(etcd_guard_tests::grpc_message(&msg)));
        let mut request = http::Request::builder().method(method).uri(format!("https://localhost{path}"));
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        if let Some(t) = timeout {
            request = request.header("grpc-timeout", t);
        }
        let request = request.header("te", "trailers").body(body)?;
        std::future::poll_fn(|cx| conn.poll_ready(cx)).await?;
        let response = conn.call(request).await?;
        let case = format!("{method} {path} {content_type:?} {timeout:?}");
        assert_eq!(response.status().as_u16(), http_status, "{case}");
        let status = match response.headers().get("grpc-status").cloned() {
            Some(status) => Some(status),
            None => response.into_body().collect().await?.trailers().and_then(|t| t.get("grpc-status").cloned()),
        };
        assert_eq!(status.as_ref().map(http::HeaderValue::as_bytes), Some(expected.as_bytes()), "{case}");
    }
    let record =
        audited(h, |r| r["reason"].as_str().is_some_and(|r| r.contains("content-type \"application/json\""))).await?;
    assert_eq!((&record["rpc"], &record["decision"]), (&"KV/Range".into(), &"deny".into()), "{record}");
    Ok(())
}

/// A denial's trailers are etcd's byte for byte: `grpc-status: 7` and `grpc-message: etcdserver: permission
/// denied` as grpc-go sends it (spaces as they are; before, `etcdserver:%20permission%20denied`, which clients
/// decode alike but a reader of the raw answer would not recognise).
#[tokio::test(flavor = "multi_thread")]
async fn a_denial_carries_etcds_message_byte_for_byte() -> TestResult {
    use etcd_guard_proto::etcdserverpb::RangeRequest;
    use tonic::codegen::Service;

    let h = Harness::start().await?;
    let mut conn = etcd_guard_tests::bare_h2(&h, &h.nobody()?, None).await?;
    let msg = RangeRequest { key: b"app/x".to_vec(), ..Default::default() };
    let body = tonic::body::Body::new(http_body_util::Full::new(etcd_guard_tests::grpc_message(&msg)));
    let request = etcd_guard_tests::grpc_request(etcd_guard_proto::methods::KV_RANGE, body)?;
    std::future::poll_fn(|cx| conn.poll_ready(cx)).await?;
    let response = conn.call(request).await?;
    let headers = response.headers();
    assert_eq!(headers.get("grpc-status").map(http::HeaderValue::as_bytes), Some(&b"7"[..]), "{headers:?}");
    let message = headers.get("grpc-message").map(http::HeaderValue::as_bytes);
    assert_eq!(message, Some(&b"etcdserver: permission denied"[..]), "{headers:?}");
    assert_eq!(headers.get("content-type").map(http::HeaderValue::as_bytes), Some(&b"application/grpc"[..]));
    Ok(())
}
