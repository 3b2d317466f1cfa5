//! Test harness: a real etcd on loopback with certificates made for the test, and etcd-guard in front of it.
//!
//! Nothing here mocks etcd. Every process and port is local (127.0.0.1) and stopped when the harness is dropped.

#![forbid(unsafe_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_guard::certs::{DevCa, LeafKind};
use etcd_guard::config::Config;
use etcd_guard::runtime::Workers;
use etcd_guard::server::{Proxy, Running};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A policy for tests: an admin, a cilium-like identity scoped to `cilium/`, a reader of `/registry/` without
/// secrets, and a second scoped tenant.
pub const TEST_POLICY: &str = r#"
roles:
  - name: admin
    keys:
      - { prefix: "", access: readwrite }
    cluster: [admin]
  - name: cilium
    keys:
      - { prefix: "cilium/", access: readwrite }
    cluster: [status, lease]
  - name: tenant-b
    keys:
      - { prefix: "b/", access: readwrite }
    cluster: [status, lease]
  - name: monitoring
    keys:
      - { prefix: "/registry/", access: read }
    deny:
      - { prefix: "/registry/secrets/" }
    cluster: [status]
bindings:
  - role: admin
    subjects: [ { common_name: "admin" } ]
  - role: cilium
    subjects: [ { uri_san: "spiffe://cluster.local/ns/kube-system/sa/cilium" } ]
  - role: tenant-b
    subjects: [ { common_name: "tenant-b" } ]
  - role: monitoring
    subjects: [ { organization: "monitoring" } ]
"#;

/// Test certificates in a temporary folder.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
}

/// A client certificate written to disk.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The serial number, when the harness issued it (to revoke it in a CRL).
    pub serial: Vec<u8>,
}

/// A single etcd member on loopback.
pub struct Etcd {
    child: Child,
    pub client_url: String,
    /// Its unix socket, when it listens on one ([`Etcd::start_with_socket`]); [`Etcd::socket_url`] names it as the
    /// proxy's `unixs://` endpoint does.
    pub socket: Option<PathBuf>,
    /// Its `--listen-client-urls` and peer URL, to start it again with its data ([`Etcd::restart`]); `None` for a
    /// cluster's member.
    started: Option<(String, String)>,
    data: tempfile::TempDir,
}

/// etcd, with etcd-guard in front of it.
pub struct Harness {
    pub pki: Pki,
    pub etcd: Etcd,
    pub proxy: Option<Running>,
    pub proxy_addr: SocketAddr,
    /// The proxy's worker threads, when the configuration asks for them (stopped when the harness is dropped).
    _workers: Option<Workers>,
}

// === impl Pki ===

impl Pki {
    pub fn new() -> TestResult<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::new("etcd-guard test CA")?;
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())?;
        let local = ["localhost", "127.0.0.1"];
        let pki = Pki { dir, ca };
        pki.write_leaf("server", LeafKind::Server, "etcd-guard", None, &local, &[])?;
        pki.write_leaf("etcd-server", LeafKind::Both, "etcd", None, &local, &[])?;
        pki.write_leaf("upstream-client", LeafKind::Client, "etcd-guard", None, &[], &[])?;
        Ok(pki)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.crt")
    }

    fn write_leaf(
        &self,
        name: &str,
        kind: LeafKind,
        cn: &str,
        org: Option<&str>,
        sans: &[&str],
        uris: &[&str],
    ) -> TestResult<ClientCert> {
        let issued = self.ca.issue(kind, cn, org, sans, uris)?;
        let mut written = self.write_pair(name, &issued.cert_pem, &issued.key_pem)?;
        written.serial = issued.serial;
        Ok(written)
    }

    /// Write a certificate and key under `name`.
    pub fn write_pair(&self, name: &str, cert_pem: &str, key_pem: &str) -> TestResult<ClientCert> {
        let cert = self.path(&format!("{name}.crt"));
        let key = self.path(&format!("{name}.key"));
        std::fs::write(&cert, cert_pem)?;
        std::fs::write(&key, key_pem)?;
        Ok(ClientCert { cert, key, serial: Vec::new() })
    }

    /// `etcd-client` TLS options for `who`: the test CA, and `who`'s certificate and key.
    pub fn client_tls(&self, who: &ClientCert) -> TestResult<etcd_client::TlsOptions> {
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(self.ca_file())?))
            .identity(etcd_client::Identity::from_pem(std::fs::read(&who.cert)?, std::fs::read(&who.key)?)))
    }

    /// The proxy's own client certificate towards etcd (etcd's root user): for tests that ask etcd directly.
    pub fn upstream_client(&self) -> ClientCert {
        ClientCert { cert: self.path("upstream-client.crt"), key: self.path("upstream-client.key"), serial: Vec::new() }
    }

    /// An `etcd-client` connection to `url` (the proxy's or etcd's) as `who`, with a call timeout if given.
    pub async fn etcd_client(
        &self,
        url: &str,
        who: &ClientCert,
        timeout: Option<Duration>,
    ) -> TestResult<etcd_client::Client> {
        let mut opts = etcd_client::ConnectOptions::new().with_tls(self.client_tls(who)?);
        if let Some(timeout) = timeout {
            opts = opts.with_timeout(timeout);
        }
        Ok(etcd_client::Client::connect([url], Some(opts)).await?)
    }

    /// Issue a client certificate.
    pub fn client(&self, name: &str, cn: &str, org: Option<&str>, uris: &[&str]) -> TestResult<ClientCert> {
        self.write_leaf(name, LeafKind::Client, cn, org, &[], uris)
    }
}

/// Several etcd members forming one cluster on loopback; members can be stopped and started again.
pub struct EtcdCluster {
    pub members: Vec<Option<Etcd>>,
    pub client_urls: Vec<String>,
    peer_urls: Vec<String>,
    data: Vec<tempfile::TempDir>,
}

// === impl EtcdCluster ===

impl EtcdCluster {
    /// Start `n` members and wait until each answers. A port taken between [`free_port`] and a member's bind (by
    /// another test's etcd, whose outgoing connections use the same port range) starts the cluster again on new
    /// ports, as [`Etcd::start`] does.
    pub fn start(pki: &Pki, n: usize) -> TestResult<EtcdCluster> {
        on_new_ports_if_taken(|| EtcdCluster::start_once(pki, n))
    }

    fn start_once(pki: &Pki, n: usize) -> Result<EtcdCluster, StartFailed> {
        let mut client_urls = Vec::new();
        let mut peer_urls = Vec::new();
        let mut data = Vec::new();
        for _ in 0..n {
            client_urls.push(format!("https://127.0.0.1:{}", free_port()?));
            peer_urls.push(format!("http://127.0.0.1:{}", free_port()?));
            data.push(tempfile::tempdir()?);
        }
        let mut cluster = EtcdCluster { members: Vec::new(), client_urls, peer_urls, data };
        // Each member is held as an `Etcd` from its spawn on, so that a failed start stops every one (dropped).
        let mut started = Vec::new();
        for i in 0..n {
            let child = cluster.spawn(pki, i, "new")?;
            started.push(Etcd {
                child,
                client_url: cluster.client_urls[i].clone(),
                socket: None,
                started: None,
                data: tempfile::tempdir()?,
            });
        }
        for mut etcd in started {
            if let Err(e) = etcd.wait_ready(pki) {
                // The member that failed may be any of them: each one's log is looked at.
                let taken = cluster.data.iter().find_map(|d| port_taken(&d.path().join("etcd.log")));
                return Err(match taken {
                    Some(line) => StartFailed::PortTaken(line),
                    None => StartFailed::Other(format!("{e}; {}", cluster.logs_tail()).into()),
                });
            }
            cluster.members.push(Some(etcd));
        }
        Ok(cluster)
    }

    /// The last lines of every member's log, for an error message.
    fn logs_tail(&self) -> String {
        let mut out = String::new();
        for (i, d) in self.data.iter().enumerate() {
            let log = std::fs::read_to_string(d.path().join("etcd.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(3)..].join("\n");
            out.push_str(&format!("\nmember m{i}'s log ends with:\n{tail}"));
        }
        out
    }

    fn spawn(&self, pki: &Pki, i: usize, state: &str) -> TestResult<Child> {
        let initial: Vec<String> = self.peer_urls.iter().enumerate().map(|(j, u)| format!("m{j}={u}")).collect();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data[i].path().join("etcd.log"))?;
        let mut cmd = etcd_command(pki, &format!("m{i}"), &self.data[i].path().join("data"), &self.client_urls[i]);
        cmd.args(["--listen-peer-urls", &self.peer_urls[i], "--initial-advertise-peer-urls", &self.peer_urls[i]])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", state])
            .args(["--initial-cluster-token", "etcd-guard-test"])
            .stderr(log);
        Ok(cmd.spawn().map_err(|e| format!("starting etcd (is the etcd-server package installed?): {e}"))?)
    }

    /// Stop member `i`.
    pub fn kill(&mut self, i: usize) -> TestResult {
        if let Some(mut m) = self.members.get_mut(i).and_then(Option::take) {
            m.kill()?;
        }
        Ok(())
    }

    /// Stop member `i` as an operator's restart does (`SIGTERM`: etcd finishes the calls it took, turns new ones
    /// away with `GOAWAY`, and leaves the cluster's leadership to another member first).
    pub fn stop(&mut self, i: usize) -> TestResult {
        if let Some(mut m) = self.members.get_mut(i).and_then(Option::take) {
            m.stop()?;
        }
        Ok(())
    }

    /// Whether member `i` is running (started, not stopped, and not ended by itself).
    pub fn alive(&mut self, i: usize) -> TestResult<bool> {
        match self.members.get_mut(i).and_then(Option::as_mut) {
            Some(m) => Ok(m.child.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    /// Start member `i` again with its data.
    pub fn restart(&mut self, pki: &Pki, i: usize) -> TestResult {
        let child = self.spawn(pki, i, "existing")?;
        let mut etcd = Etcd {
            child,
            client_url: self.client_urls[i].clone(),
            socket: None,
            started: None,
            data: tempfile::tempdir()?,
        };
        etcd.wait_ready(pki)?;
        self.members[i] = Some(etcd);
        Ok(())
    }
}

/// A proxy in front of every member of `cluster`, probing them every 300 ms, with a metrics listener.
pub async fn proxy_in_front_of(pki: &Pki, cluster: &EtcdCluster) -> TestResult<Running> {
    std::fs::write(pki.path("policy.yaml"), TEST_POLICY)?;
    let endpoints: Vec<String> = cluster.client_urls.iter().map(|u| format!("\"{u}\"")).collect();
    let config = format!(
        r#"listen: "127.0.0.1:0"
tls: {{ cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt }}
upstream:
  endpoints: [{}]
  ca_file: ca.crt
  cert_file: upstream-client.crt
  key_file: upstream-client.key
  health_check_interval_ms: 300
policy_file: policy.yaml
metrics_listen: "127.0.0.1:0"
audit: {{ file: audit/audit.log }}
{}"#,
        endpoints.join(", "),
        watch_matrix("")
    );
    std::fs::write(pki.path("etcd-guard.yaml"), config)?;
    Ok(Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await?.spawn())
}

/// The folder of the `etcd` and `etcdctl` the tests run: `ETCD_GUARD_TEST_ETCD_DIR` (e.g. the etcd 3.5 of
/// `scripts/fetch-etcd-3.5.sh`), else whatever is on `PATH`. A variable of its own rather than `PATH`, which build
/// scripts watch (changing it would rebuild the tests).
pub fn etcd_tool(name: &str) -> PathBuf {
    match std::env::var_os("ETCD_GUARD_TEST_ETCD_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join(name),
        _ => PathBuf::from(name),
    }
}

/// The test matrix's watch section: `ETCD_GUARD_TEST_WATCH_COALESCE=1` runs every proxy the tests start with
/// `watch: { coalesce: true }` (docs/watch-coalescing.md), unless the test's own configuration `extra` already has
/// a `watch:` section. Appended to the configuration by [`Harness::with_config`] and by the tests that write a
/// configuration of their own.
pub fn watch_matrix(extra: &str) -> &'static str {
    let on = std::env::var("ETCD_GUARD_TEST_WATCH_COALESCE").is_ok_and(|v| v == "1");
    let has_watch = extra.lines().any(|l| l.trim_start().starts_with("watch:"));
    if on && !has_watch { "\nwatch: { coalesce: true }\n" } else { "" }
}

/// An etcd member serving clients over mutual TLS with the test certificates (peer flags are added by the caller).
fn etcd_command(pki: &Pki, name: &str, data_dir: &Path, client_url: &str) -> Command {
    etcd_listening(pki, name, data_dir, client_url, client_url)
}

/// [`etcd_command`], listening on `listen` (comma-separated URLs) and advertising `client_url`.
fn etcd_listening(pki: &Pki, name: &str, data_dir: &Path, client_url: &str, listen: &str) -> Command {
    let mut cmd = Command::new(etcd_tool("etcd"));
    cmd.args(["--name", name])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen-client-urls", listen, "--advertise-client-urls", client_url])
        .arg("--cert-file")
        .arg(pki.path("etcd-server.crt"))
        .arg("--key-file")
        .arg(pki.path("etcd-server.key"))
        .arg("--trusted-ca-file")
        .arg(pki.ca_file())
        .arg("--client-cert-auth")
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null());
    cmd
}

// === impl Etcd ===

/// Why one attempt to start etcd failed.
enum StartFailed {
    /// A port chosen as free was taken before etcd bound it (the log line says which).
    PortTaken(String),
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for StartFailed {
    fn from(e: E) -> StartFailed {
        StartFailed::Other(e.into())
    }
}

/// A free loopback port (the listener is dropped right away; good enough for tests on one machine).
///
/// Ports are taken below the kernel's ephemeral range (`ip_local_port_range`), which outgoing connections use: an
/// etcd member's port picked there could be taken by another member's connection while it restarts. A port is
/// handed out once per test process, and each process starts at its own place in the range.
pub fn free_port() -> TestResult<u16> {
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    const LOW: u16 = 10_000;
    // A kernel whose ephemeral range starts this low leaves no room below it: the ports above 10,000 then.
    let high = match ephemeral_low() {
        low if low > LOW + 1_000 => low,
        _ => u16::MAX,
    };
    let mut next = NEXT.lock().map_err(|_| "free_port: lock poisoned")?;
    let span = u32::from(high - LOW);
    let mut port = next.unwrap_or(LOW + (std::process::id().wrapping_mul(7_919) % span) as u16);
    for _ in 0..span {
        port = if port + 1 >= high { LOW } else { port + 1 };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            *next = Some(port);
            return Ok(port);
        }
    }
    Err("free_port: no free port below the ephemeral range".into())
}

/// The first port of the kernel's ephemeral range (Linux's default if it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

/// `start` again (it picks new ports) while a port it picked was taken before etcd bound it; three attempts.
fn on_new_ports_if_taken<T>(mut start: impl FnMut() -> Result<T, StartFailed>) -> TestResult<T> {
    let mut attempt = 1;
    loop {
        match start() {
            Err(StartFailed::PortTaken(log)) if attempt < 3 => {
                eprintln!("etcd could not bind a free port (attempt {attempt}), trying others: {log}");
                attempt += 1;
            }
            Err(StartFailed::PortTaken(log)) => return Err(format!("etcd could not bind its ports: {log}").into()),
            Err(StartFailed::Other(e)) => return Err(e),
            Ok(started) => return Ok(started),
        }
    }
}

/// The line of an etcd log that says a port was taken, if there is one.
fn port_taken(log: &Path) -> Option<String> {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    log.lines().find(|l| l.contains("address already in use")).map(str::to_string)
}

impl Etcd {
    /// Start etcd with mutual TLS on its client port (client certificates required), waiting until it answers.
    /// A port taken between [`free_port`] and etcd's bind (by another test's process) is retried with new ports.
    pub fn start(pki: &Pki) -> TestResult<Etcd> {
        on_new_ports_if_taken(|| Etcd::start_once(pki, false))
    }

    /// [`Etcd::start`], with etcd also serving its clients on a unix socket (`unixs://`, mutual TLS as on its
    /// port) in its data folder: [`Etcd::socket_url`].
    pub fn start_with_socket(pki: &Pki) -> TestResult<Etcd> {
        on_new_ports_if_taken(|| Etcd::start_once(pki, true))
    }

    fn start_once(pki: &Pki, socket: bool) -> Result<Etcd, StartFailed> {
        let data = tempfile::tempdir()?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("https://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        // etcd makes the socket of `unixs://localhost:<port>` as `localhost:<port>` in its working folder.
        let listen = match socket {
            true => format!("{client_url},unixs://localhost:{client_port}"),
            false => client_url.clone(),
        };
        let socket = socket.then(|| data.path().join(format!("localhost:{client_port}")));
        let child = Etcd::spawn(pki, data.path(), &client_url, &listen, &peer_url)?;
        let log_path = data.path().join("etcd.log");
        let started = Some((listen, peer_url));
        let mut etcd = Etcd { child, client_url, socket, started, data };
        match etcd.wait_ready(pki) {
            Ok(()) => Ok(etcd),
            Err(e) => match port_taken(&log_path) {
                Some(line) => Err(StartFailed::PortTaken(line)),
                None => Err(StartFailed::Other(e)),
            },
        }
    }

    /// etcd with its data and log in `dir` (its working folder), listening on `listen`.
    fn spawn(pki: &Pki, dir: &Path, client_url: &str, listen: &str, peer_url: &str) -> TestResult<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log"))?;
        let child = etcd_listening(pki, "guard-test", &dir.join("data"), client_url, listen)
            .current_dir(dir)
            .args(["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("guard-test={peer_url}")])
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting etcd (is the etcd-server package installed?): {e}"))?;
        Ok(child)
    }

    /// Its socket as the proxy's endpoint names it (`unixs://localhost/<path>`: etcd's certificate names
    /// `localhost`), when it listens on one.
    pub fn socket_url(&self) -> Option<String> {
        self.socket.as_ref().map(|path| format!("unixs://localhost{}", path.display()))
    }

    /// Start a stopped etcd again with its data, on the same port (and socket), and wait until it answers. A socket
    /// left behind by a killed etcd is removed first: etcd 3.4 would not start (`bind: address already in use`).
    pub fn restart(&mut self, pki: &Pki) -> TestResult {
        let (listen, peer_url) = self.started.clone().ok_or("only a single etcd of its own can be restarted")?;
        if let Some(socket) = &self.socket {
            match std::fs::remove_file(socket) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        self.child = Etcd::spawn(pki, self.data.path(), &self.client_url, &listen, &peer_url)?;
        self.wait_ready(pki)
    }

    fn wait_ready(&mut self, pki: &Pki) -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        let admin = pki.write_leaf("etcd-probe", LeafKind::Client, "root", None, &[], &[])?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("etcd exited early: {status}").into());
            }
            let out = etcdctl_at(&self.client_url, &pki.ca_file(), &admin, &["endpoint", "health"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("etcd did not become healthy: {}", String::from_utf8_lossy(&out.stderr)).into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Etcd {
    /// Stop etcd now (the data folder stays until the harness is dropped).
    pub fn kill(&mut self) -> TestResult {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Stop etcd gracefully (`SIGTERM`) and wait until it has ended.
    pub fn stop(&mut self) -> TestResult {
        self.signal("TERM")?;
        self.child.wait()?;
        Ok(())
    }

    /// Freeze etcd (`SIGSTOP`): its connections stay open and nothing is answered until [`Etcd::resume`].
    ///
    /// Returns once every thread of etcd has stopped. `kill` returns before that: the kernel wakes one thread to
    /// take the signal, and that thread stops the others, so on a loaded machine etcd's other threads can go on
    /// answering for milliseconds after the signal was sent.
    pub fn pause(&self) -> TestResult {
        self.signal("STOP")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(self.child.id())? {
            if Instant::now() > deadline {
                return Err(format!("etcd ({}) did not stop within 10 s of SIGSTOP", self.child.id()).into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Let a paused etcd go on (`SIGCONT`).
    pub fn resume(&self) -> TestResult {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> TestResult {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status()?;
        if !status.success() {
            return Err(format!("kill -{name} {}: {status}", self.child.id()).into());
        }
        Ok(())
    }
}

/// Whether every thread of process `pid` is stopped by a signal (state `T` in `/proc/PID/task/TID/stat`, or `t`
/// under a tracer); an error if the process has exited.
fn all_threads_stopped(pid: u32) -> TestResult<bool> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended between the listing and the read is not running either.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else { continue };
        // `PID (COMM) STATE ...`: COMM may hold spaces and parentheses, so the state follows the last `)`.
        match stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) {
            Some("T" | "t") => {}
            Some("Z" | "X") => return Err(format!("etcd ({pid}) has exited").into()),
            _ => return Ok(false),
        }
    }
    Ok(true)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run etcdctl (API v3) against `endpoint` with a client certificate.
pub fn etcdctl_at(endpoint: &str, ca: &Path, client: &ClientCert, args: &[&str]) -> TestResult<Output> {
    etcdctl_stdin(endpoint, ca, client, args, None)
}

/// Run etcdctl with text on its standard input (for `txn`).
pub fn etcdctl_stdin(
    endpoint: &str,
    ca: &Path,
    client: &ClientCert,
    args: &[&str],
    stdin: Option<&str>,
) -> TestResult<Output> {
    use std::io::Write;
    let mut cmd = Command::new(etcd_tool("etcdctl"));
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg(format!("--cacert={}", ca.display()))
        .arg(format!("--cert={}", client.cert.display()))
        .arg(format!("--key={}", client.key.display()))
        .args(["--dial-timeout=5s", "--command-timeout=10s"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| format!("running etcdctl (is etcd-client installed?): {e}"))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

// === impl Harness ===

impl Harness {
    /// etcd plus etcd-guard with [`TEST_POLICY`].
    pub async fn start() -> TestResult<Harness> {
        Harness::with_policy(TEST_POLICY).await
    }

    pub async fn with_policy(policy: &str) -> TestResult<Harness> {
        Harness::with_config(policy, "audit: { file: audit/audit.log }\n").await
    }

    /// etcd plus etcd-guard with `policy` and `extra` appended to the configuration (e.g. an `audit:` section),
    /// and [`watch_matrix`]'s section.
    pub async fn with_config(policy: &str, extra: &str) -> TestResult<Harness> {
        Harness::build(policy, extra, false).await
    }

    /// [`Harness::with_config`], with the proxy reaching etcd over etcd's unix socket (a `unixs://` endpoint).
    pub async fn over_socket(policy: &str, extra: &str) -> TestResult<Harness> {
        Harness::build(policy, extra, true).await
    }

    async fn build(policy: &str, extra: &str, over_socket: bool) -> TestResult<Harness> {
        let pki = Pki::new()?;
        let etcd = if over_socket { Etcd::start_with_socket(&pki)? } else { Etcd::start(&pki)? };
        let upstream = etcd.socket_url().unwrap_or_else(|| etcd.client_url.clone());
        std::fs::write(pki.path("policy.yaml"), policy)?;
        let config_text = format!(
            r#"
listen: "127.0.0.1:0"
tls:
  cert_file: server.crt
  key_file: server.key
  client_ca_file: ca.crt
upstream:
  endpoints: ["{}"]
  ca_file: ca.crt
  cert_file: upstream-client.crt
  key_file: upstream-client.key
policy_file: policy.yaml
advertise_client_urls: ["https://127.0.0.1:23790"]
metrics_listen: "127.0.0.1:0"
{}{}"#,
            upstream,
            extra,
            watch_matrix(extra)
        );
        let config_path = pki.path("etcd-guard.yaml");
        std::fs::write(&config_path, config_text)?;
        let config = Config::load(&config_path)?;
        // `worker_threads` in `extra`: connections are served on worker threads, as by the binary; else on the
        // test's runtime.
        let workers = config.worker_threads.map(Workers::start).transpose()?;
        let handles = workers.as_ref().map(Workers::handles).unwrap_or_default();
        let proxy = Proxy::bind_with_workers(&config, handles).await?.spawn();
        let proxy_addr = proxy.local_addr;
        Ok(Harness { pki, etcd, proxy: Some(proxy), proxy_addr, _workers: workers })
    }

    /// The `/metrics`, `/healthz`, `/readyz` listener.
    pub fn metrics_url(&self) -> String {
        let addr = self.proxy.as_ref().and_then(|p| p.metrics_addr);
        format!("http://{}", addr.map(|a| a.to_string()).unwrap_or_default())
    }

    /// Where the test configuration's audit log goes.
    pub fn audit_dir(&self) -> PathBuf {
        self.pki.path("audit")
    }

    /// Stop the proxy and write every queued audit record.
    pub async fn stop_proxy(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.stop().await;
        }
    }

    pub fn proxy_url(&self) -> String {
        format!("https://{}", self.proxy_addr)
    }

    /// etcdctl through the proxy.
    pub fn ctl(&self, client: &ClientCert, args: &[&str]) -> TestResult<Output> {
        etcdctl_at(&self.proxy_url(), &self.pki.ca_file(), client, args)
    }

    /// etcdctl straight to etcd (as the proxy's own upstream identity).
    pub fn ctl_direct(&self, args: &[&str]) -> TestResult<Output> {
        let upstream = self.pki.upstream_client();
        etcdctl_at(&self.etcd.client_url, &self.pki.ca_file(), &upstream, args)
    }

    /// An `etcd-client` connection through the proxy.
    pub async fn client(&self, cert: &ClientCert) -> TestResult<etcd_client::Client> {
        let tls = self.pki.client_tls(cert)?;
        let opts = etcd_client::ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        Ok(etcd_client::Client::connect([self.proxy_url()], Some(opts)).await?)
    }

    /// An `etcd-client` connection straight to etcd (the proxy's upstream certificate), for reference answers. No
    /// call timeout: its watches may last the whole test.
    pub async fn client_direct(&self) -> TestResult<etcd_client::Client> {
        let upstream = self.pki.upstream_client();
        let tls = self.pki.client_tls(&upstream)?;
        let opts = etcd_client::ConnectOptions::new().with_tls(tls).with_connect_timeout(Duration::from_secs(5));
        Ok(etcd_client::Client::connect([self.etcd.client_url.clone()], Some(opts)).await?)
    }

    pub fn admin(&self) -> TestResult<ClientCert> {
        self.pki.client("admin", "admin", None, &[])
    }

    pub fn cilium(&self) -> TestResult<ClientCert> {
        self.pki.client("cilium", "cilium-agent", None, &["spiffe://cluster.local/ns/kube-system/sa/cilium"])
    }

    pub fn tenant_b(&self) -> TestResult<ClientCert> {
        self.pki.client("tenant-b", "tenant-b", None, &[])
    }

    pub fn nobody(&self) -> TestResult<ClientCert> {
        self.pki.client("nobody", "nobody", None, &[])
    }
}

/// `message` as one gRPC frame: uncompressed, its 4-byte length, its bytes (which need not be a valid message).
pub fn grpc_frame(message: &[u8]) -> bytes::Bytes {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(message);
    framed.into()
}

/// `msg` encoded, as one gRPC frame.
pub fn grpc_message(msg: &impl prost::Message) -> bytes::Bytes {
    grpc_frame(&msg.encode_to_vec())
}

/// A gRPC call of `method` (its full path, e.g. `methods::KV_RANGE`) with `body`, for a [`BareH2`] connection.
pub fn grpc_request(method: &str, body: tonic::body::Body) -> TestResult<http::Request<tonic::body::Body>> {
    Ok(http::Request::post(format!("https://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)?)
}

/// A bare HTTP/2 connection to the proxy. Unlike tonic's `Channel` it does not enforce `grpc-timeout` itself, so
/// whatever answer comes back was decided on the far side.
#[derive(Clone)]
pub struct BareH2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

pub type H2Future = Pin<Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for BareH2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = H2Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> H2Future {
        Box::pin(self.0.send_request(req))
    }
}

pub async fn bare_h2(h: &Harness, who: &ClientCert, ping_every: Option<Duration>) -> TestResult<BareH2> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(h.pki.ca_file())? {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(&who.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&who.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(h.proxy_addr).await?;
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost")?, tcp).await?;
    let mut builder = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.timer(hyper_util::rt::TokioTimer::new());
    if let Some(every) = ping_every {
        builder.keep_alive_interval(every).keep_alive_timeout(Duration::from_secs(5)).keep_alive_while_idle(true);
    }
    let (send, conn) = builder.handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(BareH2(send))
}

/// The proxy binary serving in front of `etcd` as a process of its own (to send it signals): `bin` is the test
/// crate's `guard-under-test` (`env!("CARGO_BIN_EXE_guard-under-test")`, which only tests see), with `policy`,
/// auditing to `audit/audit.log` (unless `extra` has an `audit:` section of its own), metrics on a port of its
/// own and `extra` configuration lines. Returns once both listeners accept connections.
pub fn proxy_process(bin: &str, pki: &Pki, etcd: &Etcd, policy: &str, extra: &str) -> TestResult<ProxyProcess> {
    let (port, metrics_port) = (free_port()?, free_port()?);
    let audit = if extra.lines().any(|l| l.starts_with("audit:")) { "" } else { "audit: { file: audit/audit.log }\n" };
    std::fs::write(pki.path("policy.yaml"), policy)?;
    std::fs::write(
        pki.path("etcd-guard.yaml"),
        format!(
            r#"listen: "127.0.0.1:{port}"
tls: {{ cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt }}
upstream: {{ endpoints: ["{}"], ca_file: ca.crt, cert_file: upstream-client.crt, key_file: upstream-client.key }}
policy_file: policy.yaml
{audit}metrics_listen: "127.0.0.1:{metrics_port}"
{extra}{}"#,
            etcd.client_url,
            watch_matrix("")
        ),
    )?;
    let log = std::fs::File::create(pki.path("proxy.log"))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(pki.path("etcd-guard.yaml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let addr = format!("127.0.0.1:{port}");
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let mut proxy = ProxyProcess { child, addr, metrics_addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&proxy.addr).is_err() || std::net::TcpStream::connect(metrics_addr).is_err() {
        if Instant::now() > deadline || proxy.child.try_wait()?.is_some() {
            let log = std::fs::read_to_string(pki.path("proxy.log")).unwrap_or_default();
            return Err(format!("proxy did not start: {log}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(proxy)
}

/// A proxy started by [`proxy_process`]; killed (if still running) and reaped when dropped, so a failing test does
/// not leave it behind.
pub struct ProxyProcess {
    pub child: Child,
    /// `127.0.0.1:port` of its client listener.
    pub addr: String,
    pub metrics_addr: SocketAddr,
}

impl ProxyProcess {
    /// Send the proxy `signal` (`"TERM"`, `"HUP"`, …).
    pub fn signal(&self, signal: &str) -> TestResult {
        let sent = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status()?;
        if !sent.success() {
            return Err(format!("kill -{signal}: {sent}").into());
        }
        Ok(())
    }

    /// Wait (at most `limit`) for the proxy to exit; killed if it does not.
    pub fn wait_exit(&mut self, limit: Duration) -> TestResult<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(format!("the proxy did not exit within {limit:?}").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET (for the metrics listener): `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> TestResult<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Text of a process's stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Text of a process's stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
