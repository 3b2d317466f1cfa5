//! The configuration file (`etcd-guard.yaml`): parsing, defaults and path resolution.
//!
//! Relative paths resolve against the folder of the configuration file. Every key is documented in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default limit on the size of one request message (etcd's own default is 1.5 MiB + overhead; clientv3 sends up
/// to 2 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// The whole configuration, with paths already resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration was read from (for messages).
    pub origin: PathBuf,
    pub listen: SocketAddr,
    pub tls: ListenerTls,
    pub upstream: Upstream,
    pub policy_file: PathBuf,
    pub advertise_client_urls: Vec<String>,
    pub limits: Limits,
    pub audit: Audit,
    /// The plain-HTTP listener for `/healthz`, `/readyz`, `/metrics` (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// How often the files are checked for changes (`None`: only on SIGHUP).
    pub reload_check_interval: Option<Duration>,
    /// How long a shutdown waits for calls in flight.
    pub shutdown_grace: Duration,
    /// Worker threads serving connections (`None`: half the cores, rounded up:
    /// [`crate::runtime::default_worker_threads`]).
    pub worker_threads: Option<usize>,
    pub watch: Watch,
}

/// How watches are served (`docs/watch-coalescing.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// Identical watches of different client streams share one upstream watch (off by default).
    #[serde(default)]
    pub coalesce: bool,
}

/// The audit log (`docs/audit.md`).
#[derive(Debug, Clone)]
pub struct Audit {
    /// Off only when the file says `enabled: false`.
    pub enabled: bool,
    pub output: AuditOutput,
    /// Rotate the active file when it reaches this size.
    pub max_file_bytes: u64,
    /// Rotated files kept besides the active one (0 = all).
    pub max_files: usize,
    /// Key the hash chain with HMAC-SHA256.
    pub hmac_key_file: Option<PathBuf>,
    pub on_write_failure: OnWriteFailure,
    /// When a request's answer may be sent, relative to its record reaching the file.
    pub answer_after: AnswerAfter,
    /// Records waiting for the writer; when full, requests wait.
    pub queue: usize,
    /// How many denials of one identity get a record each; the rest are counted in summary records (`None`: every
    /// denial gets its own record).
    pub denial_records: Option<DenialRecords>,
}

/// The denials of one identity (certificate) that get a record each (`audit.denial_records`): a token bucket. A
/// denial over it is counted in a summary record of the identity instead (`"event":"summary"`, docs/audit.md), so
/// that a client whose every request is denied — any holder of a certificate from the client CA — cannot fill the
/// log and rotate older records away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenialRecords {
    /// Records per second, after the burst. 0: every denial gets its own record (no summaries).
    #[serde(default = "default_denial_records_per_second")]
    pub per_second: u32,
    /// Records at once.
    #[serde(default = "default_denial_records_burst")]
    pub burst: u32,
}

impl Default for DenialRecords {
    fn default() -> Self {
        DenialRecords { per_second: default_denial_records_per_second(), burst: default_denial_records_burst() }
    }
}

/// When a request's answer may be sent, relative to its audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerAfter {
    /// Once the record is queued for the writer (the default): the record reaches the file within a few
    /// milliseconds; a crash of the proxy can lose the records of the last answers.
    Queued,
    /// Once the record is written to the file (the operating system's page cache): a crash of the proxy loses
    /// no record of an answered request; a crash of the machine can.
    Written,
    /// Once the record is written and synced to disk (`fdatasync`): not even a power loss loses it.
    Synced,
}

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    File(PathBuf),
    Stdout,
}

/// What to do with requests while audit records cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnWriteFailure {
    /// Refuse them with `Unavailable` (the default).
    Deny,
    /// Serve them; lost records are counted and noted in the log.
    Allow,
}

/// The client-facing TLS listener.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
    /// Names for CAs of the client CA bundle (`tls.issuers`), for `issuer:` in bindings: name → CA file.
    pub issuers: std::collections::BTreeMap<String, PathBuf>,
    pub crl_files: Vec<PathBuf>,
    /// Accept CRLs whose nextUpdate has passed (not recommended: revocations since are unknown).
    pub danger_accept_expired_crls: bool,
    pub handshake_timeout: Duration,
}

/// The etcd endpoints and the proxy's own client identity towards them.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub endpoints: Vec<String>,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub connect_timeout: Duration,
    /// How often each endpoint is probed (Maintenance/Status).
    pub health_check_interval: Duration,
    /// HTTP/2 connections opened to each endpoint (default 1); calls are spread over them.
    pub connections_per_endpoint: usize,
}

/// Where one of `upstream.endpoints` is reached, parsed from its URL ([`endpoint`]), and the name etcd's certificate
/// is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The requests' `:authority`; for `https://`, also the address connected to.
    pub authority: http::uri::Authority,
    /// `unixs://`: the unix socket connected to instead (etcd's `--listen-client-urls unixs://…` on the same host).
    pub socket: Option<PathBuf>,
    /// `https://`: the URL's host; `unixs://`: the name before the path.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// The longest unix socket path Linux connects to (`sun_path` is 108 bytes, the last one a NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Parse one of `upstream.endpoints` (or `--upstream`): `https://host[:port]` (port 443 if left out) or
/// `unixs://name/absolute/path` (the path taken as written: no percent-decoding). Both are mutual TLS; plain
/// `http://` and `unix://` are refused, and so is what could never connect: a host or name a certificate cannot
/// be checked against, a user name in the URL, a socket path Linux cannot take.
pub fn endpoint(url: &str) -> Result<Endpoint, String> {
    let name_of = |host: &str| {
        rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{url:?}: {host:?} is not a name a certificate can be checked against ({e})"))
    };
    if let Some(rest) = url.strip_prefix("unixs://") {
        let form = "a unixs:// endpoint is the name etcd's certificate is checked against (a DNS name or an IPv4 \
                    address), then the socket's absolute path: unixs://localhost/var/run/etcd/localhost:2379";
        let (name, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        if name.contains(':') || path.len() < 2 {
            // etcd's own form (`unixs://localhost:2379`) is a path relative to etcd's working folder.
            return Err(format!("{url:?}: {form}"));
        }
        let server_name = name_of(name).map_err(|e| format!("{e}; {form}"))?;
        if path.len() > MAX_SOCKET_PATH {
            return Err(format!(
                "{url:?}: the socket's path is {} bytes; Linux connects to paths of at most {MAX_SOCKET_PATH}",
                path.len()
            ));
        }
        if let Some(c) = path.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("{url:?}: the socket's path holds {c:?} (a space or a control character)"));
        }
        let authority = name.parse().map_err(|e| format!("{url:?}: {e}"))?;
        return Ok(Endpoint { authority, socket: Some(PathBuf::from(path)), server_name });
    }
    let only = "only https:// and unixs:// endpoints are supported (the upstream connection is mutual TLS)";
    if !url.starts_with("https://") {
        return Err(format!("{url:?}: {only}"));
    }
    let uri = url.parse::<http::Uri>().map_err(|e| format!("{url:?}: {e}"))?;
    let authority = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
    if authority.host().is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?}: a user name has no place in an endpoint (the proxy's certificate says who it is)"
        ));
    }
    let server_name = name_of(authority.host().trim_start_matches('[').trim_end_matches(']'))?;
    let authority = match authority.port_u16() {
        Some(_) => authority.clone(),
        None => format!("{}:443", authority.as_str()).parse().map_err(|e| format!("{url:?}: {e}"))?,
    };
    Ok(Endpoint { authority, socket: None, server_name })
}

/// Size and concurrency limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_concurrent_streams: u32,
    /// Calls in flight over all clients (`None`: unlimited). Per-identity limits are set in the policy.
    pub max_concurrent_requests: Option<u32>,
    /// Client connections open at once, counted from the accept (TLS handshakes in progress included); more are
    /// closed at once.
    pub max_connections: u32,
    /// TLS handshakes in progress from one client address; more are closed at once.
    pub max_handshakes_per_address: u32,
    /// How long etcd's answers on a stream (Watch, Snapshot, LeaseKeepAlive, Observe) wait for a client that reads
    /// none of them before the stream is reset, and etcd's call canceled with it (`None`: as long as it takes).
    pub unread_stream_timeout: Option<Duration>,
    /// Operations one transaction may run, counted over its nested levels (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid { path: PathBuf, key: &'static str, message: String },
}

// === file format ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    tls: RawTls,
    upstream: RawUpstream,
    policy_file: PathBuf,
    #[serde(default)]
    advertise_client_urls: Vec<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default = "default_metrics_listen")]
    metrics_listen: String,
    #[serde(default = "default_reload_check_interval_ms")]
    reload_check_interval_ms: u64,
    #[serde(default = "default_shutdown_grace_ms")]
    shutdown_grace_ms: u64,
    #[serde(default)]
    worker_threads: Option<usize>,
    #[serde(default)]
    watch: Watch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "default_audit_file")]
    file: PathBuf,
    #[serde(default = "default_max_file_bytes")]
    max_file_bytes: u64,
    #[serde(default = "default_max_files")]
    max_files: usize,
    #[serde(default)]
    hmac_key_file: Option<PathBuf>,
    #[serde(default = "default_on_write_failure")]
    on_write_failure: OnWriteFailure,
    #[serde(default = "default_answer_after")]
    answer_after: AnswerAfter,
    #[serde(default = "default_audit_queue")]
    queue: usize,
    #[serde(default)]
    denial_records: DenialRecords,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            enabled: true,
            file: default_audit_file(),
            max_file_bytes: default_max_file_bytes(),
            max_files: default_max_files(),
            hmac_key_file: None,
            on_write_failure: default_on_write_failure(),
            answer_after: default_answer_after(),
            queue: default_audit_queue(),
            denial_records: DenialRecords::default(),
        }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:23791".into()
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_reload_check_interval_ms() -> u64 {
    2_000
}
/// One, as etcd's own clients: every extra connection spreads the same calls over more reads, writes and wake-ups
/// (15–25 µs more proxy CPU per request with two, BENCHMARKS.md).
fn default_connections_per_endpoint() -> usize {
    1
}
fn default_health_check_interval_ms() -> u64 {
    2_000
}
fn yes() -> bool {
    true
}
fn default_audit_file() -> PathBuf {
    PathBuf::from("audit.log")
}
fn default_max_file_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_max_files() -> usize {
    10
}
fn default_on_write_failure() -> OnWriteFailure {
    OnWriteFailure::Deny
}
fn default_answer_after() -> AnswerAfter {
    AnswerAfter::Queued
}
fn default_audit_queue() -> usize {
    65_536
}
/// About 6 KiB/s of records per denied identity once its burst is spent (and a summary per RPC every 10 s): one
/// client needs more than a day, not a minute, to rotate the default 1 GiB of audit files away.
fn default_denial_records_per_second() -> u32 {
    10
}
fn default_denial_records_burst() -> u32 {
    200
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: PathBuf,
    #[serde(default)]
    issuers: std::collections::BTreeMap<String, PathBuf>,
    #[serde(default)]
    crl_files: Vec<PathBuf>,
    #[serde(default)]
    danger_accept_expired_crls: bool,
    #[serde(default = "default_handshake_timeout_ms")]
    handshake_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    endpoints: Vec<String>,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_health_check_interval_ms")]
    health_check_interval_ms: u64,
    #[serde(default = "default_connections_per_endpoint")]
    connections_per_endpoint: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_request_bytes")]
    max_request_bytes: usize,
    #[serde(default = "default_max_concurrent_streams")]
    max_concurrent_streams: u32,
    #[serde(default)]
    max_concurrent_requests: Option<u32>,
    #[serde(default = "default_max_connections")]
    max_connections: u32,
    #[serde(default = "default_max_handshakes_per_address")]
    max_handshakes_per_address: u32,
    #[serde(default = "default_unread_stream_timeout_ms")]
    unread_stream_timeout_ms: u64,
    #[serde(default = "default_max_txn_ops")]
    max_txn_ops: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_request_bytes: default_max_request_bytes(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_concurrent_requests: None,
            max_connections: default_max_connections(),
            max_handshakes_per_address: default_max_handshakes_per_address(),
            unread_stream_timeout_ms: default_unread_stream_timeout_ms(),
            max_txn_ops: default_max_txn_ops(),
        }
    }
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_max_request_bytes() -> usize {
    DEFAULT_MAX_REQUEST_BYTES
}
/// A name for a CA in `tls.issuers`.
fn is_issuer_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn default_max_connections() -> u32 {
    // Bounds file descriptors and memory against a flood of connections (or handshakes); each client connection
    // with streams also holds connections to etcd of its own.
    10_000
}
fn default_max_handshakes_per_address() -> u32 {
    // One address cannot take every connection slot with handshakes it never finishes; a reconnecting client
    // (kube-apiserver, an agent) opens a few at once.
    64
}
fn default_max_txn_ops() -> usize {
    crate::authz::MAX_TXN_OPS
}
fn default_unread_stream_timeout_ms() -> u64 {
    // etcd keeps a Snapshot's read transaction open while its client does not read, and a Defragment then stops
    // the whole member; a watch's unread history is held in etcd and in the proxy. clientv3 reads every stream as
    // it comes, so a client that reads nothing for this long is stuck or hostile.
    30_000
}
fn default_max_concurrent_streams() -> u32 {
    // etcd's default (`--max-concurrent-streams`) is unlimited; kube-apiserver multiplexes every watch on one
    // connection, so keep this high.
    u32::MAX
}

// === impl Config ===

impl Config {
    /// What an operator should know about a configuration that loads (logged at start, printed by `config check`).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.audit.enabled {
            warnings.push("auditing is off (audit.enabled: false): no request is recorded".to_string());
        }
        if let Some(metrics) = self.metrics_listen.filter(|m| !m.ip().to_canonical().is_loopback()) {
            warnings.push(format!(
                "metrics_listen {metrics} is not a loopback address: /metrics, /healthz and /readyz are plain HTTP \
                 without authentication (the metrics name identities and RPCs)"
            ));
        }
        warnings
    }

    /// Read and check a configuration file. Paths inside it resolve against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parse configuration text read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse { path: path.to_path_buf(), message };
        if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            return Err(parse_error("the file has no settings (it is empty, or only comments)".into()));
        }
        let raw: RawConfig = serde_saphyr::from_str(text)
            // The parser's excerpt names its source `<input>`: this file.
            .map_err(|e| {
                let message = crate::policy::model::parser_advice_removed(&e.to_string());
                parse_error(message.replace("--> <input>:", &format!("--> {}:", path.display())))
            })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let invalid =
            |key: &'static str, message: String| ConfigError::Invalid { path: path.to_path_buf(), key, message };

        let listen = raw
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| invalid("listen", format!("{:?} is not an address like 127.0.0.1:23790: {e}", raw.listen)))?;
        if raw.upstream.endpoints.is_empty() {
            return Err(invalid("upstream.endpoints", "at least one endpoint is required".into()));
        }
        // Resolved, an empty path would name the configuration's folder.
        for (key, file) in [
            ("policy_file", &raw.policy_file),
            ("tls.cert_file", &raw.tls.cert_file),
            ("tls.key_file", &raw.tls.key_file),
            ("tls.client_ca_file", &raw.tls.client_ca_file),
            ("upstream.ca_file", &raw.upstream.ca_file),
            ("upstream.cert_file", &raw.upstream.cert_file),
            ("upstream.key_file", &raw.upstream.key_file),
        ]
        .into_iter()
        .chain(raw.audit.hmac_key_file.iter().map(|f| ("audit.hmac_key_file", f)))
        .chain(raw.tls.crl_files.iter().map(|f| ("tls.crl_files", f)))
        .chain(raw.tls.issuers.values().map(|f| ("tls.issuers", f)))
        {
            if file.as_os_str().is_empty() {
                return Err(invalid(key, "must name a file (it is empty)".into()));
            }
        }
        for ep in &raw.upstream.endpoints {
            endpoint(ep).map_err(|message| invalid("upstream.endpoints", message))?;
        }
        for url in &raw.advertise_client_urls {
            // What clients (clientv3's MemberList-based endpoint sync) dial: the proxy's TLS listener.
            let uri =
                url.parse::<http::Uri>().map_err(|e| invalid("advertise_client_urls", format!("{url:?}: {e}")))?;
            let bare = uri.path_and_query().is_none_or(|p| p.as_str() == "/");
            if uri.scheme_str() != Some("https")
                || uri.host().is_none_or(str::is_empty)
                || uri.port().is_none()
                || !bare
            {
                return Err(invalid(
                    "advertise_client_urls",
                    format!("{url:?}: must be https://<host>:<port> (the proxy's listener speaks TLS only)"),
                ));
            }
        }
        let metrics_listen = match raw.metrics_listen.as_str() {
            "off" | "" => None,
            text => Some(text.parse::<SocketAddr>().map_err(|e| {
                invalid("metrics_listen", format!("{text:?} is not an address like 127.0.0.1:23791 (or \"off\"): {e}"))
            })?),
        };
        // Zero would fail every handshake and every connection to etcd.
        if raw.tls.handshake_timeout_ms == 0 {
            return Err(invalid("tls.handshake_timeout_ms", "must be greater than 0".into()));
        }
        if raw.upstream.connect_timeout_ms == 0 {
            return Err(invalid("upstream.connect_timeout_ms", "must be greater than 0".into()));
        }
        if raw.upstream.health_check_interval_ms < 100 {
            return Err(invalid("upstream.health_check_interval_ms", "must be at least 100".into()));
        }
        if !(1..=64).contains(&raw.upstream.connections_per_endpoint) {
            return Err(invalid("upstream.connections_per_endpoint", "must be between 1 and 64".into()));
        }
        if raw.audit.max_file_bytes < 4096 {
            return Err(invalid("audit.max_file_bytes", "must be at least 4096".into()));
        }
        if raw.audit.queue == 0 {
            return Err(invalid("audit.queue", "must be greater than 0".into()));
        }
        if raw.audit.denial_records.per_second > 0 && raw.audit.denial_records.burst == 0 {
            return Err(invalid(
                "audit.denial_records.burst",
                "must be at least 1 (or set per_second: 0 to record every denial on its own)".into(),
            ));
        }
        let audit_output = if raw.audit.file.as_os_str() == "-" {
            AuditOutput::Stdout
        } else {
            AuditOutput::File(resolve(&raw.audit.file))
        };
        if raw.worker_threads.is_some_and(|n| !(1..=1024).contains(&n)) {
            return Err(invalid("worker_threads", "must be between 1 and 1024".into()));
        }
        if let Some(name) = raw.tls.issuers.keys().find(|n| !is_issuer_name(n)) {
            return Err(invalid(
                "tls.issuers",
                format!("{name:?}: a name is lower-case letters, digits, `-` and `_` (as in a binding's `issuer:`)"),
            ));
        }
        if raw.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be greater than 0".into()));
        }
        if raw.limits.max_handshakes_per_address == 0 {
            return Err(invalid("limits.max_handshakes_per_address", "must be greater than 0".into()));
        }
        if (1..1000).contains(&raw.limits.unread_stream_timeout_ms) {
            return Err(invalid(
                "limits.unread_stream_timeout_ms",
                "must be 0 (streams wait for their clients as long as it takes) or at least 1000".into(),
            ));
        }
        if raw.limits.max_txn_ops == 0 {
            return Err(invalid("limits.max_txn_ops", "must be greater than 0 (etcd's --max-txn-ops)".into()));
        }
        if raw.limits.max_request_bytes == 0 {
            return Err(invalid("limits.max_request_bytes", "must be greater than 0".into()));
        }
        // Zero would refuse every stream, or every unary call.
        if raw.limits.max_concurrent_streams == 0 {
            return Err(invalid("limits.max_concurrent_streams", "must be greater than 0".into()));
        }
        if raw.limits.max_concurrent_requests == Some(0) {
            return Err(invalid(
                "limits.max_concurrent_requests",
                "must be greater than 0 (or left out: no limit)".into(),
            ));
        }
        if (1..100).contains(&raw.reload_check_interval_ms) {
            return Err(invalid("reload_check_interval_ms", "must be 0 (only on SIGHUP) or at least 100".into()));
        }
        if raw.audit.file.as_os_str().is_empty() {
            return Err(invalid("audit.file", "must name a file (or \"-\" for standard output)".into()));
        }
        Ok(Config {
            origin: path.to_path_buf(),
            listen,
            tls: ListenerTls {
                cert_file: resolve(&raw.tls.cert_file),
                key_file: resolve(&raw.tls.key_file),
                client_ca_file: resolve(&raw.tls.client_ca_file),
                issuers: raw.tls.issuers.iter().map(|(name, file)| (name.clone(), resolve(file))).collect(),
                crl_files: raw.tls.crl_files.iter().map(|p| resolve(p)).collect(),
                danger_accept_expired_crls: raw.tls.danger_accept_expired_crls,
                handshake_timeout: Duration::from_millis(raw.tls.handshake_timeout_ms),
            },
            upstream: Upstream {
                endpoints: raw.upstream.endpoints,
                ca_file: resolve(&raw.upstream.ca_file),
                cert_file: resolve(&raw.upstream.cert_file),
                key_file: resolve(&raw.upstream.key_file),
                connect_timeout: Duration::from_millis(raw.upstream.connect_timeout_ms),
                health_check_interval: Duration::from_millis(raw.upstream.health_check_interval_ms),
                connections_per_endpoint: raw.upstream.connections_per_endpoint,
            },
            policy_file: resolve(&raw.policy_file),
            advertise_client_urls: raw.advertise_client_urls,
            limits: Limits {
                max_request_bytes: raw.limits.max_request_bytes,
                max_concurrent_streams: raw.limits.max_concurrent_streams,
                max_concurrent_requests: raw.limits.max_concurrent_requests,
                max_connections: raw.limits.max_connections,
                max_handshakes_per_address: raw.limits.max_handshakes_per_address,
                max_txn_ops: raw.limits.max_txn_ops,
                unread_stream_timeout: match raw.limits.unread_stream_timeout_ms {
                    0 => None,
                    ms => Some(Duration::from_millis(ms)),
                },
            },
            audit: Audit {
                enabled: raw.audit.enabled,
                output: audit_output,
                max_file_bytes: raw.audit.max_file_bytes,
                max_files: raw.audit.max_files,
                hmac_key_file: raw.audit.hmac_key_file.as_deref().map(resolve),
                on_write_failure: raw.audit.on_write_failure,
                answer_after: raw.audit.answer_after,
                queue: raw.audit.queue,
                denial_records: (raw.audit.denial_records.per_second > 0).then_some(raw.audit.denial_records),
            },
            metrics_listen,
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
            worker_threads: raw.worker_threads,
            watch: raw.watch,
            reload_check_interval: match raw.reload_check_interval_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen: "127.0.0.1:23790"
tls:
  cert_file: server.crt
  key_file: server.key
  client_ca_file: ca.crt
upstream:
  endpoints: ["https://127.0.0.1:2379"]
  ca_file: etcd-ca.crt
  cert_file: upstream-client.crt
  key_file: upstream-client.key
policy_file: policies/kubernetes.yaml
advertise_client_urls: ["https://127.0.0.1:23790"]
"#;

    #[test]
    fn example_parses_and_resolves_paths() -> Result<(), ConfigError> {
        let c = Config::parse(EXAMPLE, Path::new("/etc/etcd-guard/etcd-guard.yaml"))?;
        assert_eq!(c.listen.port(), 23790);
        assert_eq!(c.tls.cert_file, PathBuf::from("/etc/etcd-guard/server.crt"));
        assert_eq!(c.policy_file, PathBuf::from("/etc/etcd-guard/policies/kubernetes.yaml"));
        assert_eq!(c.limits.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        Ok(())
    }

    /// `https://` (port 443 by default) and `unixs://name/absolute/path`; everything else is refused, with the form
    /// a unix socket takes, as is what could never connect.
    #[test]
    fn endpoints_are_https_or_unixs_urls() -> Result<(), Box<dyn std::error::Error>> {
        let parts = |url: &str| -> Result<(String, Option<PathBuf>, String), String> {
            let e = endpoint(url)?;
            Ok((e.authority.to_string(), e.socket, e.server_name.to_str().into_owned()))
        };
        let tcp = |a: &str, name: &str| Ok((a.to_owned(), None, name.to_owned()));
        assert_eq!(parts("https://10.0.0.1:2379"), tcp("10.0.0.1:2379", "10.0.0.1"));
        assert_eq!(parts("https://etcd-0.example"), tcp("etcd-0.example:443", "etcd-0.example"));
        assert_eq!(parts("https://[::1]:2379"), tcp("[::1]:2379", "::1"));
        assert_eq!(parts("https://etcd-0.example:2379/"), tcp("etcd-0.example:2379", "etcd-0.example"));
        let path = PathBuf::from("/var/run/etcd/localhost:2379");
        let unix = Ok(("localhost".to_owned(), Some(path), "localhost".to_owned()));
        assert_eq!(parts("unixs://localhost/var/run/etcd/localhost:2379"), unix);
        // Taken as written: no percent-decoding.
        let literal = parts("unixs://localhost/run/a%20b")?;
        assert_eq!(literal.1, Some(PathBuf::from("/run/a%20b")));
        let form = "unixs://localhost/var/run/etcd/localhost:2379";
        let long = format!("unixs://localhost/{}", "d".repeat(107));
        for (url, says) in [
            ("unixs://localhost:2379", form),
            ("unixs://localhost", form),
            ("unixs://localhost/", form),
            ("unixs://[::1]/var/run/etcd.sock", form),
            ("unixs:///var/run/etcd.sock", "\"\" is not a name"),
            ("unixs://bad name/var/run/etcd.sock", "\"bad name\" is not a name"),
            (&long, "the socket's path is 108 bytes; Linux connects to paths of at most 107"),
            ("unixs://localhost/var/run/etcd/localhost:2379 ", "holds ' '"),
            ("unixs://localhost/var/run/etcd\0/x", "holds '\\0'"),
            ("unix://localhost/var/run/etcd.sock", "only https:// and unixs://"),
            ("http://127.0.0.1:2379", "only https:// and unixs://"),
            ("127.0.0.1:2379", "only https:// and unixs://"),
            ("https://", "empty string"),
            ("https://:2379", "no host"),
            ("https://-bad:2379", "\"-bad\" is not a name"),
            ("https://root@127.0.0.1:2379", "a user name has no place"),
        ] {
            let e = endpoint(url).err().unwrap_or_default();
            assert!(e.contains(says) && e.contains(&format!("{url:?}")), "{url}: {e}");
        }
        Ok(())
    }

    #[test]
    fn unknown_key_is_refused_with_the_file_name() {
        let text = format!("{EXAMPLE}\nlisten_addr: x\n");
        let err = Config::parse(&text, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("c.yaml:"), "{err}");
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn a_key_given_twice_is_refused_in_the_editors_terms() {
        let text = format!("{EXAMPLE}\nlisten: \"127.0.0.1:1\"\n");
        let err = Config::parse(&text, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("c.yaml") && err.contains("duplicate") && err.contains("listen"), "{err}");
        assert!(!err.contains("DuplicateKeyPolicy"), "{err}");
    }

    /// serde's advice to programmers ("use Option<String>") is not the operator's: they are told what to do.
    #[test]
    fn a_null_value_is_refused_in_the_editors_terms() {
        let text = format!("{EXAMPLE}\nmetrics_listen: null\n");
        let err = Config::parse(&text, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("c.yaml") && err.contains("null"), "{err}");
        assert!(!err.contains("Option<") && err.contains("null is not a value here"), "{err}");
        let two = format!("{EXAMPLE}\n---\nlisten: x\n");
        let err = Config::parse(&two, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!err.contains("from_str_multiple") && err.contains("---"), "{err}");
    }

    #[test]
    fn an_empty_file_name_is_refused_by_its_key() {
        let text = EXAMPLE.replace("policy_file: policies/kubernetes.yaml", "policy_file: \"\"");
        let err = Config::parse(&text, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("policy_file") && err.contains("empty"), "{err}");
    }

    #[test]
    fn plain_http_upstream_is_refused() {
        let text = EXAMPLE.replace("https://127.0.0.1:2379", "http://127.0.0.1:2379");
        let err = Config::parse(&text, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("upstream.endpoints"), "{err}");
    }

    #[test]
    fn upstream_connections_are_two_per_endpoint_unless_set_within_bounds() -> Result<(), ConfigError> {
        assert_eq!(Config::parse(EXAMPLE, Path::new("c.yaml"))?.upstream.connections_per_endpoint, 1);
        let set = |n: &str| {
            EXAMPLE.replace(
                "  key_file: upstream-client.key\n",
                &format!("  key_file: upstream-client.key\n  connections_per_endpoint: {n}\n"),
            )
        };
        assert_eq!(Config::parse(&set("8"), Path::new("c.yaml"))?.upstream.connections_per_endpoint, 8);
        for bad in ["0", "65"] {
            let err = Config::parse(&set(bad), Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("upstream.connections_per_endpoint"), "{bad}: {err}");
        }
        Ok(())
    }

    #[test]
    fn zero_timeouts_are_refused() {
        for (key, line) in [
            (
                "tls.handshake_timeout_ms",
                ("  client_ca_file: ca.crt\n", "  client_ca_file: ca.crt\n  handshake_timeout_ms: 0\n"),
            ),
            (
                "upstream.connect_timeout_ms",
                ("  key_file: upstream-client.key\n", "  key_file: upstream-client.key\n  connect_timeout_ms: 0\n"),
            ),
        ] {
            let text = EXAMPLE.replace(line.0, line.1);
            assert_ne!(text, EXAMPLE, "{key}");
            let err = Config::parse(&text, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn issuer_names_are_plain() -> Result<(), ConfigError> {
        let set = |n: &str| {
            EXAMPLE.replace(
                "  client_ca_file: ca.crt\n",
                &format!("  client_ca_file: ca.crt\n  issuers: {{ {n}: x.crt }}\n"),
            )
        };
        let c = Config::parse(&set("etcd-ca_2"), Path::new("/etc/g/c.yaml"))?;
        assert_eq!(c.tls.issuers.get("etcd-ca_2"), Some(&PathBuf::from("/etc/g/x.crt")));
        for bad in ["Etcd", "\"a b\"", "\"\""] {
            let err = Config::parse(&set(bad), Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("tls.issuers"), "{bad}: {err}");
        }
        Ok(())
    }

    #[test]
    fn max_connections_has_a_default_and_cannot_be_zero() -> Result<(), ConfigError> {
        assert_eq!(Config::parse(EXAMPLE, Path::new("c.yaml"))?.limits.max_connections, 10_000);
        let set = |n: &str| format!("{EXAMPLE}\nlimits: {{ max_connections: {n} }}\n");
        assert_eq!(Config::parse(&set("3"), Path::new("c.yaml"))?.limits.max_connections, 3);
        let err = Config::parse(&set("0"), Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("limits.max_connections"), "{err}");
        let per_address = format!("{EXAMPLE}\nlimits: {{ max_handshakes_per_address: 0 }}\n");
        let err = Config::parse(&per_address, Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("limits.max_handshakes_per_address"), "{err}");
        assert_eq!(Config::parse(EXAMPLE, Path::new("c.yaml"))?.limits.max_handshakes_per_address, 64);
        let unread = |ms: &str| {
            Config::parse(&format!("{EXAMPLE}\nlimits: {{ unread_stream_timeout_ms: {ms} }}\n"), Path::new("c.yaml"))
        };
        let err = unread("999").map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("limits.unread_stream_timeout_ms"), "{err}");
        assert_eq!(unread("0")?.limits.unread_stream_timeout, None);
        let txn_ops =
            |n: &str| Config::parse(&format!("{EXAMPLE}\nlimits: {{ max_txn_ops: {n} }}\n"), Path::new("c.yaml"));
        assert!(txn_ops("0").map(|_| ()).unwrap_err().to_string().contains("limits.max_txn_ops"));
        assert_eq!(txn_ops("1024")?.limits.max_txn_ops, 1024);
        assert_eq!(Config::parse(EXAMPLE, Path::new("c.yaml"))?.limits.max_txn_ops, 128);
        assert_eq!(unread("1000")?.limits.unread_stream_timeout, Some(Duration::from_secs(1)));
        assert_eq!(
            Config::parse(EXAMPLE, Path::new("c.yaml"))?.limits.unread_stream_timeout,
            Some(Duration::from_secs(30))
        );
        Ok(())
    }

    #[test]
    fn worker_threads_default_to_the_runtime_and_are_bounded() -> Result<(), ConfigError> {
        assert_eq!(Config::parse(EXAMPLE, Path::new("c.yaml"))?.worker_threads, None);
        let set = |n: &str| format!("{EXAMPLE}\nworker_threads: {n}\n");
        assert_eq!(Config::parse(&set("1"), Path::new("c.yaml"))?.worker_threads, Some(1));
        for bad in ["0", "1025"] {
            let err = Config::parse(&set(bad), Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("worker_threads"), "{bad}: {err}");
        }
        Ok(())
    }

    #[test]
    fn parse_errors_name_the_file() {
        let err = |text: &str| Config::parse(text, Path::new("/etc/g/c.yaml")).err().map(|e| e.to_string());
        let empty = err("# nothing here yet\n\n").unwrap_or_default();
        assert!(empty.contains("/etc/g/c.yaml") && empty.contains("no settings"), "{empty}");
        let missing = err("listen: 5\n").unwrap_or_default();
        assert!(missing.contains("--> /etc/g/c.yaml:1:") && !missing.contains("<input>"), "{missing}");
    }

    #[test]
    fn values_that_would_refuse_everything_or_spin_are_refused() -> Result<(), ConfigError> {
        // EXAMPLE has an advertise_client_urls line of its own: replaced, not repeated.
        let with = |extra: &str| match extra.strip_prefix("advertise_client_urls: ") {
            Some(urls) => EXAMPLE.replace(r#"["https://127.0.0.1:23790"]"#, urls),
            None => format!("{EXAMPLE}\n{extra}\n"),
        };
        for (extra, key) in [
            ("limits: { max_concurrent_streams: 0 }", "limits.max_concurrent_streams"),
            ("limits: { max_concurrent_requests: 0 }", "limits.max_concurrent_requests"),
            ("reload_check_interval_ms: 1", "reload_check_interval_ms"),
            ("audit: { file: \"\" }", "audit.file"),
            ("advertise_client_urls: [\"foo\"]", "advertise_client_urls"),
            ("advertise_client_urls: [\"127.0.0.1:23790\"]", "advertise_client_urls"),
            ("advertise_client_urls: [\"http://x:1\"]", "advertise_client_urls"),
            ("advertise_client_urls: [\"https://x\"]", "advertise_client_urls"),
            ("advertise_client_urls: [\"https://x:1/v3\"]", "advertise_client_urls"),
        ] {
            let err = Config::parse(&with(extra), Path::new("c.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(key) && err.contains("must"), "{extra}: {err}");
        }
        for fine in [
            "reload_check_interval_ms: 0",
            "reload_check_interval_ms: 100",
            "limits: { max_concurrent_requests: 1 }",
            "advertise_client_urls: [\"https://etcd-guard.kube-system.svc:2379\", \"https://[::1]:2379/\"]",
        ] {
            Config::parse(&with(fine), Path::new("c.yaml"))?;
        }
        Ok(())
    }

    #[test]
    fn watch_coalescing_is_off_unless_asked_for() -> Result<(), ConfigError> {
        assert!(!Config::parse(EXAMPLE, Path::new("c.yaml"))?.watch.coalesce);
        let on = format!("{EXAMPLE}\nwatch: {{ coalesce: true }}\n");
        assert!(Config::parse(&on, Path::new("c.yaml"))?.watch.coalesce);
        let typo = format!("{EXAMPLE}\nwatch: {{ coalesced: true }}\n");
        assert!(Config::parse(&typo, Path::new("c.yaml")).is_err());
        Ok(())
    }
}
