//! The gRPC side of the proxy: one router per etcd service, all built on the same three steps —
//! decode the request, check the decoded message against the caller's permissions, forward the re-encoded
//! checked message to etcd and pass etcd's answer back unchanged.
//!
//! Denials are answered exactly as etcd answers them (`PermissionDenied`, `etcdserver: permission denied`;
//! in-stream for watches). Unknown services and methods get `Unimplemented`, as from etcd.

pub mod auth;
pub mod cluster;
pub mod election;
pub mod health;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::Response as HttpResponse;
use hyper::body::Incoming;
use tonic::body::Body;
use tonic::server::{Grpc, ServerStreamingService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};

use crate::authz::{Need, Needs};
use crate::codec::ServerCodec;
use crate::identity::Identity;
use crate::policy::{CapabilitySet, KeyRange, Permissions, Policy};
use crate::upstream::{CallMeta, Upstream};
use etcd_guard_proto::etcdserverpb as pb;
use etcd_guard_proto::methods;

/// An incoming HTTP/2 request.
pub type HttpRequest = http::Request<Incoming>;

/// The message etcd answers a denied request with.
pub const PERMISSION_DENIED: &str = "etcdserver: permission denied";

/// etcd's answer to a denied request.
pub fn permission_denied() -> Status {
    Status::permission_denied(PERMISSION_DENIED)
}

/// State shared by every connection.
pub struct Shared {
    pub policy: Arc<Policy>,
    pub upstream: Upstream,
    pub advertise_client_urls: Vec<String>,
    pub max_request_bytes: usize,
}

/// One client connection: who it is and what it may do, computed once at the handshake.
pub struct Conn {
    pub id: u64,
    pub peer: SocketAddr,
    pub identity: Identity,
    pub permissions: Permissions,
}

/// The per-connection service: routes each request to its handler. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    pub shared: Arc<Shared>,
    pub conn: Arc<Conn>,
}

// === impl Guard ===

impl Guard {
    pub fn new(shared: Arc<Shared>, conn: Conn) -> Guard {
        Guard { shared, conn: Arc::new(conn) }
    }

    /// Route one request by its gRPC path.
    pub async fn handle(self, req: HttpRequest) -> HttpResponse<Body> {
        let path = req.uri().path().to_string();
        let (service, method) = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some(parts) => parts,
            None => return unimplemented(format!("malformed method name: {path:?}")),
        };
        let routed = match service {
            "etcdserverpb.KV" => kv::route(&self, method, req).await,
            "etcdserverpb.Watch" => watch::route(&self, method, req).await,
            "etcdserverpb.Lease" => lease::route(&self, method, req).await,
            "etcdserverpb.Cluster" => cluster::route(&self, method, req).await,
            "etcdserverpb.Maintenance" => maintenance::route(&self, method, req).await,
            "etcdserverpb.Auth" => auth::route(&self, method, req).await,
            "v3lockpb.Lock" => lock::route(&self, method, req).await,
            "v3electionpb.Election" => election::route(&self, method, req).await,
            "grpc.health.v1.Health" => health::route(&self, method, req).await,
            _ => return unimplemented(format!("unknown service {service}")),
        };
        routed.unwrap_or_else(|| unimplemented(format!("unknown method {method} for service {service}")))
    }

    /// Check every need against the caller's permissions. Lease needs ask etcd which keys are attached.
    pub async fn enforce(&self, needs: &Needs, meta: &CallMeta) -> Result<(), Status> {
        let perms = &self.conn.permissions;
        for need in &needs.0 {
            match need {
                Need::Key(access, range) => perms.check(*access, range).map_err(|_| permission_denied())?,
                Need::Cap(cap) if perms.has(*cap) => {}
                Need::Admin if perms.caps == CapabilitySet::all() => {}
                Need::Cap(_) | Need::Admin | Need::Never(_) => return Err(permission_denied()),
                Need::LeaseKeys(..) => {}
            }
        }
        for need in &needs.0 {
            if let Need::LeaseKeys(access, lease) = need {
                for key in self.lease_keys(*lease, meta).await? {
                    perms.check(*access, &KeyRange::point(key)).map_err(|_| permission_denied())?;
                }
            }
        }
        Ok(())
    }

    /// The keys attached to a lease right now, asked of etcd with the proxy's identity.
    async fn lease_keys(&self, lease: i64, meta: &CallMeta) -> Result<Vec<Vec<u8>>, Status> {
        let req = pb::LeaseTimeToLiveRequest { id: lease, keys: true };
        let resp: pb::LeaseTimeToLiveResponse =
            self.shared.upstream.unary_decoded(methods::LEASE_TIME_TO_LIVE, req, meta).await?;
        Ok(resp.keys)
    }

    fn server_grpc<M: prost::Message + Default + Send + 'static>(&self) -> Grpc<ServerCodec<M>> {
        Grpc::new(ServerCodec::<M>::default())
            .max_decoding_message_size(self.shared.max_request_bytes)
            .max_encoding_message_size(usize::MAX)
    }

    /// A unary RPC: decode, check with `authorize`, forward the checked message, return etcd's bytes.
    pub async fn unary<M, F>(&self, req: HttpRequest, path: &'static str, authorize: F) -> HttpResponse<Body>
    where
        M: prost::Message + Default + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
    {
        let svc = OneShot::new(|request: Request<M>| async move {
            let meta = CallMeta::from_client(request.metadata());
            let msg = request.into_inner();
            let needs = authorize(&msg)?;
            self.enforce(&needs, &meta).await?;
            let bytes = self.shared.upstream.unary(path, msg, &meta).await?;
            Ok(Response::new(bytes))
        });
        self.server_grpc::<M>().unary(svc, req).await
    }

    /// A unary RPC answered by the proxy itself after the check (`answer` builds the response).
    pub async fn unary_answered<M, F, A, Fut>(&self, req: HttpRequest, authorize: F, answer: A) -> HttpResponse<Body>
    where
        M: prost::Message + Default + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
        A: FnOnce(M, CallMeta) -> Fut + Send,
        Fut: Future<Output = Result<Bytes, Status>> + Send,
    {
        let svc = OneShot::new(|request: Request<M>| async move {
            let meta = CallMeta::from_client(request.metadata());
            let msg = request.into_inner();
            let needs = authorize(&msg)?;
            self.enforce(&needs, &meta).await?;
            Ok(Response::new(answer(msg, meta).await?))
        });
        self.server_grpc::<M>().unary(svc, req).await
    }

    /// A server-streaming RPC: checked once, then etcd's messages are passed through.
    pub async fn server_streaming<M, F>(&self, req: HttpRequest, path: &'static str, authorize: F) -> HttpResponse<Body>
    where
        M: prost::Message + Default + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
    {
        let svc = OneShotStream::new(|request: Request<M>| async move {
            let meta = CallMeta::from_client(request.metadata());
            let msg = request.into_inner();
            let needs = authorize(&msg)?;
            self.enforce(&needs, &meta).await?;
            let stream = self.shared.upstream.server_streaming(path, msg, &meta).await?;
            let clean: CleanFn = clean_item;
            Ok(Response::new(futures_util::StreamExt::map(stream, clean)))
        });
        self.server_grpc::<M>().server_streaming(svc, req).await
    }

    /// A bidirectional RPC; `run` gets the decoded inbound stream and returns the receiving end of the outbound one.
    pub async fn bidi<M, F, Fut>(&self, req: HttpRequest, run: F) -> HttpResponse<Body>
    where
        M: prost::Message + Default + Send + Sync + 'static,
        F: FnOnce(Streaming<M>, CallMeta) -> Fut + Send,
        Fut: Future<Output = Result<Outbound, Status>> + Send,
    {
        let svc = OneShotBidi::new(|request: Request<Streaming<M>>| async move {
            let meta = CallMeta::from_client(request.metadata());
            Ok(Response::new(run(request.into_inner(), meta).await?))
        });
        self.server_grpc::<M>().streaming(svc, req).await
    }
}

/// A gRPC `Unimplemented` answer, as grpc-go words it.
pub fn unimplemented(message: String) -> HttpResponse<Body> {
    Status::unimplemented(message).into_http()
}

// === one-shot service adapters ===
//
// tonic's server helpers take a service; each request is handled by exactly one call, so these adapters wrap a
// closure that runs once.

type Answer<T> = Result<Response<T>, Status>;

fn called_twice<T>() -> Ready<Answer<T>> {
    ready(Err(Status::internal("etcd-guard: handler called twice")))
}

struct OneShot<F>(Option<F>);
struct OneShotStream<F>(Option<F>);
struct OneShotBidi<F>(Option<F>);

impl<F> OneShot<F> {
    fn new(f: F) -> Self {
        OneShot(Some(f))
    }
}
impl<F> OneShotStream<F> {
    fn new(f: F) -> Self {
        OneShotStream(Some(f))
    }
}
impl<F> OneShotBidi<F> {
    fn new(f: F) -> Self {
        OneShotBidi(Some(f))
    }
}

impl<M, F, Fut> UnaryService<M> for OneShot<F>
where
    F: FnOnce(Request<M>) -> Fut,
    Fut: Future<Output = Answer<Bytes>>,
{
    type Response = Bytes;
    type Future = Either<Fut, Ready<Answer<Bytes>>>;

    fn call(&mut self, request: Request<M>) -> Self::Future {
        match self.0.take() {
            Some(f) => Either::Left(f(request)),
            None => Either::Right(called_twice()),
        }
    }
}

/// The outbound side of a bidirectional stream.
pub type Outbound = tokio_stream::wrappers::ReceiverStream<Result<Bytes, Status>>;

type CleanFn = fn(Result<Bytes, Status>) -> Result<Bytes, Status>;

fn clean_item(r: Result<Bytes, Status>) -> Result<Bytes, Status> {
    r.map_err(crate::upstream::clean)
}

impl<M, F, Fut, S> ServerStreamingService<M> for OneShotStream<F>
where
    F: FnOnce(Request<M>) -> Fut,
    Fut: Future<Output = Answer<S>>,
    S: futures_util::Stream<Item = Result<Bytes, Status>>,
{
    type Response = Bytes;
    type ResponseStream = S;
    type Future = Either<Fut, Ready<Answer<S>>>;

    fn call(&mut self, request: Request<M>) -> Self::Future {
        match self.0.take() {
            Some(f) => Either::Left(f(request)),
            None => Either::Right(called_twice()),
        }
    }
}

impl<M, F, Fut, S> StreamingService<M> for OneShotBidi<F>
where
    F: FnOnce(Request<Streaming<M>>) -> Fut,
    Fut: Future<Output = Answer<S>>,
    S: futures_util::Stream<Item = Result<Bytes, Status>>,
{
    type Response = Bytes;
    type ResponseStream = S;
    type Future = Either<Fut, Ready<Answer<S>>>;

    fn call(&mut self, request: Request<Streaming<M>>) -> Self::Future {
        match self.0.take() {
            Some(f) => Either::Left(f(request)),
            None => Either::Right(called_twice()),
        }
    }
}

// === hyper glue ===

impl hyper::service::Service<HttpRequest> for Guard {
    type Response = HttpResponse<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse<Body>, std::convert::Infallible>> + Send>>;

    fn call(&self, req: HttpRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}
