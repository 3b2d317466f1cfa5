//! The `etcd-guard` binary as a user runs it: `policy check`, `policy validate`, `certs init`, `config check`,
//! and `serve` refusing a broken configuration at start.

use std::path::Path;
use std::process::{Command, Output};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn guard(args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_etcd-guard")).args(args).output()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn policy_path() -> String {
    format!("{}/../policies/kubernetes.yaml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn policy_check_allows_with_the_deciding_role_and_exits_0() -> TestResult {
    let p = policy_path();
    let o = guard(&[
        "policy",
        "check",
        "--policy",
        &p,
        "--common-name",
        "kube-apiserver-etcd-client",
        "--issuer",
        "etcd",
        "--rpc",
        "put",
        "--key",
        "/registry/pods/default/a",
    ])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("kube-apiserver"), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).trim_end().ends_with("allow"), "{}", text(&o));
    Ok(())
}

#[test]
fn policy_check_denies_outside_a_prefix_and_exits_1() -> TestResult {
    let p = policy_path();
    let cilium = "spiffe://cluster.local/ns/kube-system/sa/cilium";
    // `cilium0` is just past the end of the prefix `cilium/`.
    for (rpc, key, extra) in [
        ("get", "cilium0", None),
        ("get", "cilium/", Some("--range-end=cilium0\\x00")),
        ("put", "/registry/secrets/x", None),
        ("snapshot", "", None),
    ] {
        let mut args = vec!["policy", "check", "--policy", &p, "--uri-san", cilium, "--rpc", rpc];
        if !key.is_empty() {
            args.extend(["--key", key]);
        }
        args.extend(extra);
        let o = guard(&args)?;
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).trim_end().ends_with("deny"), "{}", text(&o));
    }
    // Inside the prefix, with a range ending exactly at the prefix's end.
    let o = guard(&[
        "policy",
        "check",
        "--policy",
        &p,
        "--uri-san",
        cilium,
        "--rpc",
        "get",
        "--key",
        "cilium/",
        "--range-end",
        "cilium0",
    ])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    Ok(())
}

#[test]
fn policy_check_refuses_flags_its_rpc_does_not_take() -> TestResult {
    let p = policy_path();
    let check = |extra: &[&str]| {
        let mut args = vec!["policy", "check", "--policy", &p, "--common-name", "cilium-agent"];
        args.extend_from_slice(extra);
        guard(&args)
    };
    for (extra, flag) in [
        (&["--rpc", "put", "--key", "cilium/a", "--range-end", "cilium/z"][..], "--range-end"),
        (&["--rpc", "get", "--key", "cilium/a", "--prev-kv"][..], "--prev-kv"),
        (&["--rpc", "status", "--key", "cilium/a"][..], "--key"),
        (&["--rpc", "lock", "--key", "cilium/a", "--prefix"][..], "--prefix"),
    ] {
        let o = check(extra)?;
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", text(&o));
        assert!(text(&o).contains(&format!("{flag} does not apply")), "{extra:?}: {}", text(&o));
    }
    // What they do take still works.
    let o = check(&["--rpc", "delete", "--prefix", "--key", "cilium/state/nodes/", "--prev-kv"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    Ok(())
}

/// `observe` is checked as `leader` (Observe's request is Leader's), and what `policy validate` warns about is
/// printed with the answer, which it bears on: here the read comes from a binding every certificate matches.
#[test]
fn policy_check_takes_observe_and_prints_the_policys_warnings() -> TestResult {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "roles:\n  - name: elections\n    keys:\n      - { prefix: \"elections/\", access: read }\n\
         bindings:\n  - role: elections\n    subjects:\n      - { common_name: \"*\" }\n",
    )?;
    let p = policy.display().to_string();
    let o = guard(&[
        "policy",
        "check",
        "--policy",
        &p,
        "--common-name",
        "anyone",
        "--rpc",
        "observe",
        "--key",
        "elections/e",
    ])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("etcd-guard: warning:") && stderr.contains("every client certificate"), "{stderr}");
    let o =
        guard(&["policy", "check", "--policy", &p, "--common-name", "anyone", "--rpc", "observe", "--key", "other"])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    Ok(())
}

#[test]
fn policy_check_explains_a_deny_rule() -> TestResult {
    let p = policy_path();
    let o = guard(&[
        "policy",
        "check",
        "--policy",
        &p,
        "--common-name",
        "prometheus",
        "--organization",
        "monitoring",
        "--rpc",
        "get",
        "--key",
        "/registry/secrets/kube-system/token",
    ])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("/registry/secrets/"), "the deny rule is named: {}", text(&o));
    Ok(())
}

#[test]
fn policy_validate_names_file_and_line() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "roles:\n  - name: r\n    keys:\n      - { range: { from: \"b\", to: \"a\" }, access: read }\nbindings: []\n",
    )?;
    let o = guard(&["policy", "validate", &file.display().to_string()])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("bad.yaml") && t.contains(":4"), "file and line: {t}");
    Ok(())
}

/// A policy that denies everyone on purpose (a role, no bindings; an empty one is refused).
const NOBODY: &str = "roles: [ { name: nobody } ]\n";

fn write_config(dir: &Path, extra_policy: &str) -> std::io::Result<std::path::PathBuf> {
    std::fs::write(dir.join("policy.yaml"), extra_policy)?;
    let path = dir.join("etcd-guard.yaml");
    std::fs::write(
        &path,
        r#"listen: "127.0.0.1:0"
tls:
  cert_file: server.crt
  key_file: server.key
  client_ca_file: ca.crt
upstream:
  endpoints: ["https://127.0.0.1:2379"]
  ca_file: ca.crt
  cert_file: upstream-client.crt
  key_file: upstream-client.key
policy_file: policy.yaml
"#,
    )?;
    Ok(path)
}

#[test]
fn certs_init_then_config_check_passes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display().to_string();
    let o = guard(&["certs", "init", "--dir", &d, "--client", "admin", "--client", "prometheus:monitoring"])?;
    assert!(o.status.success(), "{}", text(&o));
    for f in ["ca.crt", "server.crt", "server.key", "upstream-client.crt", "admin.crt", "prometheus.key"] {
        assert!(dir.path().join(f).is_file(), "{f} written");
    }
    let cfg = write_config(dir.path(), NOBODY)?;
    let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
    assert!(o.status.success(), "{}", text(&o));

    // An empty policy (what an editor leaves while it writes the file) is refused as at start and on reload.
    std::fs::write(dir.path().join("policy.yaml"), "")?;
    let policy = dir.path().join("policy.yaml").display().to_string();
    for cmd in [vec!["config", "check", "--config", &cfg.display().to_string()], vec!["policy", "validate", &policy]] {
        let o = guard(&cmd)?;
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", text(&o));
        assert!(text(&o).contains("the policy is empty"), "{cmd:?}: {}", text(&o));
    }
    Ok(())
}

#[test]
fn broken_configs_are_refused_at_start_naming_file_and_problem() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display().to_string();
    assert!(guard(&["certs", "init", "--dir", &d, "--client", "admin"])?.status.success());
    let cfg = write_config(dir.path(), NOBODY)?;
    let cfg_s = cfg.display().to_string();

    // A key that does not belong to the certificate.
    std::fs::copy(dir.path().join("server.key"), dir.path().join("server.key.orig"))?;
    std::fs::copy(dir.path().join("admin.key"), dir.path().join("server.key"))?;
    for cmd in [vec!["serve", "--config", &cfg_s], vec!["config", "check", "--config", &cfg_s]] {
        let o = guard(&cmd)?;
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains("server.key") || t.contains("server.crt"), "{cmd:?} names the file: {t}");
        assert!(t.contains("match"), "{cmd:?} says what is wrong: {t}");
    }

    // A missing file.
    std::fs::remove_file(dir.path().join("server.key"))?;
    let o = guard(&["serve", "--config", &cfg_s])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("server.key"), "{}", text(&o));

    // A config that does not parse.
    std::fs::write(&cfg, "listen: [\n")?;
    let o = guard(&["serve", "--config", &cfg_s])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("etcd-guard.yaml"), "{}", text(&o));

    // A config naming a policy that does not load.
    let cfg =
        write_config(dir.path(), "roles: []\nbindings:\n  - role: ghost\n    subjects: [ { common_name: x } ]\n")?;
    std::fs::copy(dir.path().join("server.key.orig"), dir.path().join("server.key"))?;
    let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("ghost"), "{}", text(&o));
    Ok(())
}

#[test]
fn help_lists_the_commands() -> TestResult {
    let o = guard(&["--help"])?;
    assert!(o.status.success());
    for c in ["serve", "policy", "certs", "config"] {
        assert!(text(&o).contains(c), "{c}: {}", text(&o));
    }
    let o = guard(&["serve", "--help"])?;
    for flag in ["--listen", "--policy", "--upstream", "--metrics-listen", "--audit-file"] {
        assert!(text(&o).contains(flag), "{flag}: {}", text(&o));
    }
    Ok(())
}

/// A folder with development certificates and a configuration (with an empty policy) that `config check` passes.
fn checkable_dir() -> Result<(tempfile::TempDir, std::path::PathBuf), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display().to_string();
    assert!(guard(&["certs", "init", "--dir", &d])?.status.success());
    let cfg = write_config(dir.path(), NOBODY)?;
    Ok((dir, cfg))
}

/// An HMAC key `serve` would refuse (missing, too short) fails the check too (before: `ok`, then `serve` failed).
#[test]
fn config_check_reads_the_audit_hmac_key() -> TestResult {
    let (dir, cfg) = checkable_dir()?;
    let base = std::fs::read_to_string(&cfg)?;
    std::fs::write(dir.path().join("short.key"), "12345")?;
    for (key, says) in [("missing.key", "cannot read the HMAC key"), ("short.key", "5 bytes")] {
        std::fs::write(&cfg, format!("{base}audit: {{ file: audit.log, hmac_key_file: {key} }}\n"))?;
        let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(says), "{key}: {}", text(&o));
    }
    std::fs::write(dir.path().join("good.key"), "0123456789abcdef0123456789abcdef")?;
    std::fs::write(&cfg, format!("{base}audit: {{ file: audit.log, hmac_key_file: good.key }}\n"))?;
    let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!dir.path().join("audit.log").exists(), "the check leaves nothing behind");
    Ok(())
}

#[test]
fn config_check_reports_an_audit_log_that_cannot_be_written() -> TestResult {
    let (dir, cfg) = checkable_dir()?;
    // A file where the audit folder should be.
    std::fs::write(dir.path().join("not-a-folder"), "x")?;
    let text_cfg = std::fs::read_to_string(&cfg)? + "audit: { file: not-a-folder/audit.log }\n";
    std::fs::write(&cfg, text_cfg)?;
    let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("audit") && text(&o).contains("not-a-folder"), "{}", text(&o));
    Ok(())
}

/// `serve` refuses to go on with an audit log whose last record does not verify under the configured HMAC key (a
/// changed or removed key): `config check` says so too, rather than `ok` before a service manager's restart loop.
#[test]
fn config_check_refuses_a_key_the_audit_log_was_not_written_with() -> TestResult {
    let (dir, cfg) = checkable_dir()?;
    let base = std::fs::read_to_string(&cfg)?;
    std::fs::write(dir.path().join("a.key"), "0123456789abcdef0123456789abcdef")?;
    std::fs::write(dir.path().join("b.key"), "fedcba9876543210fedcba9876543210")?;
    let with_key = |key: &str| -> std::io::Result<()> {
        let audit = match key {
            "" => "audit: { file: audit/audit.log }\n".to_string(),
            key => format!("audit: {{ file: audit/audit.log, hmac_key_file: {key} }}\n"),
        };
        std::fs::write(&cfg, format!("{base}{audit}"))
    };
    // A run with key a leaves its opening record.
    with_key("a.key")?;
    let mut serving = Command::new(env!("CARGO_BIN_EXE_etcd-guard"))
        .args(["serve", "--config", &cfg.display().to_string(), "--metrics-listen", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let log = dir.path().join("audit/audit.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(&log).map_or(true, |t| !t.ends_with('\n')) {
        if std::time::Instant::now() > deadline {
            let _ = serving.kill();
            return Err("no audit record 20 s after start".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    serving.kill()?;
    serving.wait()?;

    let check = || guard(&["config", "check", "--config", &cfg.display().to_string()]);
    let o = check()?;
    assert_eq!(o.status.code(), Some(0), "the same key: {}", text(&o));
    for (key, keyed) in [("b.key", "with the configured HMAC key"), ("", "(unkeyed)")] {
        with_key(key)?;
        let o = check()?;
        assert_eq!(o.status.code(), Some(2), "{key:?}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains("audit.log") && t.contains(keyed) && t.contains("hmac_key_file"), "{key:?}: {t}");
    }
    Ok(())
}

/// An `audit-only` binding serves what its roles would deny: `policy check` says `would-deny` (exit 3: neither what
/// `allow` nor what `deny` intends), and `policy validate` and `config check` warn about such bindings.
#[test]
fn audit_only_bindings_are_named_and_checked_as_the_proxy_serves_them() -> TestResult {
    let (dir, cfg) = checkable_dir()?;
    let policy = "roles:\n  - { name: r, keys: [ { prefix: \"app/\", access: read } ] }\n\
                  bindings:\n  - { role: r, mode: audit-only, subjects: [ { common_name: trial } ] }\n";
    std::fs::write(dir.path().join("policy.yaml"), policy)?;
    let p = dir.path().join("policy.yaml").display().to_string();
    let check = |rpc: &str, key: &str| {
        guard(&["policy", "check", "--policy", &p, "--common-name", "trial", "--rpc", rpc, "--key", key])
    };
    let o = check("get", "app/x")?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).trim_end().ends_with("allow"), "{}", text(&o));
    // The answer comes with the warning about audit-only bindings, on standard error.
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning:") && text(&o).contains("audit-only"), "{}", text(&o));
    let o = check("put", "other")?;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).lines().last().is_some_and(|l| l.starts_with("would-deny")),
        "{}",
        text(&o)
    );
    // Another identity is bound to nothing: denied.
    let o = guard(&["policy", "check", "--policy", &p, "--common-name", "other", "--rpc", "get", "--key", "app/x"])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    for cmd in [vec!["policy", "validate", p.as_str()], vec!["config", "check", "--config", &cfg.to_string_lossy()]] {
        let o = guard(&cmd)?;
        assert_eq!(o.status.code(), Some(0), "{cmd:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("warning") && err.contains("audit-only bindings[0]") && err.contains("\"r\""),
            "{cmd:?}: {err}"
        );
    }
    Ok(())
}

/// `policy check … | head -1` (or `grep -q`) closes the pipe early: the exit code still says the decision.
#[test]
fn policy_check_with_its_output_closed_exits_with_the_decision() -> TestResult {
    let p = policy_path();
    for (key, code) in [("/registry/secrets/x", "rc=1"), ("", "rc=2")] {
        let o = Command::new("sh")
            // The reader is gone (`true` exits at once) before the check has loaded its policy and writes.
            .args([
                "-c",
                r#"exec 3>&1; { "$@" 2>/dev/null; echo "rc=$?" >&3; } | true"#,
                "sh",
                env!("CARGO_BIN_EXE_etcd-guard"),
            ])
            .args(["policy", "check", "--policy", &p, "--common-name", "cilium-agent", "--rpc", "get", "--key", key])
            .output()?;
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), code, "{key:?}: {}", text(&o));
    }
    Ok(())
}

#[test]
fn config_check_refuses_metrics_on_the_listen_address() -> TestResult {
    let (_dir, cfg) = checkable_dir()?;
    let base = std::fs::read_to_string(&cfg)?.replace("127.0.0.1:0", "127.0.0.1:42379");
    for metrics in ["127.0.0.1:42379", "0.0.0.0:42379"] {
        std::fs::write(&cfg, format!("{base}metrics_listen: \"{metrics}\"\n"))?;
        let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
        assert_eq!(o.status.code(), Some(2), "{metrics}: {}", text(&o));
        assert!(text(&o).contains("metrics_listen") && text(&o).contains("same port"), "{}", text(&o));
    }
    std::fs::write(&cfg, format!("{base}metrics_listen: \"127.0.0.1:42380\"\n"))?;
    let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("warning"), "{}", text(&o));
    // Off loopback: allowed, with a warning (plain HTTP, no authentication).
    std::fs::write(&cfg, format!("{base}metrics_listen: \"0.0.0.0:42380\"\n"))?;
    let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("warning: metrics_listen 0.0.0.0:42380 is not a loopback address"), "{}", text(&o));
    Ok(())
}

/// A SIGHUP reloads the files the configuration names, not the configuration file itself: a change of its bytes is
/// warned about once (restart to apply it); a SIGHUP without one, or after only its time stamp moved, says nothing.
#[test]
fn a_reload_after_editing_the_configuration_file_says_it_was_not_applied() -> TestResult {
    let (dir, cfg) = checkable_dir()?;
    let stderr = std::fs::File::create(dir.path().join("serve.log"))?;
    let mut serving = Command::new(env!("CARGO_BIN_EXE_etcd-guard"))
        .args(["serve", "--config", &cfg.display().to_string(), "--metrics-listen", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()?;
    let result = (|| -> TestResult {
        let log = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
        let wait_for = |what: &str, count: usize| -> TestResult {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while log().matches(what).count() < count {
                if std::time::Instant::now() > deadline {
                    return Err(format!("no {count}× {what:?} within 20 s: {}", log()).into());
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Ok(())
        };
        let hup = |n: usize| -> TestResult {
            assert!(Command::new("kill").args(["-HUP", &serving.id().to_string()]).status()?.success());
            // Every part reloaded (policy, listener, upstream), so the configuration file was looked at.
            wait_for("reloaded", 3 * n)
        };
        let warning = "the configuration file changed";
        wait_for("etcd-guard serving", 1)?;
        hup(1)?;
        // Same bytes, newer time stamp.
        let text = std::fs::read_to_string(&cfg)?;
        std::fs::write(&cfg, &text)?;
        hup(2)?;
        std::fs::write(&cfg, format!("{text}shutdown_grace_ms: 5000\n"))?;
        hup(3)?;
        wait_for(warning, 1)?;
        hup(4)?;
        assert_eq!(log().matches(warning).count(), 1, "{}", log());
        assert!(log().contains("restart etcd-guard to apply it"), "{}", log());
        Ok(())
    })();
    serving.kill()?;
    serving.wait()?;
    result
}

/// `policy grants` lists what a certificate gets, read from the certificate as the proxy reads it; `policy check
/// --cert` decides for the same identity.
#[test]
fn policy_grants_lists_what_a_certificate_gets() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display().to_string();
    let spiffe = "cilium-agent=spiffe://cluster.local/ns/kube-system/sa/cilium-agent";
    let o = guard(&["certs", "init", "--dir", &d, "--client", "cilium-agent", "--client-uri", spiffe])?;
    assert!(o.status.success(), "{}", text(&o));
    let cert = dir.path().join("cilium-agent.crt").display().to_string();
    let p = policy_path();

    let o = guard(&["policy", "grants", "--policy", &p, "--cert", &cert])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    for expected in [
        "identity: common_name \"cilium-agent\", uri_san \"spiffe://cluster.local/ns/kube-system/sa/cilium-agent\"",
        "roles: \"cilium-agent\"",
        "read:\n  prefix \"cilium/\"\nwrite:\n  [cilium/, cilium/.heartbeat)\n",
        "cluster: status, lease",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }

    let o =
        guard(&["policy", "check", "--policy", &p, "--cert", &cert, "--rpc", "get", "--key", "/registry/secrets/x"])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = guard(&["policy", "check", "--policy", &p, "--cert", &cert, "--rpc", "put", "--key", "cilium/x"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // Nothing bound: said, not an error.
    let o = guard(&["policy", "grants", "--policy", &p, "--common-name", "somebody-else"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("no binding matches this identity: every request is denied"), "{}", text(&o));
    // A file without a certificate, and --cert beside a field of the identity, are errors.
    let key = dir.path().join("cilium-agent.key").display().to_string();
    let o = guard(&["policy", "grants", "--policy", &p, "--cert", &key])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("it holds a private key, not a certificate"), "{}", text(&o));
    let o = guard(&["policy", "grants", "--policy", &p, "--cert", &cert, "--common-name", "x"])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // What the handshake refuses for the certificate's own sake is refused here too, with the reason.
    let ca = dir.path().join("ca.crt").display().to_string();
    let o = guard(&["policy", "grants", "--policy", &p, "--cert", &ca])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("the proxy refuses it at the handshake: it is a CA certificate"), "{}", text(&o));
    // A chain file: what follows the leaf is checked as what a client sends along with it (a CA of the leaf's
    // issuer's name that may not sign certificates is refused).
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "etcd-guard development CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let signer = params.self_signed(&rcgen::KeyPair::generate()?)?;
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, format!("{}{}", std::fs::read_to_string(&cert)?, signer.pem()))?;
    let o = guard(&["policy", "grants", "--policy", &p, "--cert", &chain.display().to_string()])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("may not sign certificates"), "{}", text(&o));
    // Without any identity there is nothing to answer for.
    let o = guard(&["policy", "grants", "--policy", &p])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // Only an issuer keeps kube-apiserver's binding from matching: said, with the flag to add; a name no binding
    // uses is noted.
    let o = guard(&["policy", "grants", "--policy", &p, "--common-name", "kube-apiserver-etcd-client"])?;
    assert!(
        text(&o).contains("(role \"kube-apiserver\") would for a certificate that chains to the CA named \"etcd\"")
    );
    assert!(text(&o).contains("add --issuer etcd"), "{}", text(&o));
    let o = guard(&["policy", "grants", "--policy", &p, "--cert", &cert, "--issuer", "etcdd"])?;
    assert!(text(&o).contains("no binding names issuer \"etcdd\" (the bindings name: etcd)"), "{}", text(&o));
    Ok(())
}

/// An advertised URL that the listener's certificate is not valid for is a warning (clients that sync their
/// endpoints from MemberList would refuse the proxy), not a failure; one it names is silent.
#[test]
fn config_check_warns_of_advertised_urls_the_certificate_does_not_name() -> TestResult {
    let (dir, cfg) = checkable_dir()?;
    let base = std::fs::read_to_string(&cfg)?;
    for (url, warned) in [("https://127.0.0.1:23790", false), ("https://etcd-guard.example:23790", true)] {
        std::fs::write(&cfg, format!("{base}advertise_client_urls: [\"{url}\"]\n"))?;
        let o = guard(&["config", "check", "--config", &cfg.display().to_string()])?;
        assert!(o.status.success(), "{}", text(&o));
        let says = "is not valid for etcd-guard.example";
        assert_eq!(text(&o).contains(says), warned, "{url}: {}", text(&o));
    }
    drop(dir);
    Ok(())
}
