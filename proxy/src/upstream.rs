//! The connection to etcd: calls made with the proxy's own identity, carrying only allowlisted metadata.
//!
//! Unary calls (the bulk of the traffic) are made on the HTTP/2 connection directly and their answer is read as
//! bytes; streaming calls go through tonic's client over the same connections.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, TE};
use http::uri::PathAndQuery;
use tokio::runtime::Handle;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Status, Streaming};

use crate::codec::{self, Framed, UpstreamCodec};
use crate::http2::client::{self, Channel, Connection};

/// Client metadata forwarded to etcd. Everything else (notably `token`, `authorization` and `grpcgateway-*`,
/// which would change who etcd thinks is calling) is dropped.
pub static FORWARDED_METADATA: [HeaderName; 2] =
    [HeaderName::from_static("hasleader"), HeaderName::from_static("client-api-version")];

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// etcd's maximum response size is unbounded in practice (clientv3 accepts up to `i32::MAX`).
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// A handle to the upstream etcd cluster. Cheap to clone.
///
/// Each endpoint has its own multiplexed HTTP/2 connections (made again at the next call after one drops). Calls
/// go round robin over the endpoints that are healthy; an endpoint is marked unhealthy when a call to it fails at
/// the transport level, and healthy again when a periodic probe (Maintenance/Status) succeeds. With no healthy
/// endpoint, calls still go round robin over all of them, so a recovered etcd is found by the next call.
///
/// With worker threads ([`crate::runtime`]) each worker has connections of its own, made and driven on its thread,
/// and a call made on a worker uses that worker's; calls made elsewhere (health probes) use any.
#[derive(Clone)]
pub struct Upstream {
    members: Arc<RwLock<Arc<[Arc<Member>]>>>,
    next: Arc<AtomicUsize>,
    workers: Arc<[Handle]>,
}

/// One connection to an etcd endpoint.
pub struct Member {
    pub url: String,
    connection: Arc<Connection>,
    healthy: AtomicBool,
}

/// What travels with a forwarded call: the allowlisted metadata and the client's deadline.
#[derive(Debug, Clone, Default)]
pub struct CallMeta {
    /// The client's value of each of [`FORWARDED_METADATA`], in that order.
    forwarded: [Option<HeaderValue>; 2],
    timeout: Option<Duration>,
}

// === impl Upstream ===

impl Upstream {
    /// `(url, connection)` per endpoint; all start healthy. Connections are made on the caller's runtime.
    pub fn new(endpoints: Vec<(String, Connection)>) -> Upstream {
        Upstream::for_workers(endpoints, Vec::new())
    }

    /// The same, with a copy of every connection for each worker (none: as [`Upstream::new`]).
    pub fn for_workers(endpoints: Vec<(String, Connection)>, workers: Vec<Handle>) -> Upstream {
        let workers: Arc<[Handle]> = workers.into();
        let members = Arc::new(RwLock::new(members(endpoints, &workers)));
        Upstream { members, next: Arc::new(AtomicUsize::new(0)), workers }
    }

    /// New connections (after a reload of the upstream certificate). Calls in progress finish on the old ones.
    pub fn replace(&self, endpoints: Vec<(String, Connection)>) {
        let members = members(endpoints, &self.workers);
        let mut slot = self.members.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = members;
    }

    fn current(&self) -> Arc<[Arc<Member>]> {
        self.members.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The endpoints and whether each is healthy now (any of its connections).
    pub fn health(&self) -> Vec<(String, bool)> {
        let mut health: Vec<(String, bool)> = Vec::new();
        for m in self.current().iter() {
            let healthy = m.healthy.load(Ordering::Relaxed);
            match health.iter_mut().find(|(url, _)| *url == m.url) {
                Some((_, h)) => *h |= healthy,
                None => health.push((m.url.clone(), healthy)),
            }
        }
        health
    }

    /// Whether at least one endpoint is healthy.
    pub fn any_healthy(&self) -> bool {
        self.current().iter().any(|m| m.healthy.load(Ordering::Relaxed))
    }

    /// Probe every endpoint now (Maintenance/Status with `timeout`) and record the result.
    pub async fn probe(&self, timeout: Duration) {
        let members = self.current();
        let probes = members.iter().map(|m| async move {
            let meta = CallMeta { timeout: Some(timeout), ..CallMeta::default() };
            let req = etcd_guard_proto::etcdserverpb::StatusRequest {};
            let path = etcd_guard_proto::methods::MAINTENANCE_STATUS;
            let ok = matches!(tokio::time::timeout(timeout, m.call(path, &req, &meta)).await, Ok(Ok(_)));
            let was = m.healthy.swap(ok, Ordering::Relaxed);
            if was != ok {
                if ok {
                    tracing::info!(endpoint = %m.url, "upstream endpoint is healthy");
                } else {
                    tracing::warn!(endpoint = %m.url, "upstream endpoint is unhealthy");
                }
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// The endpoint for the next call: round robin over the healthy ones, else over all; on a worker thread, over
    /// that worker's connections.
    fn pick(&self) -> Result<Arc<Member>, Status> {
        let all = self.current();
        let per_worker = all.len() / self.workers.len().max(1);
        let members = match crate::runtime::current_worker() {
            Some(w) if !self.workers.is_empty() => all.get(w * per_worker..(w + 1) * per_worker).unwrap_or(&all[..]),
            _ => &all[..],
        };
        let n = members.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let healthy = (0..n).filter_map(|i| members.get((start + i) % n)).find(|m| m.healthy.load(Ordering::Relaxed));
        match healthy.or_else(|| members.get(start % n)) {
            Some(m) => Ok(m.clone()),
            // The configuration requires at least one endpoint; this is defence in depth.
            None => Err(Status::unavailable("etcd-guard: no upstream endpoint configured")),
        }
    }

    fn grpc(&self) -> Result<(tonic::client::Grpc<Channel>, Arc<Member>), Status> {
        let member = self.pick()?;
        let grpc = tonic::client::Grpc::with_origin(member.connection.channel(), member.connection.origin())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(usize::MAX);
        Ok((grpc, member))
    }

    /// A unary call; the response comes back as etcd sent it (one checked gRPC frame).
    pub async fn unary<M>(&self, path: &'static str, msg: M, meta: &CallMeta) -> Result<Framed, Status>
    where
        M: prost::Message,
    {
        let member = self.pick()?;
        let call = member.call(path, &msg, meta);
        match meta.timeout {
            None => call.await,
            // etcd enforces the deadline too (it gets `grpc-timeout`); this answers in time if etcd cannot.
            Some(t) => tokio::time::timeout(t, call)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded(DEADLINE_EXCEEDED))),
        }
    }

    /// A unary call whose response the proxy needs to read (lease lookups, MemberList).
    pub async fn unary_decoded<M, R>(&self, path: &'static str, msg: M, meta: &CallMeta) -> Result<R, Status>
    where
        M: prost::Message,
        R: prost::Message + Default,
    {
        let framed = self.unary(path, msg, meta).await?;
        R::decode(framed.message())
            .map_err(|e| Status::internal(format!("etcd-guard: cannot decode etcd's answer: {e}")))
    }

    /// A server-streaming call; messages come back as raw bytes.
    pub async fn server_streaming<M>(
        &self,
        path: &'static str,
        msg: M,
        meta: &CallMeta,
    ) -> Result<Streaming<Bytes>, Status>
    where
        M: prost::Message + Send + Sync + 'static,
    {
        let (mut grpc, member) = self.grpc()?;
        let resp = grpc
            .server_streaming(meta.request(msg), PathAndQuery::from_static(path), UpstreamCodec::<M>::default())
            .await
            .map_err(|s| member.failed(s))?;
        Ok(resp.into_inner())
    }

    /// A bidirectional call fed by `messages` (already checked).
    pub async fn streaming<M, S>(
        &self,
        path: &'static str,
        messages: S,
        meta: &CallMeta,
    ) -> Result<Streaming<Bytes>, Status>
    where
        M: prost::Message + Send + Sync + 'static,
        S: futures_util::Stream<Item = M> + Send + 'static,
    {
        let (mut grpc, member) = self.grpc()?;
        let resp = grpc
            .streaming(meta.request(messages), PathAndQuery::from_static(path), UpstreamCodec::<M>::default())
            .await
            .map_err(|s| member.failed(s))?;
        Ok(resp.into_inner())
    }
}

/// The members, worker by worker (each worker's copies of all connections together), or as given without workers.
fn members(endpoints: Vec<(String, Connection)>, workers: &[Handle]) -> Arc<[Arc<Member>]> {
    let member = |url: String, connection: Connection| {
        Arc::new(Member { url, connection: Arc::new(connection), healthy: AtomicBool::new(true) })
    };
    if workers.is_empty() {
        return endpoints.into_iter().map(|(url, c)| member(url, c)).collect();
    }
    workers
        .iter()
        .flat_map(|worker| endpoints.iter().map(|(url, c)| member(url.clone(), c.on(worker.clone()))))
        .collect()
}

// === impl Member ===

impl Member {
    /// One unary call on this endpoint's connection: the checked message goes out in one gRPC frame, etcd's answer
    /// comes back as the message's bytes, or as etcd's status.
    async fn call<M: prost::Message>(&self, path: &'static str, msg: &M, meta: &CallMeta) -> Result<Framed, Status> {
        let mut head = http::Request::new(());
        *head.method_mut() = http::Method::POST;
        *head.uri_mut() = self.connection.uri(path);
        *head.headers_mut() = meta.headers();
        let response = self.connection.send(head, codec::frame(msg)).await.map_err(|e| self.unreachable(&e))?;
        let (head, mut body) = response.into_parts();
        // A "trailers-only" answer: etcd's status is in the headers.
        if let Some(status) = codec::status_from_trailers(&head.headers) {
            return Err(status);
        }
        if head.status != http::StatusCode::OK {
            return Err(self.broken(format!("etcd answered HTTP status {}", head.status)));
        }
        let mut data = codec::Gather::default();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| self.unreachable(&client::Error::H2(e)))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.push(chunk);
        }
        let trailers = body.trailers().await.map_err(|e| self.unreachable(&client::Error::H2(e)))?;
        match trailers.as_ref().and_then(codec::status_from_trailers) {
            Some(status) => return Err(status),
            None if trailers.as_ref().is_some_and(|t| t.contains_key(&codec::GRPC_STATUS)) => {}
            None => return Err(self.broken("etcd's answer ended without a gRPC status".into())),
        }
        Framed::parse(data.finish()).map_err(|e| self.broken(e))
    }

    /// The connection could not be made or broke under the call: the client is told `Unavailable`.
    fn unreachable(&self, e: &client::Error) -> Status {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(endpoint = %self.url, error = %e, "upstream endpoint failed");
        }
        Status::unavailable(format!("etcd-guard: upstream unavailable: {e}"))
    }

    /// etcd's answer could not be understood.
    fn broken(&self, message: String) -> Status {
        Status::new(Code::Internal, format!("etcd-guard: {message}"))
    }

    /// A failed streaming call: a transport failure (a status made locally, with an error source, rather than sent
    /// by etcd) marks the endpoint unhealthy.
    ///
    /// Whatever code the transport chose (a connection closed under a call in flight comes back as `Cancelled`,
    /// "operation was canceled"), the client is told `Unavailable`, as grpc-go tells etcd's own clients, so that
    /// they retry elsewhere.
    fn failed(&self, s: Status) -> Status {
        if std::error::Error::source(&s).is_none() {
            return clean(s);
        }
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(endpoint = %self.url, error = %s.message(), "upstream endpoint failed");
        }
        Status::unavailable(format!("etcd-guard: upstream unavailable: {}", s.message()))
    }
}

/// Pass etcd's code, message and details on, but none of its response metadata.
pub fn clean(s: Status) -> Status {
    Status::with_details(s.code(), s.message().to_string(), s.details().to_vec().into())
}

/// grpc-go's message for a call whose deadline passed.
pub const DEADLINE_EXCEEDED: &str = "context deadline exceeded";

// === impl CallMeta ===

impl CallMeta {
    /// Take what may travel upstream from a client's request metadata.
    pub fn from_client(md: &MetadataMap) -> CallMeta {
        CallMeta::from_headers(md.as_ref())
    }

    /// The same from a request's HTTP headers.
    pub fn from_headers(headers: &HeaderMap) -> CallMeta {
        let forwarded = [headers.get(&FORWARDED_METADATA[0]).cloned(), headers.get(&FORWARDED_METADATA[1]).cloned()];
        let timeout = headers.get(&GRPC_TIMEOUT).and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        CallMeta { forwarded, timeout }
    }

    /// The allowlisted metadata the client sent.
    fn metadata(&self) -> HeaderMap {
        let mut metadata = HeaderMap::with_capacity(FORWARDED_METADATA.len());
        self.insert_forwarded(&mut metadata);
        metadata
    }

    fn insert_forwarded(&self, headers: &mut HeaderMap) {
        for (name, value) in FORWARDED_METADATA.iter().zip(&self.forwarded) {
            if let Some(v) = value {
                headers.insert(name.clone(), v.clone());
            }
        }
    }

    /// The headers of a unary call towards etcd: gRPC's own, the allowlisted metadata and the deadline.
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(3 + FORWARDED_METADATA.len());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        self.insert_forwarded(&mut headers);
        if let Some(v) = self.timeout.and_then(grpc_timeout) {
            headers.insert(GRPC_TIMEOUT.clone(), v);
        }
        headers
    }

    /// The client's deadline, if it sent one.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        *req.metadata_mut() = MetadataMap::from_headers(self.metadata());
        if let Some(t) = self.timeout {
            req.set_timeout(t);
        }
        req
    }
}

/// A `grpc-timeout` header value: at most 8 digits, in the finest unit that fits.
fn grpc_timeout(t: Duration) -> Option<HeaderValue> {
    const MAX: u128 = 99_999_999;
    let value = [(t.as_nanos(), 'n'), (t.as_micros(), 'u'), (t.as_millis(), 'm'), (u128::from(t.as_secs()), 'S')]
        .into_iter()
        .chain([(u128::from(t.as_secs() / 60), 'M'), (u128::from(t.as_secs() / 3600), 'H')])
        .find(|(n, _)| *n <= MAX)
        .map(|(n, unit)| format!("{n}{unit}"))?;
    HeaderValue::from_str(&value).ok()
}

/// Parse a `grpc-timeout` header value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }

    #[test]
    fn grpc_timeout_round_trips() {
        for t in [Duration::from_millis(300), Duration::from_secs(5), Duration::from_secs(86_400 * 30), Duration::ZERO]
        {
            let v = grpc_timeout(t).map(|v| v.to_str().map(str::to_string));
            let back = v.and_then(Result::ok).and_then(|s| parse_grpc_timeout(&s));
            assert_eq!(back, Some(t), "{t:?}");
        }
    }

    #[test]
    fn only_allowlisted_metadata_travels() {
        let mut md = MetadataMap::new();
        md.insert("token", "secret".parse().unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("")));
        md.insert("authorization", tonic::metadata::MetadataValue::from_static("Bearer x"));
        md.insert("grpcgateway-accept", tonic::metadata::MetadataValue::from_static("1"));
        md.insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
        md.insert("client-api-version", tonic::metadata::MetadataValue::from_static("3.4"));
        let meta = CallMeta::from_client(&md);
        let keys: Vec<String> = meta.metadata().keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(keys, ["hasleader", "client-api-version"]);
        let sent = meta.headers();
        assert_eq!(sent.len(), 4, "{sent:?}");
        assert_eq!(sent.get("hasleader").map(HeaderValue::as_bytes), Some(&b"true"[..]));
        assert_eq!(sent.get("client-api-version").map(HeaderValue::as_bytes), Some(&b"3.4"[..]));
        assert!(sent.get("token").is_none() && sent.get("authorization").is_none());
    }
}
