//! The packaging files are consistent, checked without a Docker engine, systemd or a Kubernetes cluster:
//! `docker-compose.yml`, `Dockerfile`, `deploy/compose/`, `deploy/systemd/` and `deploy/kubernetes/` (and the ports
//! `docs/deployment.md` names).
//!
//! YAML is read with serde-saphyr (anchors and merge keys included) into `serde_json::Value`; etcd-guard
//! configurations go through [`Config::parse`], policies through [`Policy::load`], and the compose file's
//! `certs init` command is run for real into a temporary folder, whose certificates are then read with x509-parser.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use etcd_guard::config::Config;
use etcd_guard::policy::Policy;
use serde_json::Value;

type Error = Box<dyn std::error::Error>;
type TestResult = Result<(), Error>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> Result<String, Error> {
    let path = repo().join(rel);
    Ok(std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?)
}

fn yaml(rel: &str) -> Result<Value, Error> {
    let text = read(rel)?;
    Ok(serde_saphyr::from_str::<Value>(&text).map_err(|e| format!("{rel}: {e}"))?)
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str, Error> {
    Ok(v.as_str().ok_or_else(|| format!("{what}: expected a string, found {v}"))?)
}

/// A list of strings (`command: [..]`) or one string split on whitespace (`command: "a b"`).
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Array(items) => {
            items.iter().map(|i| i.as_str().map(str::to_string).unwrap_or_else(|| i.to_string())).collect()
        }
        _ => Vec::new(),
    }
}

/// Every string anywhere inside `v`.
fn all_strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|i| all_strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| all_strings(i, out)),
        _ => {}
    }
}

/// Whether `path` is `dir` or inside it (by path components).
fn under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// The host and port of an `https://host:port` URL (an IPv6 host without its brackets).
fn url_host(url: &str) -> Result<(String, u16), Error> {
    let uri = url.parse::<http::Uri>().map_err(|e| format!("{url:?}: {e}"))?;
    let host = uri.host().ok_or(format!("{url:?}: no host"))?;
    let port = uri.port_u16().ok_or(format!("{url:?}: no port"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// The DNS and IP SANs of a PEM certificate file.
fn cert_names(path: &Path) -> Result<(Vec<String>, Vec<IpAddr>), Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    let cert = pem.parse_x509().map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Some(san) = cert.subject_alternative_name().map_err(|e| format!("{}: {e}", path.display()))? {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        ips.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        ips.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    Ok((dns, ips))
}

/// Whether a certificate with these SANs is valid for `host` (a name or an address).
fn names_host(names: &(Vec<String>, Vec<IpAddr>), host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => names.1.contains(&ip),
        Err(_) => names.0.iter().any(|d| d.eq_ignore_ascii_case(host)),
    }
}

// === docker-compose.yml ===

/// One mount of a compose service.
#[derive(Debug, Clone)]
struct Mount {
    /// Named volume, or a host path for a bind mount.
    source: String,
    target: PathBuf,
    read_only: bool,
}

impl Mount {
    fn is_bind(&self) -> bool {
        self.source.starts_with('.') || self.source.starts_with('/') || self.source.starts_with('~')
    }
}

fn mounts(service: &Value, name: &str) -> Result<Vec<Mount>, Error> {
    let mut out = Vec::new();
    let Some(list) = service.get("volumes") else { return Ok(out) };
    let list = list.as_array().ok_or_else(|| format!("services.{name}.volumes: expected a list"))?;
    for item in list {
        match item {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                let (source, target, mode) = match parts.as_slice() {
                    [source, target] => (*source, *target, ""),
                    [source, target, mode] => (*source, *target, *mode),
                    _ => return Err(format!("services.{name}.volumes: {s:?} is not SOURCE:TARGET[:MODE]").into()),
                };
                out.push(Mount {
                    source: source.to_string(),
                    target: PathBuf::from(target),
                    read_only: mode.split(',').any(|m| m == "ro"),
                });
            }
            Value::Object(_) => {
                let source =
                    str_of(item.get("source").unwrap_or(&Value::Null), &format!("services.{name}.volumes[].source"))?;
                let target =
                    str_of(item.get("target").unwrap_or(&Value::Null), &format!("services.{name}.volumes[].target"))?;
                let read_only = item.get("read_only").and_then(Value::as_bool).unwrap_or(false);
                out.push(Mount { source: source.to_string(), target: PathBuf::from(target), read_only });
            }
            other => return Err(format!("services.{name}.volumes: unexpected entry {other}").into()),
        }
    }
    Ok(out)
}

/// The host file behind a path inside a container, through the service's bind mounts.
/// The most specific mount wins, as in Docker.
fn host_path(mounts: &[Mount], in_container: &Path) -> Option<PathBuf> {
    let m = mounts
        .iter()
        .filter(|m| m.is_bind() && in_container.starts_with(&m.target))
        .max_by_key(|m| m.target.components().count())?;
    let rest = in_container.strip_prefix(&m.target).ok()?;
    let base = repo().join(&m.source);
    Some(if rest.as_os_str().is_empty() { base } else { base.join(rest) })
}

fn services(compose: &Value) -> Result<&serde_json::Map<String, Value>, Error> {
    let services = compose.get("services").and_then(Value::as_object).ok_or("docker-compose.yml: no services")?;
    assert!(!services.is_empty(), "docker-compose.yml: no services");
    Ok(services)
}

/// The networks a service is attached to: its `networks` (list or map), those of the service whose network it
/// joins (`network_mode: service:X`), none with `network_mode: none`, else compose's `default`.
fn networks_of(services: &serde_json::Map<String, Value>, name: &str, depth: usize) -> BTreeSet<String> {
    let Some(service) = services.get(name) else { return BTreeSet::new() };
    match service.get("network_mode").and_then(Value::as_str) {
        Some("none") => return BTreeSet::new(),
        Some(mode) => {
            return match mode.strip_prefix("service:") {
                Some(other) if depth <= services.len() => networks_of(services, other, depth + 1),
                Some(_) => BTreeSet::new(),                 // a cycle
                None => BTreeSet::from([mode.to_string()]), // host, bridge, container:…
            };
        }
        None => {}
    }
    match service.get("networks") {
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        _ => BTreeSet::from(["default".to_string()]),
    }
}

/// The service whose network namespace `name` runs in: itself, or where `network_mode: service:X` leads.
fn namespace_of(services: &serde_json::Map<String, Value>, name: &str, depth: usize) -> String {
    let joined = services.get(name).and_then(|s| s.get("network_mode")).and_then(Value::as_str);
    match joined.and_then(|m| m.strip_prefix("service:")) {
        Some(other) if depth <= services.len() => namespace_of(services, other, depth + 1),
        _ => name.to_string(),
    }
}

#[test]
fn compose_services_have_an_image_and_known_dependencies() -> TestResult {
    let compose = yaml("docker-compose.yml")?;
    let services = services(&compose)?;
    for (name, service) in services {
        assert!(
            service.get("image").is_some() || service.get("build").is_some(),
            "services.{name}: needs an image or a build"
        );
        let deps: Vec<String> = match service.get("depends_on") {
            None => Vec::new(),
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            Some(Value::Object(map)) => {
                for (dep, spec) in map {
                    let condition = spec.get("condition").and_then(Value::as_str).unwrap_or("service_started");
                    assert!(
                        ["service_started", "service_healthy", "service_completed_successfully"].contains(&condition),
                        "services.{name}.depends_on.{dep}: unknown condition {condition:?}"
                    );
                    if condition == "service_healthy" {
                        let target = services.get(dep).ok_or(format!("services.{name}: unknown dependency {dep}"))?;
                        assert!(
                            target.get("healthcheck").is_some(),
                            "services.{name} waits for {dep} to be healthy, which has no healthcheck"
                        );
                    }
                }
                map.keys().cloned().collect()
            }
            Some(other) => return Err(format!("services.{name}.depends_on: unexpected {other}").into()),
        };
        for dep in &deps {
            assert!(services.contains_key(dep), "services.{name}.depends_on: no service {dep:?}");
            assert_ne!(dep, name, "services.{name} depends on itself");
        }
        if let Some(mode) = service.get("network_mode").and_then(Value::as_str) {
            if let Some(other) = mode.strip_prefix("service:") {
                assert!(services.contains_key(other), "services.{name}.network_mode: no service {other:?}");
                assert!(
                    service.get("ports").is_none(),
                    "services.{name}: ports belong to {other}, whose network it uses"
                );
            }
            assert!(service.get("networks").is_none(), "services.{name}: network_mode and networks together");
        }
    }
    // Every network a service names is declared (compose's `default` needs no declaration).
    let declared: BTreeSet<String> =
        compose.get("networks").and_then(Value::as_object).map(|n| n.keys().cloned().collect()).unwrap_or_default();
    for name in services.keys() {
        if services[name].get("network_mode").is_some() {
            continue;
        }
        for net in networks_of(services, name, 0) {
            assert!(net == "default" || declared.contains(&net), "services.{name}: network {net:?} is not declared");
        }
    }
    // The certificate step has completed before anything that mounts the certificates starts: directly, or
    // through the services it waits for (depends_on, or the service whose network it joins).
    for (name, service) in services {
        let uses_certs = mounts(service, name)?.iter().any(|m| m.source == "certs");
        if uses_certs && name != "certs" {
            assert!(waits_for_certs(services, name, 0), "services.{name} mounts the certificates before `certs` ran");
        }
    }
    Ok(())
}

/// Whether `name` starts only after `certs` completed successfully.
fn waits_for_certs(services: &serde_json::Map<String, Value>, name: &str, depth: usize) -> bool {
    let Some(service) = services.get(name) else { return false };
    if depth > services.len() {
        return false; // a cycle
    }
    if service.pointer("/depends_on/certs/condition").and_then(Value::as_str) == Some("service_completed_successfully")
    {
        return true;
    }
    let mut before: Vec<&str> = service
        .get("depends_on")
        .and_then(Value::as_object)
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    if let Some(other) = service.get("network_mode").and_then(Value::as_str).and_then(|m| m.strip_prefix("service:")) {
        before.push(other);
    }
    before.into_iter().any(|dep| dep != "certs" && waits_for_certs(services, dep, depth + 1))
}

#[test]
fn compose_volumes_are_declared_and_bind_mounts_exist() -> TestResult {
    let compose = yaml("docker-compose.yml")?;
    let declared: BTreeSet<String> =
        compose.get("volumes").and_then(Value::as_object).map(|v| v.keys().cloned().collect()).unwrap_or_default();
    let mut used = BTreeSet::new();
    for (name, service) in services(&compose)? {
        for m in mounts(service, name)? {
            if m.is_bind() {
                let host = repo().join(&m.source);
                assert!(host.exists(), "services.{name}: bind mount source {} does not exist", m.source);
            } else {
                assert!(
                    declared.contains(&m.source),
                    "services.{name}: volume {:?} is not declared under volumes:",
                    m.source
                );
                used.insert(m.source.clone());
            }
        }
    }
    for v in &declared {
        assert!(used.contains(v), "volume {v:?} is declared but no service uses it");
    }
    Ok(())
}

/// The compose file's `certs init` step, run for real into a temporary folder.
struct CertsRun {
    /// Its output folder in the container (`--dir`).
    dir: PathBuf,
    /// The names of the files it wrote.
    files: BTreeSet<String>,
    /// The command line, with `--dir` pointing at `tmp`.
    args: Vec<String>,
    /// Where it wrote them.
    tmp: tempfile::TempDir,
}

impl CertsRun {
    /// Run the same command again, into the same folder.
    fn again(&self) -> Result<Output, Error> {
        Ok(Command::new(env!("CARGO_BIN_EXE_etcd-guard")).args(&self.args).output()?)
    }

    /// A file it wrote, on this machine.
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// The `certs init` command of the compose file, its output folder in the container, and the files it writes
/// (found by running it into a temporary folder).
fn compose_certs(services: &serde_json::Map<String, Value>) -> Result<CertsRun, Error> {
    let certs = services.get("certs").ok_or("docker-compose.yml: no `certs` service")?;
    let args = words(certs.get("command").ok_or("services.certs: no command")?);
    assert_eq!(args.get(..2), Some(&["certs".to_string(), "init".to_string()][..]), "services.certs runs {args:?}");
    let dir_at = args.iter().position(|a| a == "--dir").ok_or("services.certs: no --dir")?;
    let dir = PathBuf::from(args.get(dir_at + 1).ok_or("services.certs: --dir without a value")?);
    let volume =
        mounts(certs, "certs")?.into_iter().find(|m| m.target == dir).ok_or("services.certs: --dir is not a mount")?;
    assert!(!volume.is_bind() && !volume.read_only, "services.certs: --dir must be a writable named volume");

    let tmp = tempfile::tempdir()?;
    let mut real: Vec<String> = args.clone();
    real[dir_at + 1] = tmp.path().to_string_lossy().into_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_etcd-guard")).args(&real).output()?;
    assert!(out.status.success(), "etcd-guard {real:?}: {}", String::from_utf8_lossy(&out.stderr));
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(tmp.path())? {
        files.insert(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(CertsRun { dir, files, args: real, tmp })
}

#[test]
fn compose_certs_step_keeps_its_certificates_on_a_rerun() -> TestResult {
    let compose = yaml("docker-compose.yml")?;
    let run = compose_certs(services(&compose)?)?;
    assert!(
        run.args.iter().any(|a| a == "--keep-existing"),
        "services.certs: --keep-existing, or every `up` makes a new CA"
    );

    let read_all = || -> Result<Vec<(String, Vec<u8>)>, Error> {
        run.files.iter().map(|f| Ok((f.clone(), std::fs::read(run.path(f))?))).collect()
    };
    let before = read_all()?;
    let out = run.again()?;
    assert!(out.status.success(), "second run: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for f in &run.files {
        assert!(stdout.lines().any(|l| l == format!("kept {}", run.path(f).display())), "{f} kept: {stdout}");
    }
    assert!(!stdout.contains("wrote"), "nothing re-issued: {stdout}");
    assert_eq!(read_all()?, before, "every file unchanged");

    #[cfg(unix)]
    for f in &run.files {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(run.path(f))?.permissions().mode() & 0o777;
        let want = if f.ends_with(".key") { 0o600 } else { 0o644 };
        assert_eq!(mode, want, "{f}: mode {mode:o}");
    }
    Ok(())
}

#[test]
fn compose_names_match_the_certificates_and_clients_cannot_reach_etcd() -> TestResult {
    let compose = yaml("docker-compose.yml")?;
    let services = services(&compose)?;
    let run = compose_certs(services)?;
    let server = cert_names(&run.path("server.crt"))?;
    let etcd_server = cert_names(&run.path("etcd-server.crt"))?;
    let etcd_nets = networks_of(services, "etcd", 0);
    let guard_nets = networks_of(services, "etcd-guard", 0);
    // Whether `from` reaches the service `target` at `host`: loopback within one network namespace, or the
    // service's name on a network both are on.
    let reaches = |from: &str, host: &str, target: &str| -> bool {
        if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "localhost" {
            return namespace_of(services, from, 0) == namespace_of(services, target, 0);
        }
        host == target && !networks_of(services, from, 0).is_disjoint(&networks_of(services, target, 0))
    };

    // The proxy reaches etcd by a name etcd's certificate carries.
    let config = Config::parse(&read("deploy/compose/etcd-guard.yaml")?, Path::new("/etc/etcd-guard/etcd-guard.yaml"))?;
    for endpoint in &config.upstream.endpoints {
        let (host, _) = url_host(endpoint)?;
        assert!(names_host(&etcd_server, &host), "upstream {endpoint}: etcd-server.crt has {etcd_server:?}");
        assert!(reaches("etcd-guard", &host, "etcd"), "upstream {endpoint}: etcd-guard does not reach etcd there");
    }
    // etcd advertises a name its certificate carries.
    let etcd_args = words(services.get("etcd").and_then(|e| e.get("command")).unwrap_or(&Value::Null));
    for arg in etcd_args.iter().filter_map(|a| a.strip_prefix("--advertise-client-urls=")) {
        for url in arg.split(',') {
            let (host, _) = url_host(url)?;
            assert!(names_host(&etcd_server, &host), "etcd advertises {url}: etcd-server.crt has {etcd_server:?}");
        }
    }
    // Every client talks to the proxy by a name the proxy's certificate carries, and shares no network with etcd.
    let mut clients = 0;
    for (name, service) in services {
        let Some(endpoints) = service.pointer("/environment/ETCDCTL_ENDPOINTS").and_then(Value::as_str) else {
            continue;
        };
        clients += 1;
        for url in endpoints.split(',') {
            let (host, port) = url_host(url)?;
            assert_eq!(port, config.listen.port(), "services.{name}: {url} is not the proxy's port");
            assert!(names_host(&server, &host), "services.{name}: {url}, but server.crt has {server:?}");
            assert!(reaches(name, &host, "etcd-guard"), "services.{name}: does not reach etcd-guard at {url}");
        }
        let nets = networks_of(services, name, 0);
        assert!(nets.is_disjoint(&etcd_nets), "services.{name} shares {nets:?} with etcd: it could bypass the proxy");
        assert!(!nets.is_disjoint(&guard_nets), "services.{name} shares no network with etcd-guard");
    }
    assert!(clients > 0, "no example client");
    // The advertised URLs name the proxy as its certificate does.
    for url in &config.advertise_client_urls {
        let (host, _) = url_host(url)?;
        assert!(names_host(&server, &host), "advertise_client_urls {url}: server.crt has {server:?}");
    }
    Ok(())
}

#[test]
fn compose_certificate_paths_are_files_certs_init_writes() -> TestResult {
    let compose = yaml("docker-compose.yml")?;
    let services = services(&compose)?;
    let CertsRun { dir, files, .. } = compose_certs(services)?;
    let mut checked = 0;
    for (name, service) in services {
        let mut strings = Vec::new();
        all_strings(service, &mut strings);
        for s in strings {
            // `--cert=/certs/x.crt` and `/certs/x.crt` alike.
            let path = s.rsplit('=').next().unwrap_or(s);
            let Ok(rest) = Path::new(path).strip_prefix(&dir) else { continue };
            if rest.as_os_str().is_empty() {
                continue; // the folder itself (--dir, a mount target)
            }
            let file = rest.to_string_lossy();
            assert!(
                files.contains(file.as_ref()),
                "services.{name}: {s:?} is not written by certs init (it writes {files:?})"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no service refers to the certificates in {}", dir.display());
    Ok(())
}

#[test]
fn compose_proxy_config_parses_and_its_files_are_mounted() -> TestResult {
    let compose = yaml("docker-compose.yml")?;
    let services = services(&compose)?;
    let guard = services.get("etcd-guard").ok_or("docker-compose.yml: no `etcd-guard` service")?;
    let mounts = mounts(guard, "etcd-guard")?;

    // The config the image's CMD (or the service's command) names.
    let command = guard.get("command").map(words).unwrap_or_default();
    let config_in_container = match command.iter().position(|a| a == "--config") {
        Some(i) => PathBuf::from(command.get(i + 1).ok_or("--config without a value")?),
        None => {
            let dockerfile = read("Dockerfile")?;
            assert!(dockerfile.contains("/etc/etcd-guard/etcd-guard.yaml"), "Dockerfile: CMD should name the config");
            PathBuf::from("/etc/etcd-guard/etcd-guard.yaml")
        }
    };
    let config_host = host_path(&mounts, &config_in_container)
        .ok_or(format!("services.etcd-guard: nothing mounts {}", config_in_container.display()))?;
    assert!(config_host.starts_with(repo()), "the compose config should come from the repository");
    let text = std::fs::read_to_string(&config_host).map_err(|e| format!("{}: {e}", config_host.display()))?;
    let config = Config::parse(&text, &config_in_container)?;

    // Every file the config names is inside a mount of the service.
    let CertsRun { dir: certs_dir, files: cert_files, .. } = compose_certs(services)?;
    for (what, path) in [
        ("tls.cert_file", &config.tls.cert_file),
        ("tls.key_file", &config.tls.key_file),
        ("tls.client_ca_file", &config.tls.client_ca_file),
        ("upstream.ca_file", &config.upstream.ca_file),
        ("upstream.cert_file", &config.upstream.cert_file),
        ("upstream.key_file", &config.upstream.key_file),
    ] {
        let rest = path
            .strip_prefix(&certs_dir)
            .map_err(|_| format!("{what}: {} is not in {}", path.display(), certs_dir.display()))?;
        assert!(
            cert_files.contains(rest.to_string_lossy().as_ref()),
            "{what}: certs init does not write {}",
            path.display()
        );
        assert!(mounts.iter().any(|m| under(path, &m.target)), "{what}: {} is not mounted", path.display());
    }
    // The policy resolves to a policy of the repository that loads.
    let policy = host_path(&mounts, &config.policy_file)
        .ok_or(format!("policy_file {} is not in a bind mount", config.policy_file.display()))?;
    Policy::load(&policy).map_err(|e| format!("{}: {e}", policy.display()))?;
    // Audit records go to a file on a writable mount, where `audit verify` and `audit review` can read them.
    let raw = yaml("deploy/compose/etcd-guard.yaml")?;
    let audit = audit_file(&raw, "deploy/compose/etcd-guard.yaml")?;
    let audit = config_in_container.parent().unwrap_or(Path::new("/")).join(audit);
    assert!(
        mounts.iter().any(|m| !m.read_only && under(&audit, &m.target)),
        "audit.file {} is not on a writable mount",
        audit.display()
    );
    // Clients and the host reach the proxy where it listens, and the health listener where it is documented.
    let published = words(guard_namespace_service(services)?.get("ports").unwrap_or(&Value::Null));
    let publishes = |port: u16| published.iter().any(|p| p.ends_with(&format!(":{port}")));
    let port = config.listen.port();
    assert!(publishes(port), "the proxy's port {port} is not published: {published:?}");
    let metrics = config.metrics_listen.ok_or("metrics_listen is off")?;
    assert_eq!(metrics.port(), 23791, "metrics_listen: {metrics}");
    assert!(!metrics.ip().is_loopback(), "metrics_listen {metrics}: the container's loopback cannot be published");
    assert!(publishes(metrics.port()), "metrics_listen {metrics} is not published: {published:?}");
    assert!(
        published.iter().filter(|p| p.ends_with(":23791")).all(|p| p.starts_with("127.0.0.1:")),
        "the health listener has no authentication: publish it on the host's loopback only: {published:?}"
    );
    Ok(())
}

/// The compose service that owns etcd-guard's network namespace (and so publishes its ports).
fn guard_namespace_service(services: &serde_json::Map<String, Value>) -> Result<&Value, Error> {
    let owner = namespace_of(services, "etcd-guard", 0);
    Ok(services.get(&owner).ok_or(format!("docker-compose.yml: no service {owner:?}"))?)
}

/// `audit.file` of a shipped configuration: set explicitly to a file (not standard output), auditing enabled.
fn audit_file<'a>(raw: &'a Value, what: &str) -> Result<&'a str, Error> {
    assert_ne!(raw.pointer("/audit/enabled").and_then(Value::as_bool), Some(false), "{what}: audit.enabled");
    let file = raw.pointer("/audit/file").and_then(Value::as_str).ok_or(format!("{what}: audit.file is not set"))?;
    assert!(file != "-" && file.starts_with('/'), "{what}: audit.file {file:?} should be an absolute file path");
    Ok(file)
}

// === Dockerfile ===

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() -> TestResult {
    let text = read("Dockerfile")?;
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let froms: Vec<&str> = lines.iter().copied().filter(|l| l.to_uppercase().starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "Dockerfile: expected a build stage and a runtime stage, found {froms:?}");
    assert!(
        froms[0].contains("rust:1-bookworm"),
        "Dockerfile: the build stage should be rust:1-bookworm: {}",
        froms[0]
    );
    assert!(text.contains("cargo build --release --locked -p etcd-guard"), "Dockerfile: release build of etcd-guard");

    // The last USER of the final stage decides who runs the binary.
    let final_stage = text.rfind("\nFROM ").ok_or("Dockerfile: no FROM")?;
    let user = text[final_stage..]
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| l.to_uppercase().starts_with("USER "))
        .ok_or("Dockerfile: the runtime stage has no USER line")?;
    let who = user[5..].trim();
    let name = who.split(':').next().unwrap_or(who);
    assert!(!["root", "0", ""].contains(&name), "Dockerfile: runs as {who:?}");

    assert!(lines.iter().any(|l| l.starts_with("ENTRYPOINT") && l.contains("etcd-guard")), "Dockerfile: ENTRYPOINT");
    let exposed: Vec<&str> =
        lines.iter().filter(|l| l.starts_with("EXPOSE")).flat_map(|l| l.split_whitespace().skip(1)).collect();
    assert!(exposed.contains(&"23790") && exposed.contains(&"23791"), "Dockerfile: EXPOSE {exposed:?}");

    let ignore = read(".dockerignore")?;
    let ignored: Vec<&str> = ignore.lines().map(str::trim).collect();
    assert!(ignored.iter().any(|l| l.trim_end_matches('/') == "target"), ".dockerignore: target/");
    assert!(ignored.iter().any(|l| l.trim_end_matches('/') == ".git"), ".dockerignore: .git");
    Ok(())
}

// === systemd ===

/// `Key=value` settings of a unit file, in order (a key may repeat).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect()
}

#[test]
fn systemd_unit_serves_a_valid_config_in_a_sandbox() -> TestResult {
    let text = read("deploy/systemd/etcd-guard.service")?;
    let settings = unit_settings(&text);
    let get = |key: &str| settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect::<Vec<_>>();

    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1, "ExecStart: {exec:?}");
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert!(argv.first().is_some_and(|b| b.ends_with("/etcd-guard")), "ExecStart: {exec:?}");
    let at = argv.windows(2).position(|w| w == ["serve", "--config"]).ok_or("ExecStart: no `serve --config`")?;
    let config_path = PathBuf::from(argv.get(at + 2).ok_or("ExecStart: --config without a value")?);

    assert!(!get("User").is_empty() || get("DynamicUser") == ["yes"], "the unit must not run as root");
    assert!(get("User").iter().all(|u| *u != "root"), "User=root");
    for (key, want) in
        [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes")]
    {
        assert_eq!(get(key), [want], "{key}");
    }
    assert_eq!(get("CapabilityBoundingSet"), [""], "CapabilityBoundingSet= (no capabilities)");
    let writable: Vec<PathBuf> =
        get("ReadWritePaths").iter().flat_map(|v| v.split_whitespace()).map(PathBuf::from).collect();
    assert!(writable.contains(&PathBuf::from("/var/log/etcd-guard")), "ReadWritePaths: {writable:?}");
    // `systemctl reload`: SIGHUP last, after anything that checks the files.
    let reload = get("ExecReload");
    assert_eq!(reload.last(), Some(&"/bin/kill -HUP $MAINPID"), "ExecReload: {reload:?}");

    // The example config next to the unit parses as if installed at the --config path, and its audit log is
    // in a writable path.
    let config_text = read("deploy/systemd/etcd-guard.yaml")?;
    let config = Config::parse(&config_text, &config_path)?;
    assert!(config.policy_file.starts_with("/etc/etcd-guard"), "policy_file: {}", config.policy_file.display());
    let raw = yaml("deploy/systemd/etcd-guard.yaml")?;
    let audit = audit_file(&raw, "deploy/systemd/etcd-guard.yaml")?;
    let audit = config_path.parent().unwrap_or(Path::new("/")).join(audit);
    assert!(writable.iter().any(|w| under(&audit, w)), "audit file {} is not in ReadWritePaths", audit.display());
    let metrics = config.metrics_listen.ok_or("metrics_listen is off")?;
    assert!(metrics.ip().is_loopback() && metrics.port() == 23791, "metrics_listen {metrics}");
    Ok(())
}

// === Kubernetes static pod ===

#[test]
fn static_pod_runs_beside_etcd_with_its_config_mounted() -> TestResult {
    let pod = yaml("deploy/kubernetes/etcd-guard.yaml")?;
    assert_eq!(pod.get("apiVersion").and_then(Value::as_str), Some("v1"));
    assert_eq!(pod.get("kind").and_then(Value::as_str), Some("Pod"));
    assert_eq!(pod.pointer("/metadata/namespace").and_then(Value::as_str), Some("kube-system"));
    let spec = pod.get("spec").ok_or("no spec")?;
    assert_eq!(spec.get("hostNetwork").and_then(Value::as_bool), Some(true), "hostNetwork");
    assert_eq!(spec.get("priorityClassName").and_then(Value::as_str), Some("system-node-critical"));

    let volumes: BTreeSet<&str> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .ok_or("no volumes")?
        .iter()
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .collect();
    let containers = spec.get("containers").and_then(Value::as_array).ok_or("no containers")?;
    assert_eq!(containers.len(), 1, "one container");
    let c = &containers[0];
    assert!(c.get("image").and_then(Value::as_str).is_some_and(|i| !i.is_empty()), "image");

    let mut mounts: Vec<(PathBuf, bool)> = Vec::new();
    for m in c.get("volumeMounts").and_then(Value::as_array).ok_or("no volumeMounts")? {
        let name = str_of(m.get("name").unwrap_or(&Value::Null), "volumeMounts[].name")?;
        assert!(volumes.contains(name), "volumeMount {name:?} has no volume");
        let path = str_of(m.get("mountPath").unwrap_or(&Value::Null), "volumeMounts[].mountPath")?;
        mounts.push((PathBuf::from(path), m.get("readOnly").and_then(Value::as_bool).unwrap_or(false)));
    }
    let mounted = |p: &Path| mounts.iter().any(|(m, _)| under(p, m));
    let writable = |p: &Path| mounts.iter().any(|(m, ro)| !ro && under(p, m));

    let args = words(c.get("args").unwrap_or(&Value::Null));
    let at = args.windows(2).position(|w| w == ["serve", "--config"]).ok_or("args: no `serve --config`")?;
    let config_path = PathBuf::from(args.get(at + 2).ok_or("--config without a value")?);
    assert!(mounted(&config_path), "the config {} is not mounted", config_path.display());

    // Probes on the health listener, which the config keeps on loopback: with hostNetwork the kubelet would probe
    // the node IP, so each probe names 127.0.0.1. Resources set.
    let text = read("deploy/kubernetes/etcd-guard-config.yaml")?;
    let config = Config::parse(&text, &config_path)?;
    let metrics = config.metrics_listen.ok_or("metrics_listen is off: the probes need it")?;
    assert!(metrics.ip().is_loopback(), "metrics_listen {metrics}: keep the unauthenticated listener on loopback");
    for (probe, path) in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = c.pointer(&format!("/{probe}/httpGet")).ok_or(format!("{probe}: httpGet"))?;
        assert_eq!(get.get("path").and_then(Value::as_str), Some(path), "{probe}");
        assert_eq!(get.get("port").and_then(Value::as_u64), Some(u64::from(metrics.port())), "{probe}");
        assert_eq!(get.get("host").and_then(Value::as_str), Some(metrics.ip().to_string().as_str()), "{probe}: host");
    }
    let ports: Vec<u64> = c
        .get("ports")
        .and_then(Value::as_array)
        .map(|p| p.iter().filter_map(|p| p.get("containerPort").and_then(Value::as_u64)).collect())
        .unwrap_or_default();
    assert!(ports.contains(&u64::from(config.listen.port())) && ports.contains(&23791), "ports: {ports:?}");
    assert!(c.pointer("/resources/requests/cpu").is_some() && c.pointer("/resources/requests/memory").is_some());
    assert!(c.pointer("/resources/limits/memory").is_some());
    assert_eq!(c.pointer("/securityContext/allowPrivilegeEscalation").and_then(Value::as_bool), Some(false));
    assert_eq!(c.pointer("/securityContext/readOnlyRootFilesystem").and_then(Value::as_bool), Some(true));

    // The node config example parses at that path, uses kubeadm's etcd PKI, and every file it names is mounted.
    assert_eq!(config.upstream.endpoints, ["https://127.0.0.1:2379"], "upstream: the local etcd member");
    for (what, path) in [
        ("tls.cert_file", &config.tls.cert_file),
        ("tls.key_file", &config.tls.key_file),
        ("tls.client_ca_file", &config.tls.client_ca_file),
        ("upstream.ca_file", &config.upstream.ca_file),
        ("upstream.cert_file", &config.upstream.cert_file),
        ("upstream.key_file", &config.upstream.key_file),
    ] {
        assert!(path.starts_with("/etc/kubernetes/pki/etcd"), "{what}: {} is not kubeadm's etcd PKI", path.display());
        assert!(mounted(path), "{what}: {} is not mounted", path.display());
    }
    assert!(mounted(&config.policy_file), "policy_file {} is not mounted", config.policy_file.display());
    let raw = yaml("deploy/kubernetes/etcd-guard-config.yaml")?;
    let audit = audit_file(&raw, "deploy/kubernetes/etcd-guard-config.yaml")?;
    let audit = config_path.parent().unwrap_or(Path::new("/")).join(audit);
    assert!(writable(&audit), "audit file {} is not on a writable mount", audit.display());
    Ok(())
}

// === all of them ===

#[test]
fn packaging_uses_the_health_port_23791_not_the_old_placeholder() -> TestResult {
    let mut files = vec!["Dockerfile".to_string(), "docker-compose.yml".to_string(), "docs/deployment.md".to_string()];
    for dir in ["deploy/compose", "deploy/systemd", "deploy/kubernetes"] {
        for entry in std::fs::read_dir(repo().join(dir))? {
            files.push(format!("{dir}/{}", entry?.file_name().to_string_lossy()));
        }
    }
    for file in &files {
        let text = read(file)?;
        assert!(!text.contains("9090"), "{file} still names port 9090 (the health listener is on 23791)");
    }
    Ok(())
}
