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
pub mod lease_keys;
pub mod lock;
pub mod maintenance;
pub mod watch;
pub mod watch_hub;

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Code, Status, Streaming};

use crate::audit::record::code_name;
use crate::audit::{AuditLog, Decision, Describe, Event, Ops, Record, Subject};
use crate::authz::{Need, Needs};
use crate::codec::{self, FrameStream, Framed, MessageDecoder, StreamBody};
use crate::http2::{RecvBody, Reply, UnreadLimit};
use crate::identity::Identity;
use crate::limits::{Limiter, Permit, Usage};
use crate::metrics::{LimitLabels, Metrics, RequestHandles, RequestLabels, RpcLabels};
use crate::policy::{Access, CapabilitySet, KeyRange, Mode, Permissions, Policy};
use crate::upstream::{CallMeta, Frames, StreamConnections, Upstream};
use etcd_guard_proto::etcdserverpb as pb;
use etcd_guard_proto::methods;

/// An incoming HTTP/2 request.
pub type HttpRequest = http::Request<RecvBody>;

/// The answer to one request: a unary answer whole, or a streamed body.
pub type Answer = Reply<StreamBody>;

/// What a bidirectional stream answers with: whole gRPC frames (etcd's as they came, or the proxy's own), or the
/// status that ends the stream.
pub type Outbound = FrameStream;

/// The message etcd answers a denied request with.
pub const PERMISSION_DENIED: &str = "etcdserver: permission denied";

/// What open streams get when the proxy shuts down (clients retry elsewhere).
pub fn shutting_down() -> Status {
    Status::unavailable("etcd-guard: shutting down")
}

/// The streaming methods. Each such call runs in a task of its own (a connection may carry thousands of watch
/// streams, whose events should not all be delivered by one task); unary calls run in their connection's task.
pub const STREAMING: &[&str] = &[
    methods::KV_RANGE_STREAM,
    methods::WATCH_WATCH,
    methods::LEASE_KEEP_ALIVE,
    methods::MAINTENANCE_SNAPSHOT,
    methods::ELECTION_OBSERVE,
    methods::HEALTH_WATCH,
];

/// Whether `path` names a streaming method.
pub fn is_streaming(path: &str) -> bool {
    STREAMING.contains(&path)
}

/// Whether `path` names a method whose request is a stream of messages (the others send one message).
pub fn is_message_stream(path: &str) -> bool {
    path == methods::WATCH_WATCH || path == methods::LEASE_KEEP_ALIVE
}

/// How many policy reloads in a row a decision waits out (each landing while etcd was asked for a lease's keys)
/// before the call is answered `Unavailable`.
const RELOADS_WAITED: usize = 3;

/// Distinct leases whose keys one request may have etcd asked for (each a request of its own, one after another);
/// a request naming more is refused (`ResourceExhausted`). Only a transaction can name more than one, and etcd takes
/// at most 128 operations per branch by default (`--max-txn-ops`): this leaves room for every such transaction but
/// deeply nested ones.
const MAX_LEASE_LOOKUPS: usize = 1024;

/// How [`Guard::unary_inspected`] checks etcd's answer: whether to, for a request; and what in an answer the caller
/// may not see, if anything.
pub type Inspection<M> = (fn(&M) -> bool, fn(&Framed, &View) -> Option<String>);

/// The RPC a record names for a request of a method the proxy does not know (its op holds the path).
pub const UNKNOWN_RPC: &str = "Unknown";

/// A request refused before its message was read: described by its method alone, or, for a method the proxy
/// does not know, by its path (cut to [`RECORDED_TEXT_CHARS`]).
struct Unread<'a>(Option<&'a str>);

impl Describe for Unread<'_> {
    fn describe(&self, ops: &mut Ops) {
        if let Some(path) = self.0 {
            ops.op("unknown_method", |op| op.text("path", first_chars(path, RECORDED_TEXT_CHARS)));
        }
    }
}

/// etcd's answer to a denied request.
pub fn permission_denied() -> Status {
    Status::permission_denied(PERMISSION_DENIED)
}

/// State shared by every connection.
pub struct Shared {
    /// The policy in force; replaced by a reload.
    policy: RwLock<Arc<Policy>>,
    /// Bumped by every policy reload; connections recompute their permissions when it moves.
    generation: AtomicU64,
    /// Tells open streams that the policy changed (watches re-check what they watch).
    reloaded: tokio::sync::watch::Sender<u64>,
    /// Turns true when the proxy shuts down: open streams end with `Unavailable`.
    shutting_down: tokio::sync::watch::Sender<bool>,
    pub upstream: Upstream,
    pub advertise_client_urls: Vec<String>,
    pub max_request_bytes: usize,
    /// How long etcd's answers on a stream wait for a client that reads none of them before the proxy resets the
    /// stream, and etcd's call with it (`limits.unread_stream_timeout_ms`; `None`: as long as it takes).
    unread_stream_timeout: Option<std::time::Duration>,
    /// Operations one transaction may run (`limits.max_txn_ops`, etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub limiter: Limiter,
    /// Lookups of a lease's keys, shared by the requests that wait for them.
    lease_keys: lease_keys::LeaseKeys,
    /// Shared upstream watches (`watch.coalesce`), or `None`: every watch has its own.
    pub watch_hub: Option<watch_hub::Hub>,
}

/// One client connection: who it is, and what it may do under the policy in force.
pub struct Conn {
    pub id: u64,
    pub peer: SocketAddr,
    pub identity: Identity,
    /// What this identity uses now (shared by its connections).
    pub usage: Arc<Usage>,
    view: Mutex<Arc<View>>,
    /// This connection's handles on the request metrics.
    metrics: RequestHandles,
    /// Why the proxy closed the connection, when it did (a reloaded CRL or CA bundle no longer trusts the
    /// certificate): the end records of its open streams say so.
    closed_because: OnceLock<String>,
    /// Its own connections to etcd for its streams.
    pub streams: StreamConnections,
}

/// What a connection may do under one policy generation, computed once per generation.
pub struct View {
    pub generation: u64,
    pub permissions: Permissions,
    /// The identity as audit records show it (with its roles).
    pub subject: Arc<Subject>,
    /// `role cilium` / `roles a, b` / `no role`, for allow reasons.
    pub roles_label: String,
}

/// The decision on one request, with its reason for the audit record.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub decision: Decision,
    pub reason: String,
}

/// When a request arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub time: SystemTime,
    pub instant: Instant,
}

/// The per-connection service: routes each request to its handler. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    pub shared: Arc<Shared>,
    pub conn: Arc<Conn>,
}

// === impl Conn ===

impl Conn {
    /// A connection, with its permissions under the policy in force now.
    pub fn new(id: u64, peer: SocketAddr, identity: Identity, shared: &Shared) -> Conn {
        let (generation, policy) = shared.policy();
        let view = View::new(id, peer, &identity, generation, &policy);
        let usage = shared.limiter.usage(&identity.fingerprint_sha256);
        let view = Mutex::new(Arc::new(view));
        Conn {
            id,
            peer,
            identity,
            usage,
            view,
            metrics: RequestHandles::default(),
            closed_because: OnceLock::new(),
            streams: StreamConnections::default(),
        }
    }

    /// The proxy closes this connection, for `reason`.
    pub fn close_because(&self, reason: String) {
        let _ = self.closed_because.set(reason);
    }

    /// The identity as limit messages name it.
    pub fn who(&self) -> &str {
        self.identity.display_name()
    }

    /// The view for the policy in force (recomputed once after a reload).
    pub fn view(&self, shared: &Shared) -> Arc<View> {
        let current = shared.generation.load(Ordering::Acquire);
        let mut view = self.view.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if view.generation != current {
            let (generation, policy) = shared.policy();
            *view = Arc::new(View::new(self.id, self.peer, &self.identity, generation, &policy));
        }
        view.clone()
    }
}

// === impl View ===

impl View {
    fn new(id: u64, peer: SocketAddr, identity: &Identity, generation: u64, policy: &Policy) -> View {
        let permissions = policy.permissions_for(identity);
        let subject = Arc::new(Subject::new(id, peer, identity, &permissions.roles));
        let roles_label = match permissions.roles.as_slice() {
            [] => "no role".to_string(),
            [one] => format!("role {one}"),
            many => format!("roles {}", many.join(", ")),
        };
        View { generation, permissions, subject, roles_label }
    }
}

// === impl Shared ===

impl Shared {
    pub fn new(
        policy: Policy,
        upstream: Upstream,
        advertise_client_urls: Vec<String>,
        max_request_bytes: usize,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        limiter: Limiter,
    ) -> Shared {
        Shared {
            policy: RwLock::new(Arc::new(policy)),
            generation: AtomicU64::new(0),
            reloaded: tokio::sync::watch::Sender::new(0),
            shutting_down: tokio::sync::watch::Sender::new(false),
            upstream,
            advertise_client_urls,
            max_request_bytes,
            unread_stream_timeout: None,
            max_txn_ops: crate::authz::MAX_TXN_OPS,
            audit,
            metrics,
            limiter,
            lease_keys: lease_keys::LeaseKeys::default(),
            watch_hub: None,
        }
    }

    /// The same, with shared upstream watches (`watch.coalesce`) if `coalesce`.
    pub fn coalescing_watches(mut self, coalesce: bool) -> Shared {
        self.watch_hub = coalesce.then(|| watch_hub::Hub::new(self.metrics.clone()));
        self
    }

    /// The same, resetting streams whose client reads none of etcd's answers for `timeout` (`None`: never).
    pub fn resetting_unread_streams_after(mut self, timeout: Option<std::time::Duration>) -> Shared {
        self.unread_stream_timeout = timeout;
        self
    }

    /// The same, with transactions of up to `max` operations (etcd's `--max-txn-ops`).
    pub fn running_txns_of(mut self, max: usize) -> Shared {
        self.max_txn_ops = max;
        self
    }

    /// Queue the summary records of denials counted `older_than` ago or longer (`audit.denial_records`).
    pub fn write_summaries(&self, older_than: std::time::Duration) {
        for record in self.limiter.summaries_due(older_than) {
            self.audit.submit_now(record);
        }
    }

    /// The generation of the policy in force (one more with every reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The policy in force and its generation.
    pub fn policy(&self) -> (u64, Arc<Policy>) {
        let policy = self.policy.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        (self.generation.load(Ordering::Acquire), policy.clone())
    }

    /// Put a new policy in force: new requests are decided by it at once, open watches re-check.
    pub fn replace_policy(&self, policy: Policy) {
        let mut slot = self.policy.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Arc::new(policy);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        drop(slot);
        self.reloaded.send_replace(generation);
    }

    /// End open streams: the proxy is shutting down.
    pub fn begin_shutdown(&self) {
        self.shutting_down.send_replace(true);
    }

    /// Resolves when the proxy begins to shut down.
    pub async fn shutdown_begun(&self) {
        let mut rx = self.shutting_down.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }

    /// Notified after every policy reload.
    pub fn subscribe_reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloaded.subscribe()
    }
}

// === impl Arrival ===

impl Arrival {
    pub fn now() -> Arrival {
        Arrival { time: SystemTime::now(), instant: Instant::now() }
    }

    fn micros(&self) -> u64 {
        u64::try_from(self.instant.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

// === impl Guard ===

impl Guard {
    pub fn new(shared: Arc<Shared>, conn: Conn) -> Guard {
        Guard { shared, conn: Arc::new(conn) }
    }

    /// Route one request by its gRPC path.
    pub async fn handle(self, req: HttpRequest) -> Answer {
        // A cheap copy (shared bytes) that outlives the request, which the route takes.
        let uri = req.uri().clone();
        let path = uri.path();
        let (service, method) = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
            Some(parts) => parts,
            None => return self.unrouted(path, format!("malformed method name: {path:?}")).await,
        };
        if let Err((http_status, status)) = codec::check_grpc_request(req.method(), &uri, req.headers()) {
            match methods::ALL.iter().find(|m| **m == path) {
                Some(known) => self.refused_unread(rpc_name(known), None, &status).await,
                None => self.refused_unread(UNKNOWN_RPC, Some(path), &status).await,
            }
            let mut response: http::Response<_> = codec::status_response(&status);
            *response.status_mut() = http_status;
            return response.into();
        }
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
            _ => return self.unrouted(path, format!("unknown service {service}")).await,
        };
        match routed {
            Some(answer) => answer,
            None => self.unrouted(path, format!("unknown method {method} for service {service}")).await,
        }
    }

    /// A request for a method the proxy does not know: recorded (denied, with its path) and answered
    /// `Unimplemented`, as etcd answers it.
    async fn unrouted(&self, path: &str, message: String) -> Answer {
        let status = Status::unimplemented(message);
        self.refused_unread(UNKNOWN_RPC, Some(path), &status).await;
        codec::status_response(&status).into()
    }

    /// Record a request refused before its message could be read (or its method found). It is not served either
    /// way, so the record is written as far as the audit log allows.
    async fn refused_unread(&self, rpc: &'static str, path: Option<&str>, status: &Status) {
        let at = Arrival::now();
        let record = self.record(rpc, Event::Call, None, &Unread(path), at);
        let verdict = Verdict { decision: Decision::Deny, reason: status.message().to_string() };
        let _ = self.audit_refusal(rpc, record, Cow::Owned(verdict), status.code(), at).await;
    }

    /// Decide a request: every need against the caller's permissions; lease needs ask etcd which keys are
    /// attached. `Err` only when the check itself could not be made (etcd unreachable during a lease lookup).
    ///
    /// With only `audit-only` bindings a denial becomes [`Decision::WouldDeny`] — except for requests the proxy
    /// does not understand ([`Need::Never`]), which are always denied.
    ///
    /// `record` (the request's, if audited) is made to name the roles of the policy it was decided by.
    pub async fn decide(&self, needs: &Needs, meta: &CallMeta, record: &mut Option<Record>) -> Result<Verdict, Status> {
        let (verdict, view) = self.decide_in(self.conn.view(&self.shared), needs, meta).await?;
        decided_under(record, &view);
        Ok(verdict)
    }

    /// [`Guard::decide`] under a view the caller already holds. A lease lookup waits for etcd, and a policy
    /// reload may land meanwhile: then the request is decided again under the policy in force (a decision is
    /// never acted on under a policy that is no longer in force). The view the verdict was reached under comes
    /// back with it.
    async fn decide_in(
        &self,
        mut view: Arc<View>,
        needs: &Needs,
        meta: &CallMeta,
    ) -> Result<(Verdict, Arc<View>), Status> {
        for _ in 0..RELOADS_WAITED {
            if let Some(verdict) = self.decide_under(&view, needs, meta).await? {
                return Ok((verdict, view));
            }
            view = self.conn.view(&self.shared);
        }
        Err(Status::unavailable("etcd-guard: the policy was reloaded again and again while this request was checked"))
    }

    /// One decision under `view`; `None` if a policy reload landed while etcd was asked for a lease's keys.
    async fn decide_under(&self, view: &Arc<View>, needs: &Needs, meta: &CallMeta) -> Result<Option<Verdict>, Status> {
        if let Some(verdict) = refused_by_view(view, needs) {
            return Ok(Some(verdict));
        }
        let (verdict, asked) = self.decide_leases(view, needs, meta).await?;
        if asked && self.shared.generation() != view.generation {
            return Ok(None);
        }
        Ok(Some(verdict))
    }

    /// The lease needs of a decision the view alone did not refuse; also whether etcd was asked.
    async fn decide_leases(&self, view: &Arc<View>, needs: &Needs, meta: &CallMeta) -> Result<(Verdict, bool), Status> {
        let perms = &view.permissions;
        let mut asked = false;
        let mut looked_up: HashSet<(Access, i64)> = HashSet::new();
        for need in &needs.0 {
            if let Need::LeaseKeys(access, lease) = need {
                // Whatever keys the lease has, a grant of the whole keyspace covers them: etcd is not asked (each
                // lookup is a second request to etcd, listing every key of the lease).
                if perms.check(*access, &KeyRange::all()).is_ok() || looked_up.contains(&(*access, *lease)) {
                    continue;
                }
                if looked_up.len() == MAX_LEASE_LOOKUPS {
                    return Err(Status::resource_exhausted(format!(
                        "etcd-guard: a request may use at most {MAX_LEASE_LOOKUPS} leases"
                    )));
                }
                looked_up.insert((*access, *lease));
                // Boxed: a lookup is rare, and its future would otherwise make every call's future larger.
                let shared = &self.shared;
                let found = Box::pin(shared.lease_keys.get(*lease, &shared.upstream, &shared.metrics, meta)).await?;
                asked = true;
                if let Err(d) = found.check(view, *access) {
                    let reason = format!("lease {lease:x} has a key outside the grants: {}", d.reason);
                    return Ok((refusal(perms, reason), asked));
                }
            }
        }
        Ok((Verdict { decision: Decision::Allow, reason: allow_reason(&view.roles_label, needs) }, asked))
    }

    /// A slot for a new watch under the identity's limits (and one call against its rate). Watches are counted
    /// under no limit too, so a reload that sets `open_watches` finds the ones already open.
    pub fn watch_slot(&self) -> Result<crate::limits::WatchSlot, Status> {
        self.rate_one()?;
        let view = self.conn.view(&self.shared);
        let (limiter, metrics) = (&self.shared.limiter, &self.shared.metrics);
        limiter.watch(&self.conn.usage, &view.permissions.limits, self.conn.who(), metrics)
    }

    /// A new stream answer's patience with a client that reads none of it (`limits.unread_stream_timeout_ms`).
    fn unread_limit(&self) -> Option<UnreadLimit> {
        self.shared.unread_stream_timeout.map(UnreadLimit::new)
    }

    /// One call against the identity's rate, for what counts as one without being a call: a watch create, a lease
    /// keep-alive (which, for an identity that may not write every key, makes the proxy ask etcd for the lease's
    /// keys).
    pub fn rate_one(&self) -> Result<(), Status> {
        let view = self.conn.view(&self.shared);
        let (limiter, metrics) = (&self.shared.limiter, &self.shared.metrics);
        limiter.rate(&self.conn.usage, &view.permissions.limits, self.conn.who(), metrics)
    }

    /// Start an audit record for this connection (`None` when auditing is off, so nothing is rendered).
    pub fn record<M: Describe>(
        &self,
        rpc: &'static str,
        event: Event,
        stream: Option<u64>,
        msg: &M,
        at: Arrival,
    ) -> Option<Record> {
        if !self.shared.audit.is_enabled() {
            return None;
        }
        self.record_in(&self.conn.view(&self.shared), rpc, event, stream, msg, at)
    }

    /// [`Guard::record`] under a view the caller already holds (auditing on).
    fn record_in<M: Describe>(
        &self,
        view: &View,
        rpc: &'static str,
        event: Event,
        stream: Option<u64>,
        msg: &M,
        at: Arrival,
    ) -> Option<Record> {
        let mut ops = Ops::new();
        msg.describe(&mut ops);
        if ops.is_empty() {
            crate::audit::describe::method_op(&mut ops, rpc);
        }
        Some(Record {
            subject: view.subject.clone(),
            time: at.time,
            rpc,
            event,
            stream,
            ops: ops.finish(),
            decision: Decision::Deny,
            reason: String::new(),
            code: Code::Unknown,
            revision: None,
            latency_us: 0,
        })
    }

    /// Fill in the outcome and queue the record. `Err(Unavailable)` if it cannot be written: the answer must not
    /// be given then.
    pub async fn audit(
        &self,
        rpc: &'static str,
        record: Option<Record>,
        verdict: &Verdict,
        code: Code,
        revision: Option<i64>,
        at: Arrival,
    ) -> Result<(), Status> {
        self.audit_with(rpc, record, Cow::Borrowed(verdict), code, revision, at).await
    }

    /// Count the request, and queue its record (if auditing is on) with the outcome. A borrowed verdict is copied
    /// only for a record; an owned one (not needed afterwards) moves its reason into the record.
    async fn audit_with(
        &self,
        rpc: &'static str,
        record: Option<Record>,
        verdict: Cow<'_, Verdict>,
        code: Code,
        revision: Option<i64>,
        at: Arrival,
    ) -> Result<(), Status> {
        self.count(rpc, verdict.decision, code, at);
        let Some(mut r) = record else { return Ok(()) };
        let Verdict { decision, reason } = verdict.into_owned();
        r.decision = decision;
        r.reason = reason;
        r.code = code;
        r.revision = revision;
        r.latency_us = at.micros();
        self.shared.audit.submit(r).await
    }

    /// [`Guard::audit`] where a denial means the request was not forwarded (for other decisions it is `audit`). Not
    /// every such denial gets a record of its own: over `audit.denial_records`, they are counted in the identity's
    /// summary records instead, so that a client with nothing but denials cannot flood the log
    /// ([`Limiter::record_denial`](crate::limits::Limiter::record_denial)). Denials of what reached etcd (an answer
    /// withheld, a permission withdrawn while a call waited) are always recorded each.
    pub async fn audit_refusal(
        &self,
        rpc: &'static str,
        record: Option<Record>,
        verdict: Cow<'_, Verdict>,
        code: Code,
        at: Arrival,
    ) -> Result<(), Status> {
        let mut r = match record {
            Some(r) if verdict.decision == Decision::Deny => r,
            record => return self.audit_with(rpc, record, verdict, code, None, at).await,
        };
        self.count(rpc, verdict.decision, code, at);
        r.reason = verdict.into_owned().reason;
        r.code = code;
        r.latency_us = at.micros();
        let denied = self.shared.limiter.record_denial(&self.conn.usage, r);
        // Summary records are queued without waiting: a client that resets its call must not make them vanish.
        for summary in denied.summaries {
            self.shared.audit.submit_now(summary);
        }
        match denied.own {
            // As any record, the denial's own may wait for room in the queue.
            Some(own) => self.shared.audit.submit(own).await,
            None => {
                self.shared.metrics.audit_denials_summarised.inc();
                Ok(())
            }
        }
    }

    /// Count a request (or stream message) in the metrics.
    fn count(&self, rpc: &'static str, decision: Decision, code: Code, at: Arrival) {
        let m = &self.shared.metrics;
        let labels = RequestLabels { rpc, decision: decision.as_str(), code: code_name(code) };
        self.conn.metrics.observe(m, labels, at.instant.elapsed().as_secs_f64());
        if decision == Decision::WouldDeny {
            m.would_deny.get_or_create(&RpcLabels { rpc }).inc();
        }
    }

    /// Describe, decide and gate one call. A call that is not to be served is recorded and answered here
    /// (`Err`); an allowed one comes back with its verdict and unfinished record for [`Guard::finish`], which is
    /// written with `Cancelled` if the call is dropped first ([`Forwarding`]).
    pub async fn check<M: Describe>(
        &self,
        rpc: &'static str,
        stream: Option<u64>,
        msg: &M,
        needs: Result<Needs, Status>,
        meta: &CallMeta,
        at: Arrival,
    ) -> Result<(Verdict, Forwarding<'_>, Permit), Status> {
        let view = self.conn.view(&self.shared);
        let mut record = if self.shared.audit.is_enabled() {
            self.record_in(&view, rpc, Event::Call, stream, msg, at)
        } else {
            None
        };
        // Limits first: a client over its limit is not worth an upstream lease lookup.
        let limits = &view.permissions.limits;
        let permit = match self.shared.limiter.call(&self.conn.usage, limits, self.conn.who(), &self.shared.metrics) {
            Ok(p) => p,
            Err(status) => {
                let v = Verdict { decision: Decision::Deny, reason: status.message().to_string() };
                let _ = self.audit_refusal(rpc, record, Cow::Owned(v), status.code(), at).await;
                return Err(status);
            }
        };
        let verdict = match needs {
            Ok(needs) => self.decide_in(view, &needs, meta).await,
            Err(status) => Err(status),
        };
        let verdict = match verdict {
            Ok((v, decided)) => {
                decided_under(&mut record, &decided);
                v
            }
            Err(status) => {
                // A malformed request (answered as etcd answers it) or a check that could not be made.
                let v = Verdict { decision: Decision::Deny, reason: status.message().to_string() };
                let _ = self.audit_refusal(rpc, record, Cow::Owned(v), status.code(), at).await;
                return Err(status);
            }
        };
        if verdict.decision == Decision::Deny {
            let _ = self.audit_refusal(rpc, record, Cow::Owned(verdict), Code::PermissionDenied, at).await;
            return Err(permission_denied());
        }
        if let Err(status) = self.shared.audit.admit() {
            let _ = self.audit_refusal(rpc, record, Cow::Owned(verdict), status.code(), at).await;
            return Err(status);
        }
        let forwarding = Forwarding { guard: self, rpc, record, decision: verdict.decision, at, done: false };
        Ok((verdict, forwarding, permit))
    }

    /// Record the outcome of a served call, then give its answer — or `Unavailable` if the record cannot be
    /// written.
    pub async fn finish(
        &self,
        forwarding: Forwarding<'_>,
        verdict: Verdict,
        answer: Result<Framed, Status>,
    ) -> Result<Framed, Status> {
        let (rpc, at) = (forwarding.rpc, forwarding.at);
        let mut record = forwarding.into_record();
        let mut verdict = verdict;
        if let (lease::GRANT_RPC, Ok(framed), Some(r)) = (rpc, &answer, record.as_mut()) {
            lease::record_granted(&mut r.ops, framed);
        }
        let (code, revision) = match &answer {
            Ok(framed) => (Code::Ok, header_revision(framed)),
            Err(status) => {
                // What the client was told, beside the grant: a write that etcd answered "request timed out", or
                // whose deadline passed, may have been applied (as without the proxy), and the reviewer sees why.
                if record.is_some() && verdict.decision != Decision::Deny {
                    failed_with(&mut verdict.reason, status);
                }
                (status.code(), None)
            }
        };
        self.audit_with(rpc, record, Cow::Owned(verdict), code, revision, at).await?;
        answer
    }

    /// A unary RPC: decode, check with `authorize`, forward the checked message, return etcd's bytes.
    pub async fn unary<M, F>(&self, req: HttpRequest, path: &'static str, authorize: F) -> Answer
    where
        M: prost::Message + Default + Describe + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
    {
        self.unary_answered(req, path, authorize, |rpc, msg: M, meta| async move {
            self.forward(rpc, path, msg, &meta).await
        })
        .await
    }

    /// Forward a checked unary call to etcd, timed ([`Guard::upstream_timer`]).
    async fn forward<M: prost::Message>(
        &self,
        rpc: &'static str,
        path: &'static str,
        msg: M,
        meta: &CallMeta,
    ) -> Result<Framed, Status> {
        let _timer = self.upstream_timer(rpc);
        self.shared.upstream.unary(path, msg, meta).await
    }

    /// Times a call to etcd made for a client's call of `rpc` until it is dropped: the time goes to
    /// `upstream_duration_seconds`, also when the call is dropped before etcd answered (the client went away, a
    /// reload withdrew a waiting Lock), as `request_duration_seconds` counts such calls too. A guard rather than a
    /// wrapping `async fn`, which would hold the call's future twice (as its argument and as what it awaits).
    pub fn upstream_timer(&self, rpc: &'static str) -> UpstreamTimer<'_> {
        UpstreamTimer { guard: self, rpc, sent: Instant::now() }
    }

    /// A unary RPC forwarded to etcd whose answer is checked too, where `inspected.0` says so for the request:
    /// `inspected.1` reads etcd's answer under the caller's permissions and names what the caller may not see.
    /// Such an answer is not given: the client gets etcd's `PermissionDenied`, and the record says why. For
    /// answers that list keys the request did not name (LeaseTimeToLive with `keys`).
    pub async fn unary_inspected<M, F>(
        &self,
        req: HttpRequest,
        path: &'static str,
        authorize: F,
        inspected: Inspection<M>,
    ) -> Answer
    where
        M: prost::Message + Default + Describe + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
    {
        let (msg, meta, at) = match self.read_unary::<M>(req, path).await {
            Ok(read) => read,
            Err(status) => return codec::status_response(&status).into(),
        };
        let needs = authorize(&msg);
        let rpc = rpc_name(path);
        let (inspect, refused) = inspected;
        // Boxed: these calls are few; inline, their future would make every call's future on the connection larger.
        let answered = Box::pin(async {
            let (mut verdict, forwarding, _permit) = self.check(rpc, None, &msg, needs, &meta, at).await?;
            let inspect = inspect(&msg);
            let mut answered = self.forward(rpc, path, msg, &meta).await;
            if let (true, Ok(answer)) = (inspect, answered.as_ref()) {
                let view = self.conn.view(&self.shared);
                if let Some(reason) = refused(answer, &view) {
                    let refusal = refusal(&view.permissions, reason);
                    if refusal.decision == Decision::Deny {
                        answered = Err(permission_denied());
                    }
                    verdict = refusal;
                }
            }
            self.finish(forwarding, verdict, answered).await
        });
        unary_answer(answered.await)
    }

    /// A unary RPC answered by `answer` after the check (forwarded to etcd, or built by the proxy itself).
    ///
    /// Unary calls do not go through tonic's server: the request is read whole and decoded here, and the answer is
    /// one frame and a status, which saves a good part of the proxy's work per call.
    pub async fn unary_answered<M, F, A, Fut>(
        &self,
        req: HttpRequest,
        path: &'static str,
        authorize: F,
        answer: A,
    ) -> Answer
    where
        M: prost::Message + Default + Describe + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
        A: FnOnce(&'static str, M, CallMeta) -> Fut + Send,
        Fut: Future<Output = Result<Framed, Status>> + Send,
    {
        let (msg, meta, at) = match self.read_unary::<M>(req, path).await {
            Ok(read) => read,
            Err(status) => return codec::status_response(&status).into(),
        };
        let needs = authorize(&msg);
        let rpc = rpc_name(path);
        let answered = async {
            let (verdict, forwarding, _permit) = self.check(rpc, None, &msg, needs, &meta, at).await?;
            let answered = answer(rpc, msg, meta).await;
            self.finish(forwarding, verdict, answered).await
        };
        unary_answer(answered.await)
    }

    /// A unary RPC that may wait at etcd for as long as others hold what it waits for (Lock, Campaign). While it
    /// waits it is checked again after every policy reload (by the view, as server streams are): a reload that
    /// withdraws its permission ends it with etcd's `PermissionDenied`, and etcd's call is dropped, so etcd takes
    /// the waiter's key back as it does when a client goes away. A shutdown ends it with `Unavailable` (the client
    /// asks again elsewhere), as it ends watches: a waiter would otherwise hold the drain for all of
    /// `shutdown_grace`.
    pub async fn unary_waiting<M, F>(&self, req: HttpRequest, path: &'static str, authorize: F) -> Answer
    where
        M: prost::Message + Default + Describe + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
    {
        let (msg, meta, at) = match self.read_unary::<M>(req, path).await {
            Ok(read) => read,
            Err(status) => return codec::status_response(&status).into(),
        };
        let needs = authorize(&msg);
        let rpc = rpc_name(path);
        // Boxed: these calls are few; inline, their future would make every call's future on the connection larger.
        let answered = Box::pin(async {
            // Subscribed before the check: a reload that lands during the check is checked too.
            let reloads = self.shared.subscribe_reloads();
            let kept = needs.as_ref().ok().cloned();
            let (mut verdict, forwarding, mut permit) = self.check(rpc, None, &msg, needs, &meta, at).await?;
            // Not forwarded once a shutdown has begun: etcd could grant it just as the shutdown drops the call,
            // and the key would stay held, unknown to the client, until its lease ends.
            if *self.shared.shutting_down.borrow() {
                return self.finish(forwarding, verdict, Err(shutting_down())).await;
            }
            // Its identity's limit still counts the waiter; proxy-wide, waiters have a budget of their own.
            if let Err(status) = self.shared.limiter.waiting(&mut permit, &self.shared.metrics) {
                // Recorded as every limit's refusal is (denied, with the limit's words, within the identity's
                // `audit.denial_records`), and answered with the limit's status whatever became of the record.
                let refused = Verdict { decision: Decision::Deny, reason: status.message().to_string() };
                let record = forwarding.into_record();
                let _ = self.audit_refusal(rpc, record, Cow::Owned(refused), status.code(), at).await;
                return Err(status);
            }
            let call = self.forward(rpc, path, msg, &meta);
            let withdrawn = async {
                match kept {
                    Some(needs) => self.withdrawn_by_reload(&needs, reloads).await,
                    None => std::future::pending().await,
                }
            };
            let answered = tokio::select! {
                // etcd's answer first: a lock etcd granted in the same turn as a withdrawal or a shutdown is not
                // dropped unseen (its key would stay, unknown to the client, until its lease ends).
                biased;
                answered = call => answered,
                withdrawn = withdrawn => {
                    verdict = withdrawn;
                    Err(permission_denied())
                }
                () = self.shared.shutdown_begun() => Err(shutting_down()),
            };
            self.finish(forwarding, verdict, answered).await
        });
        unary_answer(answered.await)
    }

    /// Read and decode a unary request: the message, its metadata, and when it arrived. One that cannot be read
    /// is recorded here.
    async fn read_unary<M: prost::Message + Default>(
        &self,
        req: HttpRequest,
        path: &'static str,
    ) -> Result<(M, CallMeta, Arrival), Status> {
        let (head, body) = req.into_parts();
        let msg: M = self.read_message(body, &head.headers, path).await?;
        Ok((msg, CallMeta::from_headers(&head.headers), Arrival::now()))
    }

    /// Read and decode a request's one message; one that cannot be read (malformed, too large, compressed) is
    /// recorded and refused as etcd refuses it.
    async fn read_message<M: prost::Message + Default>(
        &self,
        body: RecvBody,
        headers: &http::HeaderMap,
        path: &'static str,
    ) -> Result<M, Status> {
        match codec::read_request(body, headers, self.shared.max_request_bytes).await {
            Ok(msg) => Ok(msg),
            Err(status) => {
                self.refused_unread(rpc_name(path), None, &status).await;
                Err(status)
            }
        }
    }

    /// Resolves when a policy reload withdraws what `needs` asks for, with the verdict for the record (never
    /// under `audit-only` bindings).
    async fn withdrawn_by_reload(&self, needs: &Needs, mut reloads: tokio::sync::watch::Receiver<u64>) -> Verdict {
        while reloads.changed().await.is_ok() {
            if let Some(verdict) = withdrawn_under(&self.conn.view(&self.shared), needs) {
                return verdict;
            }
        }
        std::future::pending().await
    }

    /// A server-streaming RPC: checked once, then etcd's frames are passed through as they come. The call is
    /// recorded as the stream opens; its end is recorded when it ends (or the client goes away).
    pub async fn server_streaming<M, F>(&self, req: HttpRequest, path: &'static str, authorize: F) -> Answer
    where
        M: prost::Message + Default + Describe + Send + Sync + 'static,
        F: FnOnce(&M) -> Result<Needs, Status> + Send,
    {
        let unread = self.unread_limit();
        let noted = unread.clone();
        // Boxed here and in `bidi`: streams are few and long-lived; inline, their futures would make the future of
        // every unary call on the connection as large.
        let opened = Box::pin(async move {
            let (head, body) = req.into_parts();
            let msg: M = self.read_message(body, &head.headers, path).await?;
            let at = Arrival::now();
            let meta = CallMeta::from_headers(&head.headers);
            let rpc = rpc_name(path);
            let stream_id = self.shared.audit.stream_id();
            let needs = authorize(&msg);
            // Checked again after every reload: a stream whose permission a reload withdrew ends, as open
            // watches are canceled.
            let recheck = needs.as_ref().ok().map(|needs| Recheck {
                guard: self.clone(),
                needs: needs.clone(),
                reloads: WatchStream::from_changes(self.shared.subscribe_reloads()),
            });
            let (verdict, forwarding, _permit) = self.check(rpc, stream_id, &msg, needs, &meta, at).await?;
            let end = StreamEnd::new(self, rpc, stream_id, &msg, &verdict, at).noting(noted);
            self.audit(rpc, forwarding.into_record(), &verdict, Code::Ok, None, at).await?;
            let upstream = self.shared.upstream.for_streams(&self.conn.streams);
            let open = upstream.server_streaming(path, msg, &meta);
            // etcd answers an Observe (its headers too) only once the election has a leader: a shutdown ends
            // one still opening as well.
            let opened = if ends_at_shutdown(path) {
                tokio::select! {
                    biased;
                    opened = open => opened,
                    () = self.shared.shutdown_begun() => Err(shutting_down()),
                }
            } else {
                open.await
            };
            match opened {
                Ok(frames) => {
                    // Streams without an end of their own end at a shutdown, as watches do; the others (a
                    // snapshot, a streamed range) get `shutdown_grace` to finish.
                    let shutdown =
                        ends_at_shutdown(path).then(|| WatchStream::new(self.shared.shutting_down.subscribe()));
                    Ok(Audited { frames: Some(frames), end, recheck: recheck.map(Box::new), shutdown })
                }
                Err(status) => {
                    // Recorded as a stream that ended at once, with why.
                    let mut end = end;
                    let _ = end.note(Some(Err(status.clone())));
                    drop(end);
                    Err(status)
                }
            }
        });
        match opened.await {
            Ok(stream) => codec::streamed_response(Box::pin(stream), unread),
            Err(status) => codec::status_response(&status).into(),
        }
    }

    /// A bidirectional RPC (`rpc` as records name it); `run` gets the client's messages, decoded, and returns the
    /// stream of frames to answer with (`run`'s [`UnreadLimit`] is the answer's: for its [`StreamEnd`]). A stream whose messages could not be read (a compression etcd does not
    /// know) is recorded as refused and not opened.
    pub async fn bidi<M, F, Fut>(&self, req: HttpRequest, rpc: &'static str, run: F) -> Answer
    where
        M: prost::Message + Default + Send + 'static,
        F: FnOnce(Streaming<M>, CallMeta, Option<UnreadLimit>) -> Fut + Send,
        Fut: Future<Output = Result<Outbound, Status>> + Send,
    {
        let (head, body) = req.into_parts();
        if let Err(status) = codec::check_request_encoding(&head.headers) {
            self.refused_unread(rpc, None, &status).await;
            return codec::status_response(&status).into();
        }
        let meta = CallMeta::from_headers(&head.headers);
        let max = self.shared.max_request_bytes;
        let body = http_body_util::BodyExt::map_err(body, ClientGone);
        let inbound = Streaming::new_request(MessageDecoder::<M>::default(), body, None, Some(max));
        let unread = self.unread_limit();
        match Box::pin(run(inbound, meta, unread.clone())).await {
            Ok(outbound) => codec::streamed_response(outbound, unread),
            Err(status) => codec::status_response(&status).into(),
        }
    }
}

/// The part of a decision the view alone makes (everything but the keys of leases): `Some` if it refuses —
/// [`Decision::WouldDeny`] where only `audit-only` bindings apply, except for requests the proxy does not understand.
fn refused_by_view(view: &View, needs: &Needs) -> Option<Verdict> {
    let perms = &view.permissions;
    if let Some(why) = needs.0.iter().find_map(|n| if let Need::Never(why) = n { Some(*why) } else { None }) {
        return Some(Verdict { decision: Decision::Deny, reason: why.to_string() });
    }
    // Even a request that needs no permission (a transaction without compares or operations still answers with
    // the cluster's revision and member; a watch cancel or progress request): nothing for an unbound identity.
    if perms.roles.is_empty() {
        return Some(Verdict { decision: Decision::Deny, reason: "no binding matches this identity".into() });
    }
    let reason = needs.0.iter().find_map(|need| match need {
        Need::Key(access, range) => perms.check(*access, range).err().map(|d| d.reason),
        Need::Cap(cap) => perms.check_capability(*cap).err().map(|d| d.reason),
        Need::Admin if perms.caps == CapabilitySet::all() => None,
        Need::Admin => Some("capability \"admin\" (every cluster capability) not granted".to_string()),
        Need::LeaseKeys(..) | Need::Never(_) => None,
    })?;
    Some(refusal(perms, reason))
}

/// Whether the view (after a reload) withdrew what an open call or stream was granted: the verdict for its record.
/// Never under `audit-only` bindings, which take nothing away.
fn withdrawn_under(view: &View, needs: &Needs) -> Option<Verdict> {
    let refused = refused_by_view(view, needs).filter(|v| v.decision == Decision::Deny)?;
    Some(withdrawal(&refused.reason))
}

/// The verdict recorded when a reload takes back what was granted, and why.
fn withdrawal(reason: &str) -> Verdict {
    Verdict { decision: Decision::Deny, reason: format!("permission withdrawn by a policy reload: {reason}") }
}

/// A request decided again after a reload (see [`Guard::decide`]): its record names the roles it was decided by.
fn decided_under(record: &mut Option<Record>, view: &View) {
    if let Some(r) = record.as_mut().filter(|r| !Arc::ptr_eq(&r.subject, &view.subject)) {
        r.subject = view.subject.clone();
    }
}

/// How much of a text the client sent or was told a record keeps (an unknown path, a failure's message).
const RECORDED_TEXT_CHARS: usize = 256;

/// The first `n` characters of `text`.
fn first_chars(text: &str, n: usize) -> &str {
    text.char_indices().nth(n).map_or(text, |(at, _)| &text[..at])
}

/// `reason` of an allowed call that failed, followed by the failure as its client was told it (cut to
/// [`RECORDED_TEXT_CHARS`]; etcd's and the proxy's messages carry no values).
fn failed_with(reason: &mut String, status: &Status) {
    let cut = first_chars(status.message(), RECORDED_TEXT_CHARS);
    reason.push_str("; failed: ");
    reason.push_str(if cut.is_empty() { "(no message)" } else { cut });
}

/// The HTTP answer to a unary call: etcd's message, or a status.
fn unary_answer(answered: Result<Framed, Status>) -> Answer {
    match answered {
        Ok(message) => codec::unary_response(message),
        Err(status) => codec::status_response(&status).into(),
    }
}

/// A refusal by the grants: [`Decision::WouldDeny`] where only `audit-only` bindings apply.
fn refusal(perms: &Permissions, reason: String) -> Verdict {
    let decision = if perms.mode() == Mode::AuditOnly { Decision::WouldDeny } else { Decision::Deny };
    Verdict { decision, reason }
}

/// `role cilium: read [cilium/, cilium0)` — the roles and the first thing checked (written into one string: this
/// runs for every allowed request).
fn allow_reason(label: &str, needs: &Needs) -> String {
    use std::fmt::Write;
    let Some(first) = needs.0.first() else { return "no permission needed".to_string() };
    let mut reason = String::with_capacity(label.len() + 64);
    reason.push_str(label);
    reason.push_str(": ");
    // Writing to a String cannot fail.
    let _ = match first {
        Need::Key(access, range) => write!(reason, "{access} {range}"),
        Need::Cap(cap) => write!(reason, "capability {cap}"),
        Need::Admin => write!(reason, "capability admin"),
        Need::LeaseKeys(access, lease) => write!(reason, "{access} on the keys of lease {lease:x}"),
        Need::Never(why) => write!(reason, "{why}"),
    };
    if needs.0.len() > 1 {
        let _ = write!(reason, " (+{} more)", needs.0.len() - 1);
    }
    reason
}

/// The RPC as records name it: `/etcdserverpb.KV/Range` → `KV/Range`.
pub fn rpc_name(path: &'static str) -> &'static str {
    // Byte searches: a path is looked at a few times per call, and `str::find` with a `char` is several times
    // slower for strings this short.
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let bytes = trimmed.as_bytes();
    let service_end = bytes.iter().position(|&b| b == b'/').unwrap_or(bytes.len());
    match bytes[..service_end].iter().rposition(|&b| b == b'.') {
        // After an ASCII '.': a char boundary.
        Some(dot) => trimmed.get(dot + 1..).unwrap_or(trimmed),
        None => trimmed,
    }
}

/// Only the header of an etcd response (field 1 in every response); everything else is skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHead {
    #[prost(message, optional, tag = "1")]
    header: Option<pb::ResponseHeader>,
}

/// The revision in an etcd response's header, without decoding the rest.
pub fn header_revision(framed: &Framed) -> Option<i64> {
    <ResponseHead as prost::Message>::decode(framed.message()).ok()?.header.map(|h| h.revision)
}

/// The record of a call allowed and on its way to etcd, until [`Guard::finish`] writes it with etcd's answer. A
/// call dropped before that (the client canceled it, its deadline passed, its connection went) is recorded as it
/// is dropped, with `Cancelled`: etcd may have applied it, and the log must say that it was sent.
pub struct Forwarding<'a> {
    guard: &'a Guard,
    rpc: &'static str,
    record: Option<Record>,
    decision: Decision,
    at: Arrival,
    done: bool,
}

/// The reason recorded for a call dropped after it was forwarded.
pub const CANCELED_REASON: &str = "the client canceled the call before etcd answered (etcd may have applied it)";

// === impl Forwarding ===

impl Forwarding<'_> {
    /// The record, to be written by the caller: nothing is written when this is dropped.
    pub fn into_record(mut self) -> Option<Record> {
        self.done = true;
        self.record.take()
    }
}

impl Drop for Forwarding<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Ended with its connection, which the proxy closed (a reload no longer trusts the certificate): the
        // client saw the connection go, as for streams (`StreamEnd`).
        let (code, reason) = match self.guard.conn.closed_because.get() {
            Some(why) => (Code::Unavailable, why.clone()),
            None => (Code::Cancelled, CANCELED_REASON.to_string()),
        };
        self.guard.count(self.rpc, self.decision, code, self.at);
        if let Some(mut r) = self.record.take() {
            r.decision = self.decision;
            r.reason = reason;
            r.code = code;
            r.latency_us = self.at.micros();
            self.guard.shared.audit.submit_now(r);
        }
    }
}

/// Times a call to etcd ([`Guard::upstream_timer`]): observed when dropped, whether etcd answered or not.
pub struct UpstreamTimer<'a> {
    guard: &'a Guard,
    rpc: &'static str,
    sent: Instant,
}

// === impl UpstreamTimer ===

impl Drop for UpstreamTimer<'_> {
    fn drop(&mut self) {
        let seconds = self.sent.elapsed().as_secs_f64();
        self.guard.conn.metrics.observe_upstream(&self.guard.shared.metrics, self.rpc, seconds);
    }
}

/// The reason a bidirectional stream's end record gives, unless something more is known.
const STREAM_ENDED: &str = "stream ended";

/// The record for the end of a stream, written once, when it is dropped, with how the stream's answer ended for
/// its client ([`StreamEnd::note`]): `Cancelled` if it did not (the client went away).
pub struct StreamEnd {
    conn: Arc<Conn>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    rpc: &'static str,
    done: bool,
    record: Option<Record>,
    reason: String,
    decision: Decision,
    at: Arrival,
    /// The stream answer's patience with its client: if it ran out, that is how the stream ended.
    unread: Option<UnreadLimit>,
    /// How the stream's answer ended for its client, once it has.
    ended: Option<Code>,
    /// Whether the proxy is shutting down: a stream it lets go then without an end of its own (its client did not
    /// read the shutdown's status in `shutdown_grace`) ended with its connection, as the client saw it.
    shutting_down: tokio::sync::watch::Receiver<bool>,
}

impl StreamEnd {
    pub fn new<M: Describe>(
        g: &Guard,
        rpc: &'static str,
        stream: Option<u64>,
        msg: &M,
        verdict: &Verdict,
        at: Arrival,
    ) -> StreamEnd {
        let record = g.record(rpc, Event::End, stream, msg, at);
        StreamEnd::open(g, rpc, record, verdict.decision, verdict.reason.clone(), at)
    }

    /// For bidirectional streams: the end record carries no ops.
    pub fn bidi(g: &Guard, rpc: &'static str, stream: Option<u64>, at: Arrival) -> StreamEnd {
        let record = g.record(rpc, Event::End, stream, &NoOps, at).map(|mut r| {
            r.ops = "[]".into();
            r
        });
        StreamEnd::open(g, rpc, record, Decision::Allow, STREAM_ENDED.into(), at)
    }

    /// Count the stream as open; the end record is written once.
    fn open(
        g: &Guard,
        rpc: &'static str,
        record: Option<Record>,
        decision: Decision,
        reason: String,
        at: Arrival,
    ) -> StreamEnd {
        g.shared.metrics.open_streams.get_or_create(&RpcLabels { rpc }).inc();
        let (audit, metrics) = (g.shared.audit.clone(), g.shared.metrics.clone());
        let (conn, shutting_down) = (g.conn.clone(), g.shared.shutting_down.subscribe());
        StreamEnd {
            conn,
            audit,
            metrics,
            rpc,
            done: false,
            record,
            reason,
            decision,
            at,
            unread: None,
            ended: None,
            shutting_down,
        }
    }

    /// Recorded as ended by the proxy if the stream's answer ran out of patience with its client.
    pub fn noting(mut self, unread: Option<UnreadLimit>) -> StreamEnd {
        self.unread = unread;
        self
    }

    /// Note an item the stream's answer hands to its client, and return what to hand it: the first error is how
    /// the stream ended (`None`: it ended `OK`). An error that only says the client's side is gone (see
    /// [`client_gone`]) ends the answer there, recorded as `Cancelled`: the client can be told nothing more.
    pub fn note(&mut self, item: Option<Result<Bytes, Status>>) -> Option<Result<Bytes, Status>> {
        match &item {
            Some(Ok(_)) => return item,
            Some(Err(status)) if client_gone(status) => {
                self.ended.get_or_insert(Code::Cancelled);
                return None;
            }
            Some(Err(status)) => {
                // Why, as the client was told (etcd's message, or the proxy's: a shutdown, a hand-over that did not
                // end), after the grant a server stream's record names (a withdrawal has said why already).
                if self.ended.is_none() && self.reason == STREAM_ENDED {
                    self.reason = format!("{STREAM_ENDED}: {}", status.message());
                } else if self.ended.is_none() && self.decision != Decision::Deny {
                    self.reason = format!("{}; {STREAM_ENDED}: {}", self.reason, status.message());
                }
                self.ended.get_or_insert(status.code())
            }
            None => self.ended.get_or_insert(Code::Ok),
        };
        item
    }

    /// Set the reason recorded at the end (e.g. why the proxy ended the stream).
    pub fn set_reason(&mut self, decision: Decision, reason: String) {
        self.decision = decision;
        self.reason = reason;
    }

    fn write(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            self.metrics.open_streams.get_or_create(&RpcLabels { rpc: self.rpc }).dec();
        }
        if let Some(mut r) = self.record.take() {
            let mut code = code;
            if let Some(why) = self.conn.closed_because.get() {
                // Ended with its connection, which the proxy closed: the client saw the connection go.
                (self.decision, self.reason, code) = (Decision::Deny, why.clone(), Code::Unavailable);
            } else if let Some(unread) = self.unread.as_ref().filter(|u| u.ran_out()) {
                // Reset by the proxy (the client sees `ResourceExhausted`), and etcd's call canceled with it.
                let why = format!(
                    "no room in the client's flow-control windows for the stream's answers for {} ms \
                     (limits.unread_stream_timeout_ms): stream reset",
                    unread.after().as_millis()
                );
                (self.decision, self.reason, code) = (Decision::Deny, why, Code::ResourceExhausted);
                self.metrics.limited.get_or_create(&LimitLabels { limit: "unread_stream_timeout" }).inc();
            }
            r.decision = self.decision;
            r.reason = std::mem::take(&mut self.reason);
            r.code = code;
            r.latency_us = self.at.micros();
            self.audit.submit_now(r);
        }
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let code = match self.ended {
            Some(code) => code,
            None if *self.shutting_down.borrow() => {
                if self.reason == STREAM_ENDED {
                    self.reason = "the proxy shut down".into();
                }
                Code::Unavailable
            }
            None => Code::Cancelled,
        };
        self.write(code);
    }
}

/// Whether reading a client's stream failed because the client's side of it is gone (the stream reset, the
/// connection lost: see [`ClientGone`]) rather than for what it sent (a message that cannot be read).
pub fn client_gone(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|e| e.is::<ClientGone>())
}

/// A client's stream of messages broke (an HTTP/2 error: the stream reset, the connection lost). Its own type so
/// that tonic's decoder passes it on as an error: as an `h2::Error`, a reset with `CANCEL` (how clients cancel a
/// stream) would read as the client ending its side, and a keep-alive stream would then be recorded `OK`.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ClientGone(#[from] h2::Error);

/// Nothing to describe.
struct NoOps;
impl Describe for NoOps {}

/// etcd's frames on a server-streaming call, passed on; records the stream's end (when the answer's body lets the
/// stream go: etcd's end can be taken in the same batch as its last frames, which may still be waiting for the
/// client, and then be reset for that rather than end `OK`).
struct Audited {
    /// etcd's answers; `None` once the proxy ended the stream.
    frames: Option<Frames>,
    end: StreamEnd,
    recheck: Option<Box<Recheck>>,
    /// For a stream that ends at a shutdown: turns true when the proxy begins to shut down.
    shutdown: Option<WatchStream<bool>>,
}

/// Whether a server stream of `path` is ended by a shutdown: those that last until their client lets go (Observe,
/// Health's Watch).
fn ends_at_shutdown(path: &str) -> bool {
    path == methods::ELECTION_OBSERVE || path == methods::HEALTH_WATCH
}

/// What a server stream needs, checked again under each reloaded policy.
struct Recheck {
    guard: Guard,
    needs: Needs,
    reloads: WatchStream<u64>,
}

impl Audited {
    /// Whether the proxy has begun to shut down (for a stream that ends then).
    fn shut_down(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(shutdown) = self.shutdown.as_mut() else { return false };
        let mut down = false;
        while let Poll::Ready(Some(now)) = shutdown.poll_next_unpin(cx) {
            down |= now;
        }
        down
    }

    /// After a reload: the reason the policy in force refuses the stream now, if it does.
    fn withdrawn(&mut self, cx: &mut Context<'_>) -> Option<Verdict> {
        let recheck = self.recheck.as_mut()?;
        let mut reloaded = false;
        while let Poll::Ready(Some(_)) = recheck.reloads.poll_next_unpin(cx) {
            reloaded = true;
        }
        if !reloaded {
            return None;
        }
        withdrawn_under(&recheck.guard.conn.view(&recheck.guard.shared), &recheck.needs)
    }
}

impl futures_util::Stream for Audited {
    type Item = Result<Bytes, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(verdict) = self.withdrawn(cx) {
            // Ended as etcd ends a call it refuses; etcd's stream is canceled with it.
            (self.frames, self.recheck) = (None, None);
            self.end.set_reason(verdict.decision, verdict.reason);
            return Poll::Ready(self.end.note(Some(Err(permission_denied()))));
        }
        if self.frames.is_some() && self.shut_down(cx) {
            (self.frames, self.recheck, self.shutdown) = (None, None, None);
            return Poll::Ready(self.end.note(Some(Err(shutting_down()))));
        }
        let Some(frames) = self.frames.as_mut() else { return Poll::Ready(None) };
        let item = ready!(Pin::new(frames).poll_next(cx));
        Poll::Ready(self.end.note(item.map(|frame| frame.map(Framed::into_bytes))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_are_service_and_method() {
        for (path, name) in [
            ("/etcdserverpb.KV/Range", "KV/Range"),
            ("/v3electionpb.Election/Campaign", "Election/Campaign"),
            ("/grpc.health.v1.Health/Check", "Health/Check"),
            ("/Plain/Method", "Plain/Method"),
            ("/a.b/c.d", "b/c.d"),
            ("/é.ü/x", "ü/x"),
            ("no-slash", "no-slash"),
            ("", ""),
        ] {
            assert_eq!(rpc_name(path), name, "{path}");
        }
    }

    #[test]
    fn allow_reasons_name_the_roles_and_the_first_need() {
        let one = Needs(vec![Need::Key(Access::Read, KeyRange::prefix(b"cilium/".to_vec()))]);
        assert_eq!(allow_reason("role cilium", &one), "role cilium: read [cilium/, cilium0)");
        let three = Needs(vec![Need::Key(Access::Write, KeyRange::point(b"k".to_vec())), Need::Admin, Need::Admin]);
        assert_eq!(allow_reason("roles a, b", &three), "roles a, b: write k (+2 more)");
        let lease = Needs(vec![Need::LeaseKeys(Access::Write, 0x1f)]);
        assert_eq!(allow_reason("role r", &lease), "role r: write on the keys of lease 1f");
        assert_eq!(allow_reason("role r", &Needs(vec![Need::Admin])), "role r: capability admin");
        assert_eq!(allow_reason("role r", &Needs(Vec::new())), "no permission needed");
    }

    #[test]
    fn streaming_methods_are_known_methods_and_unary_ones_are_not_streaming() {
        for path in STREAMING {
            assert!(methods::ALL.contains(path), "{path}");
            assert!(is_streaming(path));
        }
        for path in
            [methods::KV_RANGE, methods::KV_PUT, methods::KV_TXN, methods::LOCK_LOCK, "/etcdserverpb.Watch/Other"]
        {
            assert!(!is_streaming(path), "{path}");
        }
    }
}
