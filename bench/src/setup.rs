//! Everything the benchmark starts: certificates, etcd, the proxy (as separate processes), policies and the
//! proxy's configuration. Every child process is held by a [`ChildGuard`] that kills it when dropped, so nothing
//! outlives the benchmark, also on error.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_guard::certs::{DevCa, LeafKind};
use etcd_guard_proto::etcdserverpb::{self as pb, kv_client::KvClient};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::BoxError;
use crate::load::{self, LIN_KEY, LIN_VALUE, MIX_KEYS, MIX_PREFIX, SMALL_VALUE};

/// Common name of the benchmark's client certificate (`bench.crt`), bound in every generated policy.
pub const BENCH_CN: &str = "bench";

/// Common name of the scoped client certificate (`bench-scoped.crt`): read and write on `/bench/` and leases only
/// (in the small policy), as kube-apiserver's shipped policy grants its prefix. The leased-put workload runs as it.
pub const SCOPED_CN: &str = "bench-scoped";

/// A child process, killed and reaped when dropped.
pub struct ChildGuard {
    name: String,
    child: Child,
}

impl ChildGuard {
    /// Take charge of a started child.
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard { name: name.to_string(), child }
    }

    /// The process id, as `/proc` names it.
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// An error if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait()? {
            Some(status) => Err(format!("{} exited: {status}", self.name).into()),
            None => Ok(()),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Files of the benchmark's PKI, all in one folder.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Generate a CA and every certificate the benchmark needs into `dir`.
    pub fn generate(dir: &Path) -> Result<Pki, BoxError> {
        let ca = DevCa::new("etcd-guard bench CA")?;
        std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
        let local = ["localhost", "127.0.0.1"];
        let leaves: [(&str, LeafKind, &str, &[&str]); 5] = [
            ("server", LeafKind::Server, "etcd-guard", &local),
            ("etcd-server", LeafKind::Both, "etcd", &local),
            ("upstream-client", LeafKind::Client, "etcd-guard", &[]),
            ("bench", LeafKind::Client, BENCH_CN, &[]),
            ("bench-scoped", LeafKind::Client, SCOPED_CN, &[]),
        ];
        for (name, kind, cn, sans) in leaves {
            let issued = ca.issue(kind, cn, None, sans, &[])?;
            std::fs::write(dir.join(format!("{name}.crt")), issued.cert_pem)?;
            std::fs::write(dir.join(format!("{name}.key")), issued.key_pem)?;
        }
        // `etcd grpc-proxy` refuses a client certificate with a common name for its upstream leg (so that etcd's
        // own authentication would not take it for a user): one with an empty subject.
        let issued = ca.issue_with(LeafKind::Client, "", None, &[], &[], |params| {
            params.distinguished_name = rcgen::DistinguishedName::new();
        })?;
        std::fs::write(dir.join("grpc-proxy-client.crt"), issued.cert_pem)?;
        std::fs::write(dir.join("grpc-proxy-client.key"), issued.key_pem)?;
        Ok(Pki { dir: dir.to_path_buf() })
    }

    /// A file of the PKI folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The `--ca/--cert/--key` arguments of the load generator for `workload`: the scoped identity for the
    /// leased-put workload, the bench identity for the others.
    pub fn load_args(&self, workload: load::Workload) -> Vec<String> {
        let name = if workload == load::Workload::LeasedPut { "bench-scoped" } else { "bench" };
        vec![
            "--ca".into(),
            self.path("ca.crt").display().to_string(),
            "--cert".into(),
            self.path(&format!("{name}.crt")).display().to_string(),
            "--key".into(),
            self.path(&format!("{name}.key")).display().to_string(),
        ]
    }

    /// A connection to `url` as the bench identity.
    pub async fn connect(&self, url: &str) -> Result<Channel, BoxError> {
        let endpoint = load::tls_endpoint(url, &self.path("ca.crt"), &self.path("bench.crt"), &self.path("bench.key"))?;
        Ok(endpoint.connect().await?)
    }
}

/// A free loopback port (the listener is dropped right away; good enough on one machine).
pub fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Wait until a Range through `url` succeeds, or the process exits, or `limit` passes.
async fn wait_ready(pki: &Pki, url: &str, guard: &mut ChildGuard, log: &Path, limit: Duration) -> Result<(), BoxError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Err(e) = guard.check_alive() {
            return Err(format!("{e}; last lines of {}:\n{}", log.display(), log_tail(log)).into());
        }
        let attempt = async {
            let channel = pki.connect(url).await?;
            KvClient::new(channel).range(pb::RangeRequest { key: LIN_KEY.to_vec(), ..Default::default() }).await?;
            Ok::<(), BoxError>(())
        };
        let last = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 5 s".to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{url} did not answer within {limit:?}: {last}; log {}:\n{}",
                log.display(),
                log_tail(log)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One etcd member on loopback with mutual TLS on its client port.
pub struct Etcd {
    pub guard: ChildGuard,
    pub url: String,
    /// The same client port as a unix socket, as the proxy names it (`unixs://localhost/<path>`).
    pub socket_url: String,
}

impl Etcd {
    /// Start etcd with its data in `dir/etcd-data`, client certificates required, and wait until it answers.
    pub async fn start(bin: &Path, pki: &Pki) -> Result<Etcd, BoxError> {
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let url = format!("https://127.0.0.1:{client_port}");
        // etcd makes its unix socket `localhost:<port>` in its working folder.
        let socket_url = format!("unixs://localhost{}", pki.path(&format!("localhost:{client_port}")).display());
        let listen = format!("{url},unixs://localhost:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = pki.path("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin)
            .current_dir(pki.path(""))
            .args(["--name", "bench"])
            .arg("--data-dir")
            .arg(pki.path("etcd-data"))
            .args(["--listen-client-urls", &listen, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .arg("--cert-file")
            .arg(pki.path("etcd-server.crt"))
            .arg("--key-file")
            .arg(pki.path("etcd-server.key"))
            .arg("--trusted-ca-file")
            .arg(pki.path("ca.crt"))
            .arg("--client-cert-auth")
            .args(["--quota-backend-bytes", "4294967296"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {} (is the etcd-server package installed?): {e}", bin.display()))?;
        let mut guard = ChildGuard::new("etcd", child);
        wait_ready(pki, &url, &mut guard, &log_path, Duration::from_secs(30)).await?;
        Ok(Etcd { guard, url, socket_url })
    }
}

/// How the proxy's configuration treats auditing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditConfig {
    /// `audit: { file: <dir>/audit-<name>/audit.log, max_files: 2 }` (a folder per proxy: one writer per folder).
    On,
    /// `audit: { enabled: false }`.
    Off,
    /// No `audit` section (for a proxy whose configuration does not know the section yet).
    Omitted,
}

/// What goes into each generated proxy configuration besides listeners, TLS, upstream and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProxyOptions {
    pub audit: AuditConfig,
    /// Write `metrics_listen: "127.0.0.1:<free port>"` (for builds that have a metrics listener, which is on by
    /// default on a fixed port: two proxies at once would collide).
    pub metrics_listen: bool,
    /// `audit.answer_after` (with auditing on); `None`: left out (the proxy's default, `queued`).
    pub answer_after: Option<&'static str>,
    /// `watch: { coalesce: true }` (identical watches share one upstream watch); `false`: left out (off).
    pub coalesce_watches: bool,
}

/// An etcd-guard process started from its binary with a generated configuration.
pub struct ProxyProcess {
    pub guard: ChildGuard,
    pub url: String,
}

/// Write the configuration of proxy instance `name` (listening on `port`) and return its path.
pub fn write_proxy_config(
    pki: &Pki,
    name: &str,
    port: u16,
    etcd_url: &str,
    policy_file: &str,
    options: ProxyOptions,
) -> Result<PathBuf, BoxError> {
    let metrics = if options.metrics_listen {
        format!("metrics_listen: \"127.0.0.1:{}\"\n", free_port()?)
    } else {
        String::new()
    };
    let audit_section = match options.audit {
        AuditConfig::On => {
            let when = options.answer_after.map(|when| format!(", answer_after: {when}")).unwrap_or_default();
            format!("audit: {{ file: audit-{name}/audit.log, max_files: 2{when} }}\n")
        }
        AuditConfig::Off => "audit: { enabled: false }\n".to_string(),
        AuditConfig::Omitted => String::new(),
    };
    let watch_section = if options.coalesce_watches { "watch: { coalesce: true }\n" } else { "" };
    // The proxy's worker threads: `ETCD_GUARD_BENCH_PROXY_THREADS` (builds before the `worker_threads` key read
    // tokio's `TOKIO_WORKER_THREADS`, which is set too).
    let workers = match std::env::var("ETCD_GUARD_BENCH_PROXY_THREADS") {
        Ok(n) => format!("worker_threads: {}\n", n.trim()),
        Err(_) => String::new(),
    };
    let text = format!(
        r#"# Generated by etcd-guard-bench.
listen: "127.0.0.1:{port}"
tls:
  cert_file: server.crt
  key_file: server.key
  client_ca_file: ca.crt
upstream:
  endpoints: ["{etcd_url}"]
  ca_file: ca.crt
  cert_file: upstream-client.crt
  key_file: upstream-client.key
policy_file: {policy_file}
{metrics}{audit_section}{watch_section}{workers}"#
    );
    let path = pki.path(&format!("proxy-{name}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `etcd-guard config check --config <path>`: `Ok(())` if the proxy accepts the configuration, else its message.
pub fn config_check(bin: &Path, config: &Path) -> Result<(), String> {
    let out = Command::new(bin)
        .args(["config", "check", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if message.is_empty() {
            message = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        Err(message)
    }
}

impl ProxyProcess {
    /// Start `bin serve --config <generated>` and wait until a Range through it succeeds.
    pub async fn start(
        bin: &Path,
        pki: &Pki,
        name: &str,
        etcd_url: &str,
        policy_file: &str,
        options: ProxyOptions,
    ) -> Result<ProxyProcess, BoxError> {
        let port = free_port()?;
        let config = write_proxy_config(pki, name, port, etcd_url, policy_file, options)?;
        let log_path = pki.path(&format!("proxy-{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            // The proxy's log filter: `ETCD_GUARD_BENCH_PROXY_LOG` (e.g. `info,h2=debug`), else `info`.
            .env("RUST_LOG", std::env::var("ETCD_GUARD_BENCH_PROXY_LOG").unwrap_or_else(|_| "info".into()));
        // The proxy's runtime threads for builds before `worker_threads` (tokio's own variable), for the proxy
        // only: not the load generator's.
        if let Ok(threads) = std::env::var("ETCD_GUARD_BENCH_PROXY_THREADS") {
            command.env("TOKIO_WORKER_THREADS", threads);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut guard = ChildGuard::new(&format!("etcd-guard ({name})"), child);
        let url = format!("https://127.0.0.1:{port}");
        // A large policy takes a while to load.
        wait_ready(pki, &url, &mut guard, &log_path, Duration::from_secs(120)).await?;
        Ok(ProxyProcess { guard, url })
    }
}

/// `etcd grpc-proxy start` (the proxy etcd ships, issue #5's reference), mutual TLS on both legs: it serves the
/// benchmark's server certificate, requires and verifies the client's (given `--trusted-ca-file`, whatever its
/// log's `client-cert-auth = false` says), and reaches etcd with a client certificate of its own (one with an
/// empty subject, which it insists on). Data (nothing but its own folder) in `dir/grpc-proxy-data`.
pub async fn start_grpc_proxy(etcd_bin: &Path, pki: &Pki, etcd_url: &str) -> Result<ProxyProcess, BoxError> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let log_path = pki.path("grpc-proxy.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new(etcd_bin);
    command
        .current_dir(pki.path(""))
        .args(["grpc-proxy", "start", "--listen-addr", &listen, "--advertise-client-url", &listen])
        .args(["--endpoints", etcd_url]);
    let files = [
        ("--data-dir", "grpc-proxy-data"),
        // Upstream: etcd's CA, the client certificate without a common name.
        ("--cacert", "ca.crt"),
        ("--cert", "grpc-proxy-client.crt"),
        ("--key", "grpc-proxy-client.key"),
        // Clients: the same server certificate as etcd-guard's.
        ("--trusted-ca-file", "ca.crt"),
        ("--cert-file", "server.crt"),
        ("--key-file", "server.key"),
    ];
    for (flag, file) in files {
        command.arg(flag).arg(pki.path(file));
    }
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {} grpc-proxy: {e}", etcd_bin.display()))?;
    let mut guard = ChildGuard::new("etcd grpc-proxy", child);
    let url = format!("https://{listen}");
    wait_ready(pki, &url, &mut guard, &log_path, Duration::from_secs(30)).await?;
    Ok(ProxyProcess { guard, url })
}

/// The policy of the main cases: the bench identity may read and write every key and has every cluster
/// capability.
pub const SMALL_POLICY: &str = r#"# Generated by etcd-guard-bench.
roles:
  - name: bench
    keys:
      - { prefix: "", access: readwrite }
    cluster: [admin]
  - name: bench-scoped
    keys:
      - { prefix: "/bench/", access: readwrite }
    cluster: [lease]
bindings:
  - role: bench
    subjects: [ { common_name: "bench" } ]
  - role: bench-scoped
    subjects: [ { common_name: "bench-scoped" } ]
"#;

/// A policy of `roles` roles and bindings with `rules_per_role` key rules each (prefixes, single keys and
/// ranges, every access kind). Role number `roles / 2 + 7` is bound to the bench identity and also grants
/// read and write on `/bench/`; every other role is bound to its own common name and a SPIFFE pattern.
pub fn large_policy(roles: usize, rules_per_role: usize) -> String {
    let bench_role = roles / 2 + 7;
    let mut out = String::with_capacity(roles * rules_per_role * 64 + roles * 160);
    out.push_str("# Generated by etcd-guard-bench: a policy-scale test.\nroles:\n");
    let access = ["read", "write", "readwrite"];
    for r in 0..roles {
        let _ = writeln!(out, "  - name: tenant-{r:05}\n    keys:");
        for j in 0..rules_per_role {
            let a = access[(r + j) % 3];
            let _ = match j % 3 {
                _ if r == bench_role && j == 0 => writeln!(out, "      - {{ prefix: \"/bench/\", access: readwrite }}"),
                0 => writeln!(out, "      - {{ prefix: \"/tenants/{r:05}/p{j}/\", access: {a} }}"),
                1 => writeln!(out, "      - {{ key: \"/tenants/{r:05}/k{j}\", access: {a} }}"),
                _ => writeln!(
                    out,
                    "      - {{ range: {{ from: \"/tenants/{r:05}/r{j}/a\", to: \"/tenants/{r:05}/r{j}/m\" }}, access: {a} }}"
                ),
            };
        }
        out.push_str("    cluster: [status]\n");
    }
    out.push_str("bindings:\n");
    for r in 0..roles {
        if r == bench_role {
            let _ = writeln!(out, "  - role: tenant-{r:05}\n    subjects: [ {{ common_name: \"{BENCH_CN}\" }} ]");
        } else {
            let _ = writeln!(
                out,
                "  - role: tenant-{r:05}\n    subjects: [ {{ common_name: \"svc-{r:05}\" }}, \
                 {{ uri_san: \"spiffe://cluster.local/ns/ns-{r:05}/sa/*\" }} ]"
            );
        }
    }
    out
}

/// Write the keys the workloads read: the 1 KiB key and the 10,000 keys of the mix.
pub async fn preload(channel: &Channel) -> Result<(), BoxError> {
    let mut kv = KvClient::new(channel.clone());
    kv.put(pb::PutRequest { key: LIN_KEY.to_vec(), value: vec![b'l'; LIN_VALUE], ..Default::default() }).await?;
    let mut tasks = JoinSet::new();
    let workers: u64 = 32;
    for w in 0..workers {
        let mut kv = kv.clone();
        tasks.spawn(async move {
            let mut i = w;
            while i < MIX_KEYS {
                let key = load::numbered_key(MIX_PREFIX, i);
                kv.put(pb::PutRequest { key, value: vec![b'm'; SMALL_VALUE], ..Default::default() }).await?;
                i += workers;
            }
            Ok::<(), tonic::Status>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

/// Compact etcd's history up to its current revision and wait until the compaction is applied, so that the
/// write-heavy workloads do not leave work behind for the next runs.
pub async fn compact(channel: &Channel) -> Result<(), BoxError> {
    let mut kv = KvClient::new(channel.clone());
    let head = kv.range(pb::RangeRequest { key: LIN_KEY.to_vec(), ..Default::default() }).await?.into_inner();
    let revision = head.header.map(|h| h.revision).unwrap_or(0);
    if revision > 1 {
        kv.compact(pb::CompactionRequest { revision, physical: true }).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_policy_has_the_requested_size() {
        let text = large_policy(30, 10);
        assert_eq!(text.matches("  - name: ").count(), 30);
        assert_eq!(text.matches("access: ").count(), 300);
        assert_eq!(text.matches("  - role: ").count(), 30);
        assert_eq!(text.matches(&format!("common_name: \"{BENCH_CN}\"")).count(), 1);
        assert_eq!(text.matches("prefix: \"/bench/\"").count(), 1);
    }

    #[test]
    fn generated_policies_are_accepted_by_the_proxy() -> Result<(), BoxError> {
        let small = etcd_guard::policy::PolicyDocument::parse(SMALL_POLICY, "small")?;
        assert_eq!(small.roles.len(), 2);
        let large = etcd_guard::policy::PolicyDocument::parse(&large_policy(30, 10), "large")?;
        assert_eq!(large.roles.len(), 30);
        assert_eq!(large.roles.iter().map(|r| r.keys.len()).sum::<usize>(), 300);
        Ok(())
    }
}
