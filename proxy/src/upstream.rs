//! The connection to etcd: calls made with the proxy's own identity, carrying only allowlisted metadata.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use crate::codec::UpstreamCodec;

/// Client metadata forwarded to etcd. Everything else (notably `token`, `authorization` and `grpcgateway-*`,
/// which would change who etcd thinks is calling) is dropped.
pub const FORWARDED_METADATA: &[&str] = &["hasleader", "client-api-version"];

/// etcd's maximum response size is unbounded in practice (clientv3 accepts up to `i32::MAX`).
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// A handle to the upstream etcd cluster. Cheap to clone.
///
/// Each endpoint has its own multiplexed HTTP/2 connection (reconnected by tonic when it drops). Calls go round
/// robin over the endpoints that are healthy; an endpoint is marked unhealthy when a call to it fails at the
/// transport level, and healthy again when a periodic probe (Maintenance/Status) succeeds. With no healthy
/// endpoint, calls still go round robin over all of them, so a recovered etcd is found by the next call.
#[derive(Clone)]
pub struct Upstream {
    members: Arc<RwLock<Arc<[Arc<Member>]>>>,
    next: Arc<AtomicUsize>,
}

/// One etcd endpoint.
pub struct Member {
    pub url: String,
    channel: Channel,
    healthy: AtomicBool,
}

/// What travels with a forwarded call: the allowlisted metadata and the client's deadline.
#[derive(Debug, Clone, Default)]
pub struct CallMeta {
    metadata: MetadataMap,
    timeout: Option<Duration>,
}

// === impl Upstream ===

impl Upstream {
    /// `(url, channel)` per endpoint; all start healthy.
    pub fn new(endpoints: Vec<(String, Channel)>) -> Upstream {
        Upstream { members: Arc::new(RwLock::new(members(endpoints))), next: Arc::new(AtomicUsize::new(0)) }
    }

    /// New connections (after a reload of the upstream certificate). Calls in progress finish on the old ones.
    pub fn replace(&self, endpoints: Vec<(String, Channel)>) {
        let mut slot = self.members.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = members(endpoints);
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
            let mut grpc = tonic::client::Grpc::new(m.channel.clone());
            let mut req = Request::new(etcd_guard_proto::etcdserverpb::StatusRequest {});
            req.set_timeout(timeout);
            let ok = match tokio::time::timeout(timeout, async {
                grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
                let codec = tonic_prost::ProstCodec::<_, etcd_guard_proto::etcdserverpb::StatusResponse>::default();
                grpc.unary(req, PathAndQuery::from_static(etcd_guard_proto::methods::MAINTENANCE_STATUS), codec).await
            })
            .await
            {
                Ok(Ok(_)) => true,
                Ok(Err(_)) | Err(_) => false,
            };
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

    /// The endpoint for the next call: round robin over the healthy ones, else over all.
    fn pick(&self) -> Arc<Member> {
        let members = self.current();
        let n = members.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let healthy = (0..n).filter_map(|i| members.get((start + i) % n)).find(|m| m.healthy.load(Ordering::Relaxed));
        match healthy.or_else(|| members.get(start % n)) {
            Some(m) => m.clone(),
            // The configuration requires at least one endpoint; this is defence in depth.
            None => Arc::new(Member {
                url: String::new(),
                channel: Endpoint::from_static("https://0.0.0.0:1").connect_lazy(),
                healthy: AtomicBool::new(false),
            }),
        }
    }

    fn grpc(&self) -> (tonic::client::Grpc<Channel>, Arc<Member>) {
        let member = self.pick();
        let grpc = tonic::client::Grpc::new(member.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(usize::MAX);
        (grpc, member)
    }

    /// A unary call; the response comes back as raw bytes.
    pub async fn unary<M>(&self, path: &'static str, msg: M, meta: &CallMeta) -> Result<Bytes, Status>
    where
        M: prost::Message + Send + Sync + 'static,
    {
        let (mut grpc, member) = self.grpc();
        grpc.ready().await.map_err(|e| member.unreachable(e))?;
        let resp = grpc
            .unary(meta.request(msg), PathAndQuery::from_static(path), UpstreamCodec::<M>::default())
            .await
            .map_err(|s| member.failed(s))?;
        Ok(resp.into_inner())
    }

    /// A unary call whose response the proxy needs to read (lease lookups, MemberList).
    pub async fn unary_decoded<M, R>(&self, path: &'static str, msg: M, meta: &CallMeta) -> Result<R, Status>
    where
        M: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let (mut grpc, member) = self.grpc();
        grpc.ready().await.map_err(|e| member.unreachable(e))?;
        let codec = tonic_prost::ProstCodec::<M, R>::default();
        let resp = grpc
            .unary(meta.request(msg), PathAndQuery::from_static(path), codec)
            .await
            .map_err(|s| member.failed(s))?;
        Ok(resp.into_inner())
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
        let (mut grpc, member) = self.grpc();
        grpc.ready().await.map_err(|e| member.unreachable(e))?;
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
        let (mut grpc, member) = self.grpc();
        grpc.ready().await.map_err(|e| member.unreachable(e))?;
        let resp = grpc
            .streaming(meta.request(messages), PathAndQuery::from_static(path), UpstreamCodec::<M>::default())
            .await
            .map_err(|s| member.failed(s))?;
        Ok(resp.into_inner())
    }
}

fn members(endpoints: Vec<(String, Channel)>) -> Arc<[Arc<Member>]> {
    endpoints
        .into_iter()
        .map(|(url, channel)| Arc::new(Member { url, channel, healthy: AtomicBool::new(true) }))
        .collect()
}

// === impl Member ===

impl Member {
    fn unreachable(&self, e: tonic::transport::Error) -> Status {
        self.healthy.store(false, Ordering::Relaxed);
        Status::unavailable(format!("etcd-guard: upstream unavailable: {e}"))
    }

    /// A failed call: a transport failure (a status made locally, with an error source, rather than sent by
    /// etcd) marks the endpoint unhealthy.
    ///
    /// Whatever code the transport chose (a connection closed under a call in flight comes back as `Cancelled`,
    /// "operation was canceled"), the client is told `Unavailable`, as grpc-go tells etcd's own clients, so that
    /// they retry elsewhere.
    fn failed(&self, s: Status) -> Status {
        if std::error::Error::source(&s).is_none() || is_local_timeout(&s) {
            return clean(s);
        }
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(endpoint = %self.url, error = %s.message(), "upstream endpoint failed");
        }
        Status::unavailable(format!("etcd-guard: upstream unavailable: {}", s.message()))
    }
}

/// Pass etcd's code, message and details on, but none of its response metadata.
///
/// The client's deadline is also enforced by the upstream channel, which may notice it a moment before etcd does;
/// that is answered as etcd (grpc-go) answers an expired deadline, not as tonic's local `Cancelled`.
pub fn clean(s: Status) -> Status {
    if is_local_timeout(&s) {
        return Status::deadline_exceeded(DEADLINE_EXCEEDED);
    }
    Status::with_details(s.code(), s.message().to_string(), s.details().to_vec().into())
}

/// grpc-go's message for a call whose deadline passed.
pub const DEADLINE_EXCEEDED: &str = "context deadline exceeded";

fn is_local_timeout(s: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

// === impl CallMeta ===

impl CallMeta {
    /// Take what may travel upstream from a client's request metadata.
    pub fn from_client(md: &MetadataMap) -> CallMeta {
        let mut metadata = MetadataMap::new();
        for key in FORWARDED_METADATA {
            if let Some(v) = md.get(*key) {
                metadata.insert(*key, v.clone());
            }
        }
        let timeout = md.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        CallMeta { metadata, timeout }
    }

    /// The client's deadline, if it sent one.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        *req.metadata_mut() = self.metadata.clone();
        if let Some(t) = self.timeout {
            req.set_timeout(t);
        }
        req
    }
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
    fn only_allowlisted_metadata_travels() {
        let mut md = MetadataMap::new();
        md.insert("token", "secret".parse().unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("")));
        md.insert("authorization", tonic::metadata::MetadataValue::from_static("Bearer x"));
        md.insert("grpcgateway-accept", tonic::metadata::MetadataValue::from_static("1"));
        md.insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
        md.insert("client-api-version", tonic::metadata::MetadataValue::from_static("3.4"));
        let meta = CallMeta::from_client(&md);
        let keys: Vec<String> = meta
            .metadata
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_string(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str().to_string(),
            })
            .collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&"hasleader".to_string()) && keys.contains(&"client-api-version".to_string()));
    }
}
