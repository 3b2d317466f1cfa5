//! The command line: `serve`, `policy check`, `certs init`, `config check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use etcd_guard_proto::etcdserverpb as pb;

use crate::authz::{self, Need, Needs};
use crate::certs::{self, InitOptions};
use crate::config::Config;
use crate::identity::Identity;
use crate::policy::{Capability, CapabilitySet, Policy, unescape_key};
use crate::runtime::Workers;
use crate::server::Proxy;

/// An access-control proxy for etcd: mutual TLS identities, keyspace ACLs, etcd's own answers.
#[derive(Debug, Parser)]
#[command(name = "etcd-guard", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Review and verify audit logs.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Filter, print and summarise audit records.
    Review(crate::audit::review::ReviewArgs),
    /// Check the hash chain and sequence numbers; report the first record altered, removed or inserted.
    Verify(crate::audit::verify::VerifyArgs),
    /// Move the audit log to a new HMAC key (or key a log written without one), with the proxy stopped: a record
    /// under the new key goes on the chain, and the proxy then runs only with the new key (docs/audit.md).
    ChangeKey(ChangeKeyArgs),
}

#[derive(Debug, Args)]
struct ChangeKeyArgs {
    /// The proxy's configuration file: its `audit.file` is the log, its `audit.hmac_key_file` the key in use (none:
    /// a log written without a key).
    #[arg(long, short, env = "ETCD_GUARD_CONFIG")]
    config: PathBuf,
    /// The new key (a file of at least 16 bytes, e.g. `openssl rand -hex 32`); make it the configuration's
    /// `audit.hmac_key_file` before the proxy starts again.
    #[arg(long, value_name = "FILE")]
    new_key: PathBuf,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The configuration file (YAML).
    #[arg(long, short, env = "ETCD_GUARD_CONFIG")]
    config: PathBuf,
    /// Listen on this address instead of the file's `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Use this policy file instead of the file's `policy_file`.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// etcd endpoints instead of the file's `upstream.endpoints` (repeatable; https:// or unixs://).
    #[arg(long = "upstream", value_name = "URL")]
    upstream: Vec<String>,
    /// The health and metrics listener instead of the file's `metrics_listen` ("off" disables it).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Write the audit log here instead of the file's `audit.file` ("-" = standard output).
    #[arg(long, value_name = "FILE")]
    audit_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Decide one request for one identity, and say which role and rule decided it.
    /// Exits 0 on allow, 1 on deny, 3 on would-deny (only `audit-only` bindings match: served now, denied once
    /// they enforce), 2 on an error.
    Check(Box<CheckArgs>),
    /// List everything one identity is granted: the bindings that match it, its roles, the keys it may read and
    /// write (deny rules applied, ranges merged), its cluster capabilities and limits. Exits 0, or 2 on an error.
    Grants(Box<GrantsArgs>),
    /// Load a policy file and report the first problem in it, with its line.
    Validate {
        /// The policy file.
        policy: PathBuf,
    },
}

/// Who is asking, for `policy check` and `policy grants`: a certificate file, or its fields one by one.
#[derive(Debug, Args)]
struct IdentityArgs {
    /// A client certificate (PEM, the first certificate in the file; or DER): its CN, O, OU, DNS and URI SANs and
    /// fingerprint, read as the proxy reads them. Instead of the flags below but `--issuer`.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "common_name", "organization", "organizational_unit", "dns_san", "uri_san", "fingerprint_sha256",
    ])]
    cert: Option<PathBuf>,
    /// The client certificate's subject CN.
    #[arg(long)]
    common_name: Option<String>,
    /// A subject O (repeatable).
    #[arg(long)]
    organization: Vec<String>,
    /// A subject OU (repeatable).
    #[arg(long)]
    organizational_unit: Vec<String>,
    /// A DNS SAN (repeatable).
    #[arg(long)]
    dns_san: Vec<String>,
    /// A URI SAN such as a SPIFFE ID (repeatable).
    #[arg(long)]
    uri_san: Vec<String>,
    /// The certificate's SHA-256 fingerprint (hex).
    #[arg(long)]
    fingerprint_sha256: Option<String>,
    /// The name (in the proxy's `tls.issuers`) of a CA the certificate chains to (repeatable; the proxy learns
    /// these at the handshake, so they are given here also with `--cert`).
    #[arg(long)]
    issuer: Vec<String>,
}

#[derive(Debug, Args)]
struct GrantsArgs {
    /// The policy file.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    identity: IdentityArgs,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The policy file.
    #[arg(long)]
    policy: PathBuf,
    #[command(flatten)]
    identity: IdentityArgs,
    /// The RPC to decide.
    #[arg(long, value_enum)]
    rpc: Rpc,
    /// The key (for key RPCs; the name for lock/campaign/leader: the Lock and Election RPCs, which `etcdctl lock`
    /// and `etcdctl elect` do not use — they take KV transactions on keys under the name: check those as put and
    /// delete). `\xNN` escapes give any byte, `\\` a backslash.
    #[arg(long)]
    key: Option<String>,
    /// The range end, as etcd takes it (`\x00` = every key from `--key` on).
    #[arg(long, conflicts_with = "prefix")]
    range_end: Option<String>,
    /// Treat the key as a prefix (like `etcdctl --prefix`).
    #[arg(long)]
    prefix: bool,
    /// For put, delete and watch: also return the previous value (needs read too).
    #[arg(long)]
    prev_kv: bool,
}

/// RPCs `policy check` can decide (those that need a lease's attached keys need a live etcd and are not here).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Rpc {
    Range,
    Get,
    Put,
    Delete,
    Watch,
    Compact,
    LeaseGrant,
    Status,
    AlarmList,
    MemberList,
    Members,
    Alarm,
    Defragment,
    Snapshot,
    Hash,
    MoveLeader,
    Downgrade,
    Auth,
    LeaseLeases,
    Lock,
    Unlock,
    Campaign,
    /// Also `observe`: Observe's request is Leader's.
    #[value(alias = "observe")]
    Leader,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a development CA, a proxy server certificate and an etcd server certificate (localhost, 127.0.0.1,
    /// ::1 and every --san), the proxy's upstream client certificate and one client certificate per --client.
    /// Keys are written with mode 0600, certificates 0644.
    Init(CertsInitArgs),
}

/// Arguments of `etcd-guard certs init`.
#[derive(Debug, Args)]
struct CertsInitArgs {
    /// Where to write the files.
    #[arg(long)]
    dir: PathBuf,
    /// A client certificate to issue: NAME (the CN and the file name) or NAME:ORG. Repeatable.
    #[arg(long, value_name = "NAME[:ORG]")]
    client: Vec<String>,
    /// A URI SAN (e.g. a SPIFFE ID) for the client certificate of --client NAME. Repeatable.
    #[arg(long, value_name = "NAME=URI")]
    client_uri: Vec<String>,
    /// An extra DNS name or IP address for the proxy's and etcd's server certificates (e.g. a compose service
    /// name). Repeatable.
    #[arg(long, value_name = "NAME")]
    san: Vec<String>,
    /// Reuse ca.crt and ca.key if both exist and keep every certificate and key already there ("kept <file>");
    /// issue only what is missing. A pair with a file missing, or from another CA, is an error.
    #[arg(long, conflicts_with = "force")]
    keep_existing: bool,
    /// Replace certificates and keys already in the folder (without this or --keep-existing, a file in the way is
    /// an error: a folder of real keys is never overwritten by mistake).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load a configuration and every file it names (certificates, keys, policy) and report what is wrong.
    Check {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to every etcd endpoint with the upstream certificate, as the proxy would: report each
        /// one's etcd version and leader, or why it cannot be used (TLS, refused, permission). Off by default, so
        /// that `config check` before a reload needs no network.
        #[arg(long)]
        connect: bool,
    },
}

/// Run the command line; the exit code follows the command (policy check: 0 allow, 1 deny, 3 would-deny; errors: 2).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Policy(PolicyCommand::Check(args)) => policy_check(*args),
        Command::Policy(PolicyCommand::Grants(args)) => policy_grants(*args),
        Command::Policy(PolicyCommand::Validate { policy }) => match Policy::load_in_force(&policy) {
            Ok(loaded) => {
                for warning in loaded.warnings() {
                    eprintln!("etcd-guard: warning: {warning}");
                }
                say(format_args!("{}: ok", policy.display()));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Certs(CertsCommand::Init(args)) => certs_init(args),
        Command::Config(ConfigCommand::Check { config, connect }) => config_check(config, connect),
        Command::Audit(AuditCommand::Review(args)) => crate::audit::review::run(args),
        Command::Audit(AuditCommand::Verify(args)) => crate::audit::verify::run(args),
        Command::Audit(AuditCommand::ChangeKey(args)) => audit_change_key(args),
    }
}

fn audit_change_key(args: ChangeKeyArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if !config.audit.enabled {
        return fail(format_args!("{}: auditing is off (audit.enabled: false)", args.config.display()));
    }
    let new = match crate::audit::chain::Hasher::from_key_file(&args.new_key) {
        Ok(key) => key,
        Err(e) => return fail(e),
    };
    match crate::audit::writer::change_key(&config.audit, &new) {
        Ok(changed) => {
            let folder = changed.log.parent().map(|d| d.display().to_string()).unwrap_or_default();
            let old = match &config.audit.hmac_key_file {
                Some(key) => format!("--hmac-key {}", key.display()),
                None => "--unkeyed-before".to_owned(),
            };
            say(format_args!(
                "{}: the chain goes on under {} from seq {} (hash {}; the last record under the old key has hash {})",
                changed.log.display(),
                args.new_key.display(),
                changed.seq,
                changed.hash,
                changed.after_hash
            ));
            say(format_args!(
                "keep `--anchor {}:{}` with the new key, where the log's writers cannot reach it: verify with it \
                 fails if the log is cut back to before this change (and changed again)",
                changed.seq, changed.hash
            ));
            say(format_args!(
                "next: set audit.hmac_key_file to {} in {} before the proxy starts again (it refuses the log \
                 otherwise); verify with every key, oldest first: etcd-guard audit verify {folder} [earlier keys] \
                 {old} --hmac-key {} --anchor {}:{}",
                args.new_key.display(),
                args.config.display(),
                args.new_key.display(),
                changed.seq,
                changed.hash
            ));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// A line on standard output. A closed pipe (`… | head -1`, `… | grep -q`) is not an error worth a panic: the
/// exit code still says what was decided.
pub(crate) fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("etcd-guard: {e}");
    ExitCode::from(2)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: journald, `docker logs` and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging();
    // This thread's runtime (it runs the listener, signals, metrics, reloads and health probes), made first so that
    // the signal handlers are in place before anything slow (the configuration, its files, the threads): a SIGHUP
    // or SIGTERM while the proxy starts (a service manager's reload right after start) is acted on once it serves,
    // not the default action of ending the process.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(format!("starting the runtime: {e}")),
    };
    let mut signals = {
        let _in_runtime = runtime.enter();
        Signals::install()
    };
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(policy) = args.policy {
        config.policy_file = policy;
    }
    if !args.upstream.is_empty() {
        if let Some(Err(message)) = args.upstream.iter().map(|u| crate::config::endpoint(u)).find(Result::is_err) {
            return fail(format!("--upstream {message}"));
        }
        config.upstream.endpoints = args.upstream;
    }
    if let Some(m) = args.metrics_listen {
        config.metrics_listen = match m.as_str() {
            "off" | "" => None,
            text => match text.parse() {
                Ok(addr) => Some(addr),
                Err(e) => return fail(format!("--metrics-listen {text:?}: {e}")),
            },
        };
    }
    if let Some(file) = args.audit_file {
        config.audit.output = if file.as_os_str() == "-" {
            crate::config::AuditOutput::Stdout
        } else {
            crate::config::AuditOutput::File(file)
        };
    }
    // Connections are served by worker threads, one runtime each.
    let threads = config.worker_threads.unwrap_or_else(|| {
        crate::runtime::default_worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    let workers = match Workers::start(threads) {
        Ok(w) => w,
        Err(e) => return fail(format!("starting the worker threads: {e}")),
    };
    let handles = workers.handles();
    let code = runtime.block_on(async move {
        let proxy = match Proxy::bind_with_workers(&config, handles).await {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        let addr = proxy.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(listen = %addr, upstream = ?config.upstream.endpoints, worker_threads = threads, "etcd-guard serving");
        let audit = proxy.audit();
        let reload = proxy.reload_handle();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let serving = tokio::spawn(proxy.serve(stop_rx));
        signals.shutdown(&reload).await;
        tracing::info!("shutting down: draining connections (a second SIGTERM or SIGINT ends them at once)");
        let _ = stop_tx.send(true);
        let mut serving = serving;
        tokio::select! {
            _ = &mut serving => {}
            _ = signals.shutdown(&reload) => {
                tracing::warn!("second signal: ending the open connections without waiting for them");
                // Stopped again: the drain ends its connections and waits for their tasks to be gone, so the calls
                // they drop are recorded before the audit log closes below.
                let _ = stop_tx.send(true);
                let _ = serving.await;
            }
        }
        // Every answered request's record is queued; write them all before exiting.
        match audit.close(std::time::Duration::from_secs(10)).await {
            0 => {
                tracing::info!("audit log flushed; bye");
                ExitCode::SUCCESS
            }
            // Said by close(); the exit status tells the service manager.
            _ => ExitCode::FAILURE,
        }
    });
    // Not `drop`, which waits for blocking tasks without end: a reload still reading a slow (or stuck) file must
    // not hold the exit. The audit log is closed; nothing on this runtime is left to finish.
    runtime.shutdown_background();
    workers.stop();
    code
}

/// The signals that stop the proxy (SIGTERM, SIGINT) and reload it (SIGHUP), installed once so that a second
/// stop signal during the drain is seen too.
struct Signals {
    /// SIGTERM, SIGHUP, SIGINT.
    #[cfg(unix)]
    unix: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

// === impl Signals ===

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match (signal(SignalKind::terminate()), signal(SignalKind::hangup()), signal(SignalKind::interrupt())) {
                (Ok(term), Ok(hup), Ok(int)) => Signals { unix: Some((term, hup, int)) },
                _ => {
                    tracing::warn!("cannot install signal handlers; only Ctrl-C stops the proxy");
                    Signals { unix: None }
                }
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Wait for SIGTERM or SIGINT; SIGHUP reloads the policy and certificates meanwhile.
    async fn shutdown(&mut self, reload: &crate::reload::ReloadHandle) {
        #[cfg(unix)]
        if let Some((term, hup, int)) = &mut self.unix {
            loop {
                tokio::select! {
                    _ = hup.recv() => reload.trigger(),
                    _ = term.recv() => return,
                    _ = int.recv() => return,
                }
            }
        }
        let _ = reload;
        let _ = tokio::signal::ctrl_c().await;
    }
}

// === impl IdentityArgs ===

impl IdentityArgs {
    /// The identity the proxy would see. With `--cert`, read from the file as the listener reads a verified
    /// certificate (its chain is not verified here), and said on standard output first.
    fn identity(&self, policy: &Policy) -> Result<Identity, String> {
        for issuer in &self.issuer {
            if !policy.binds_issuer(issuer) {
                let named = policy.issuer_names();
                let names = if named.is_empty() { "none".to_owned() } else { named.join(", ") };
                eprintln!("etcd-guard: note: no binding names issuer {issuer:?} (the bindings name: {names})");
            }
        }
        let Some(path) = &self.cert else {
            let given = self.common_name.is_some()
                || self.fingerprint_sha256.is_some()
                || !self.issuer.is_empty()
                || [&self.organization, &self.organizational_unit, &self.dns_san, &self.uri_san]
                    .iter()
                    .any(|v| !v.is_empty());
            if !given {
                return Err("whose? give --cert FILE, or the certificate's fields: --common-name, --organization, \
                            --organizational-unit, --dns-san, --uri-san, --fingerprint-sha256, --issuer"
                    .into());
            }
            return Ok(Identity {
                common_name: self.common_name.clone(),
                organizations: self.organization.clone(),
                organizational_units: self.organizational_unit.clone(),
                dns_sans: self.dns_san.clone(),
                uri_sans: self.uri_san.clone(),
                serial: String::new(),
                fingerprint_sha256: self.fingerprint_sha256.clone().unwrap_or_default().to_lowercase().replace(':', ""),
                issuers: self.issuer.clone(),
            });
        };
        let read = |e: &dyn std::fmt::Display| format!("--cert {}: {e}", path.display());
        let bytes = std::fs::read(path).map_err(|e| read(&e))?;
        use rustls_pki_types::pem::PemObject;
        let pem = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read(&e))?;
        let der: Vec<u8> = match pem.first() {
            Some(leaf) => leaf.to_vec(),
            None if bytes.windows(11).any(|w| w == b"PRIVATE KEY")
                || rustls_pki_types::PrivateKeyDer::try_from(bytes.as_slice()).is_ok() =>
            {
                return Err(read(&"it holds a private key, not a certificate"));
            }
            // Not PEM: a DER certificate starts with a SEQUENCE.
            None if bytes.first() == Some(&0x30) => bytes,
            None => return Err(read(&"no certificate in the file (PEM or DER)")),
        };
        let refused = |why: &dyn std::fmt::Display| read(&format!("the proxy refuses it at the handshake: {why}"));
        if let Some(why) = crate::tls::client_leaf_refusal(&der) {
            return Err(refused(&why));
        }
        // A chain file: the certificates after the leaf are what a client would send along with it.
        crate::tls::check_signers(&rustls_pki_types::CertificateDer::from(der.as_slice()), pem.get(1..).unwrap_or(&[]))
            .map_err(|e| refused(&e))?;
        let identity = Identity::from_der(&der).map_err(|e| refused(&e))?;
        say(format!("identity: {}", describe_identity(&identity)));
        say("  (read from the file alone: its chain to the client CAs and its revocation are not checked)");
        Ok(Identity { issuers: self.issuer.clone(), ..identity })
    }
}

/// The fields of an identity a binding can match, for `--cert`'s first line.
fn describe_identity(id: &Identity) -> String {
    let mut parts = Vec::new();
    if let Some(cn) = &id.common_name {
        parts.push(format!("common_name {cn:?}"));
    }
    for (field, values) in [
        ("organization", &id.organizations),
        ("organizational_unit", &id.organizational_units),
        ("dns_san", &id.dns_sans),
        ("uri_san", &id.uri_sans),
    ] {
        parts.extend(values.iter().map(|v| format!("{field} {v:?}")));
    }
    parts.push(format!("fingerprint_sha256 {}", id.fingerprint_sha256));
    parts.join(", ")
}

/// The policy file and the identity `policy check` and `policy grants` ask about (exit 2 when either fails).
fn policy_and_identity(path: &std::path::Path, identity: &IdentityArgs) -> Result<(Policy, Identity), ExitCode> {
    let policy = Policy::load(path).map_err(fail)?;
    // What `policy validate` warns about (bindings everyone matches, audit-only ones) bears on both answers.
    for warning in policy.warnings() {
        eprintln!("etcd-guard: warning: {warning}");
    }
    let identity = identity.identity(&policy).map_err(fail)?;
    Ok((policy, identity))
}

fn policy_grants(args: GrantsArgs) -> ExitCode {
    match policy_and_identity(&args.policy, &args.identity) {
        Ok((policy, identity)) => {
            say(policy.grants(&identity).to_string());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn policy_check(args: CheckArgs) -> ExitCode {
    let (policy, identity) = match policy_and_identity(&args.policy, &args.identity) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let needs = match check_needs(&args) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let mut allowed = true;
    // A request the proxy does not understand is refused even under audit-only bindings.
    let mut never = false;
    for need in &needs.0 {
        let (ok, text) = match need {
            Need::Key(access, range) => {
                let e = policy.explain(&identity, *access, range);
                (e.allowed, e.to_string())
            }
            Need::Cap(cap) => {
                let e = policy.explain_capability(&identity, *cap);
                (e.allowed, e.to_string())
            }
            Need::Admin => {
                let ok = policy.permissions_for(&identity).caps == CapabilitySet::all();
                (ok, format!("{} admin (every cluster capability)", if ok { "ALLOW" } else { "DENY" }))
            }
            Need::Never(why) => {
                never = true;
                (false, format!("DENY {why}"))
            }
            Need::LeaseKeys(..) => (true, "lease keys: checked against etcd at request time".to_string()),
        };
        allowed &= ok;
        say(text);
    }
    if allowed {
        say("allow");
        ExitCode::SUCCESS
    } else if !never && policy.permissions_for(&identity).mode() == crate::policy::Mode::AuditOnly {
        // What the proxy does: serves it (the audit log says `would_deny`); once the bindings enforce, it denies
        // it. Neither `allow` nor `deny`: an intent check of either kind fails on it.
        say("would-deny: only audit-only bindings match this identity, so the proxy serves the request now (the \
             audit log records decision \"would_deny\") and denies it once they enforce");
        ExitCode::from(3)
    } else {
        say("deny");
        ExitCode::from(1)
    }
}

/// Build the request `policy check` describes and ask [`authz`] what it needs — the same code the proxy runs.
/// A flag the RPC does not take is an error rather than left out of the answer.
fn check_needs(args: &CheckArgs) -> Result<Needs, String> {
    // Which of --key, --range-end/--prefix and --prev-kv the RPC takes.
    let (takes_key, takes_range, takes_prev_kv) = match args.rpc {
        Rpc::Range | Rpc::Get => (true, true, false),
        Rpc::Delete | Rpc::Watch => (true, true, true),
        Rpc::Put => (true, false, true),
        Rpc::Lock | Rpc::Unlock | Rpc::Campaign | Rpc::Leader => (true, false, false),
        _ => (false, false, false),
    };
    let rpc = args.rpc.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
    let not_for = |flag: &str| Err(format!("{flag} does not apply to --rpc {rpc}"));
    if args.key.is_some() && !takes_key {
        return not_for("--key");
    }
    if args.range_end.is_some() && !takes_range {
        return not_for("--range-end");
    }
    if args.prefix && !takes_range {
        return not_for("--prefix");
    }
    if args.prev_kv && !takes_prev_kv {
        return not_for("--prev-kv");
    }
    let key = match &args.key {
        Some(k) => unescape_key(k).map_err(|e| format!("--key: {e}"))?,
        None => Vec::new(),
    };
    let range_end = if args.prefix {
        match crate::policy::prefix_end(&key) {
            crate::policy::End::Key(k) => k,
            crate::policy::End::Unbounded => vec![0],
        }
    } else {
        match &args.range_end {
            Some(e) => unescape_key(e).map_err(|e| format!("--range-end: {e}"))?,
            None => Vec::new(),
        }
    };
    let need_key = || match &args.key {
        None => Err("--key is required for this RPC".to_string()),
        Some(_) if key.is_empty() => Err("--key is empty: etcd refuses an empty key for this RPC".to_string()),
        Some(_) => Ok(()),
    };
    let cap = |c: Capability| Ok(Needs(vec![Need::Cap(c)]));
    let status_text = |s: tonic::Status| s.message().to_string();
    match args.rpc {
        Rpc::Range | Rpc::Get => {
            need_key()?;
            authz::range(&pb::RangeRequest { key, range_end, ..Default::default() }).map_err(status_text)
        }
        Rpc::Put => {
            need_key()?;
            authz::put(&pb::PutRequest { key, prev_kv: args.prev_kv, ..Default::default() }).map_err(status_text)
        }
        Rpc::Delete => {
            need_key()?;
            authz::delete_range(&pb::DeleteRangeRequest { key, range_end, prev_kv: args.prev_kv }).map_err(status_text)
        }
        Rpc::Watch => Ok(authz::watch(&pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key,
                range_end,
                prev_kv: args.prev_kv,
                ..Default::default()
            })),
        })),
        Rpc::Compact => cap(Capability::Compact),
        Rpc::LeaseGrant => cap(Capability::Lease),
        Rpc::Status | Rpc::AlarmList | Rpc::MemberList => cap(Capability::Status),
        Rpc::Members => cap(Capability::Members),
        Rpc::Alarm => cap(Capability::Alarm),
        Rpc::Defragment => cap(Capability::Defragment),
        Rpc::Snapshot => cap(Capability::Snapshot),
        Rpc::Hash => cap(Capability::Hash),
        Rpc::MoveLeader => cap(Capability::MoveLeader),
        Rpc::Downgrade => cap(Capability::Downgrade),
        Rpc::Auth => cap(Capability::Auth),
        Rpc::LeaseLeases => Ok(Needs(vec![Need::Admin])),
        Rpc::Lock => {
            need_key()?;
            authz::lock(&etcd_guard_proto::v3lockpb::LockRequest { name: key, lease: 0 }).map_err(status_text)
        }
        Rpc::Unlock => {
            need_key()?;
            authz::unlock(&etcd_guard_proto::v3lockpb::UnlockRequest { key }).map_err(status_text)
        }
        Rpc::Campaign => {
            need_key()?;
            let req = etcd_guard_proto::v3electionpb::CampaignRequest { name: key, lease: 0, value: Vec::new() };
            authz::campaign(&req).map_err(status_text)
        }
        Rpc::Leader => {
            need_key()?;
            authz::leader(&etcd_guard_proto::v3electionpb::LeaderRequest { name: key }).map_err(status_text)
        }
    }
}

fn certs_init(args: CertsInitArgs) -> ExitCode {
    let options =
        match InitOptions::from_args(&args.client, &args.client_uri, &args.san, args.keep_existing, args.force) {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
    match certs::init_dir(&args.dir, &options) {
        Ok(report) => {
            for f in &report.files {
                say(f);
            }
            for note in &report.notes {
                eprintln!("etcd-guard: note: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Whether the audit log can be opened where the configuration says (leaving nothing behind), and its HMAC key
/// read, as `serve` will.
/// Whether two listeners cannot both bind: the same port (not 0, which picks a free one) on the same address, or
/// on a wildcard address and any other.
fn clash(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn audit_problem(audit: &crate::config::Audit) -> Option<String> {
    if !audit.enabled {
        return None;
    }
    let hasher = match &audit.hmac_key_file {
        Some(key) => match crate::audit::chain::Hasher::from_key_file(key) {
            Ok(h) => h,
            Err(e) => return Some(e.to_string()),
        },
        None => crate::audit::chain::Hasher::unkeyed(),
    };
    let crate::config::AuditOutput::File(path) = &audit.output else { return None };
    // The log the proxy would go on with: its last record must verify under the configured key, or `serve`
    // refuses to start.
    if let Err(e) = crate::audit::writer::check_tail(path, &hasher) {
        return Some(e.to_string().trim_start_matches("audit: ").to_string());
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .err()
            .map(|e| format!("{}: cannot be appended to: {e}", path.display()));
    }
    // The writer creates missing folders; the nearest existing one must be a folder we can write into.
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d.as_os_str().is_empty() || d.exists() {
            let d = if d.as_os_str().is_empty() { std::path::Path::new(".") } else { d };
            return match std::fs::metadata(d) {
                Ok(m) if !m.is_dir() => Some(format!("{} is not a folder", d.display())),
                // Its mode bits do not say whether this user may write there: try it.
                Ok(_) => {
                    let probe = d.join(format!(".etcd-guard-config-check-{}", std::process::id()));
                    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
                        Ok(_) => {
                            let _ = std::fs::remove_file(&probe);
                            None
                        }
                        Err(e) => Some(format!("{}: cannot create the audit log there: {e}", d.display())),
                    }
                }
                Err(e) => Some(format!("{}: {e}", d.display())),
            };
        }
        dir = d.parent();
    }
    None
}

/// `config check --connect`: each etcd endpoint, reached as the proxy reaches it. Prints a line per endpoint that
/// works; returns the problems of the others.
fn connect_check(upstream: &crate::config::Upstream) -> Vec<String> {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return vec![format!("upstream: cannot start a runtime to connect: {e}")],
    };
    let endpoints = match crate::tls::upstream_connections(upstream) {
        Ok(tls) => tls.channels,
        Err(e) => return vec![format!("upstream: {e}")],
    };
    // The connect timeout for the handshakes, and as long again for the answers.
    let meta = crate::upstream::CallMeta::default().with_timeout(Some(upstream.connect_timeout.saturating_mul(2)));
    // One connection per endpoint (`connections_per_endpoint` copies are alike), all checked at once.
    let mut seen = std::collections::HashSet::new();
    let endpoints: Vec<_> = endpoints.into_iter().filter(|(url, _)| seen.insert(url.clone())).collect();
    runtime.block_on(async {
        let checks = endpoints.into_iter().map(|(url, connection)| {
            let meta = &meta;
            async move {
                let connector = connection.connector().clone();
                let one = crate::upstream::Upstream::new(vec![(url.clone(), connection)]);
                let checked = match endpoint_check(&one, meta).await {
                    // Clients are not told the names etcd's certificate is valid for; the operator is.
                    Err(e) if e.contains(crate::upstream::NAME_MISMATCH) => {
                        match crate::http2::client::attempt_error(connector).await {
                            Some(rustls) if rustls.contains("only valid for") => {
                                let names = rustls.strip_prefix("invalid peer certificate: ").unwrap_or(&rustls);
                                Err(format!("{e} ({names})"))
                            }
                            _ => Err(e),
                        }
                    }
                    checked => checked,
                };
                (url, checked)
            }
        });
        let mut problems = Vec::new();
        for (url, checked) in futures_util::future::join_all(checks).await {
            match checked {
                Ok(line) => say(format_args!("upstream {url}: ok ({line})")),
                Err(e) => problems.push(format!("upstream {url}: {e}")),
            }
        }
        problems
    })
}

/// What one endpoint says of itself (Maintenance/Status), and whether the proxy's certificate may read the whole
/// keyspace there (a serializable Range of one key, keys only: with etcd's auth on, the proxy needs its root role).
async fn endpoint_check(one: &crate::upstream::Upstream, meta: &crate::upstream::CallMeta) -> Result<String, String> {
    use etcd_guard_proto::etcdserverpb::{RangeRequest, RangeResponse, StatusRequest, StatusResponse};
    use etcd_guard_proto::methods::{KV_RANGE, MAINTENANCE_STATUS};

    let status: StatusResponse =
        one.unary_decoded(MAINTENANCE_STATUS, StatusRequest {}, meta).await.map_err(|e| told(&e))?;
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        limit: 1,
        serializable: true,
        keys_only: true,
        ..RangeRequest::default()
    };
    let read: Result<RangeResponse, _> = one.unary_decoded(KV_RANGE, all, meta).await;
    if let Err(e) = read {
        return Err(format!(
            "connected (etcd {}), but reading the keyspace failed: {}; with etcd's auth enabled, the upstream \
             certificate's user needs etcd's root role",
            status.version,
            told(&e)
        ));
    }
    let member = status.header.as_ref().map_or(0, |h| h.member_id);
    let mut line = format!("etcd {}, member {member:x}", status.version);
    match status.leader {
        0 => return Err(format!("{line}: no leader (the cluster has no quorum, or is electing one)")),
        l if l == member => line.push_str(", the leader"),
        l => line.push_str(&format!(", leader {l:x}")),
    }
    if status.is_learner {
        return Err(format!(
            "{line}: a learner (it refuses the calls the proxy would send it: list voting members only)"
        ));
    }
    if !status.errors.is_empty() {
        line.push_str(&format!(", errors: {}", status.errors.join("; ")));
    }
    Ok(line)
}

/// What a failed call tells: the proxy's own words (its `etcd-guard: upstream unavailable: ` taken off, with a hint
/// where one helps), or etcd's with their code.
fn told(e: &tonic::Status) -> String {
    let Some(own) = e.message().strip_prefix("etcd-guard: ") else {
        return format!("etcd answered {:?}: {}", e.code(), e.message());
    };
    let own = own.strip_prefix("upstream unavailable: ").unwrap_or(own);
    const REFUSED_CERTIFICATE: [&str; 7] = [
        "BadCertificate",
        "UnknownCA",
        "CertificateRequired",
        "CertificateExpired",
        "CertificateUnknown",
        "UnsupportedCertificate",
        "AccessDenied",
    ];
    if crate::http2::client::tells_tls_alert(own) && REFUSED_CERTIFICATE.iter().any(|alert| own.contains(alert)) {
        format!(
            "{own}: etcd refused the proxy's certificate (upstream.cert_file): is it signed by a CA in etcd's \
             --trusted-ca-file, valid now, and for client authentication?"
        )
    } else if own.contains(crate::upstream::NAME_MISMATCH) {
        format!("{own}: compare the host of this URL with the DNS and IP names of etcd's serving certificate")
    } else {
        own.to_owned()
    }
}

fn config_check(path: PathBuf, connect: bool) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut problems = Vec::new();
    let mut expiries = Vec::new();
    match crate::tls::server_config(&config.tls) {
        Ok(tls) => {
            for warning in tls.advertise_warnings(&config.tls.cert_file, &config.advertise_client_urls) {
                eprintln!("etcd-guard: warning: {warning}");
            }
            expiries.extend(tls.expiries);
        }
        Err(e) => problems.push(format!("tls: {e}")),
    }
    match crate::tls::upstream_channel_check(&config.upstream) {
        Ok(found) => {
            expiries.extend(found);
            if connect {
                problems.extend(connect_check(&config.upstream));
            }
        }
        Err(e) => problems.push(format!("upstream: {e}")),
    }
    // Expiring certificates are worth a warning, not a failure: the proxy serves with them (clients and etcd
    // refuse expired ones).
    for warning in expiries.iter().filter_map(crate::tls::Expiry::warning_now) {
        eprintln!("etcd-guard: warning: {warning}");
    }
    match Policy::load_in_force(&config.policy_file) {
        Ok(policy) => {
            if let Err(e) = crate::server::check_issuers(&policy, &config.tls) {
                problems.push(format!("policy: {e}"));
            }
            for warning in policy.warnings() {
                eprintln!("etcd-guard: warning: {warning}");
            }
        }
        Err(e) => problems.push(format!("policy: {e}")),
    }
    if let Some(p) = audit_problem(&config.audit) {
        problems.push(format!("audit: {p}"));
    }
    for warning in config.warnings() {
        eprintln!("etcd-guard: warning: {warning}");
    }
    if let Some(metrics) = config.metrics_listen.filter(|m| clash(*m, config.listen)) {
        problems.push(format!(
            "metrics_listen {metrics} and listen {} take the same port: give the metrics listener its own",
            config.listen
        ));
    }
    if problems.is_empty() {
        say(format_args!("{}: ok", path.display()));
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("etcd-guard: {p}");
        }
        ExitCode::from(2)
    }
}
