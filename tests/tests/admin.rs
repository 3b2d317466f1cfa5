//! An admin identity can do everything etcdctl offers through etcd-guard, with the same results as direct.

use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_guard_tests::{ClientCert, Harness, TestResult, etcd_tool, etcdctl_stdin, stderr, stdout};

fn ok(o: &std::process::Output, what: &str) -> TestResult<String> {
    if !o.status.success() {
        return Err(format!("{what} failed: {}{}", stdout(o), stderr(o)).into());
    }
    Ok(stdout(o))
}

/// etcdctl through the proxy as `who`, for a command that runs on (a watch, a campaign): with `timeout`, ended after
/// that many seconds.
fn etcdctl_through(h: &Harness, who: &ClientCert, timeout: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = match timeout {
        Some(secs) => {
            let mut c = Command::new("timeout");
            c.arg(secs).arg(etcd_tool("etcdctl"));
            c
        }
        None => Command::new(etcd_tool("etcdctl")),
    };
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", h.proxy_url()))
        .arg(format!("--cacert={}", h.pki.ca_file().display()))
        .arg(format!("--cert={}", who.cert.display()))
        .arg(format!("--key={}", who.key.display()))
        .args(args);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_can_do_everything_etcdctl_offers() -> TestResult {
    let h = Harness::start().await?;
    let admin = h.admin()?;
    let ctl = |args: &[&str]| h.ctl(&admin, args);

    eprintln!("step: KV");
    // KV, compared with the same reads done directly.
    assert_eq!(ok(&ctl(&["put", "foo", "bar"])?, "put")?, "OK\n");
    assert_eq!(ok(&ctl(&["put", "foo2", "baz"])?, "put")?, "OK\n");
    for args in [
        vec!["get", "foo"],
        vec!["get", "--prefix", "foo"],
        vec!["get", "--from-key", ""],
        vec!["get", "foo", "-w", "json"],
    ] {
        let through = ok(&ctl(&args)?, "get")?;
        let direct = ok(&h.ctl_direct(&args)?, "direct get")?;
        assert_eq!(through, direct, "{args:?}");
    }
    let txn = "value(\"foo\") = \"bar\"\n\nput foo qux\n\nget foo2\n\n";
    let out = etcdctl_stdin(&h.proxy_url(), &h.pki.ca_file(), &admin, &["txn"], Some(txn))?;
    assert_eq!(ok(&out, "txn")?, "SUCCESS\n\nOK\n");
    assert_eq!(ok(&ctl(&["get", "foo", "--print-value-only"])?, "get")?, "qux\n");
    assert_eq!(ok(&ctl(&["del", "foo2"])?, "del")?, "1\n");

    eprintln!("step: Watch");
    // Watch: an event put through the proxy reaches a watcher through the proxy.
    let mut watcher =
        etcdctl_through(&h, &admin, None, &["watch", "w"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_millis(700));
    ok(&ctl(&["put", "w", "1"])?, "put w")?;
    std::thread::sleep(Duration::from_millis(500));
    let _ = watcher.kill();
    let watched = watcher.wait_with_output()?;
    assert_eq!(stdout(&watched), "PUT\nw\n1\n", "{}", stderr(&watched));

    eprintln!("step: Leases");
    // Leases.
    let granted = ok(&ctl(&["lease", "grant", "60"])?, "lease grant")?;
    let id = granted.split_whitespace().nth(1).ok_or("no lease id")?.to_string();
    ok(&ctl(&["put", "leased", "x", "--lease", &id])?, "put --lease")?;
    let kept = ok(&ctl(&["lease", "keep-alive", "--once", &id])?, "keep-alive")?;
    assert!(kept.contains("keepalived with TTL"), "{kept}");
    let ttl = ok(&ctl(&["lease", "timetolive", "--keys", &id])?, "timetolive")?;
    assert!(ttl.contains("attached keys([leased])"), "{ttl}");
    assert!(ok(&ctl(&["lease", "list"])?, "lease list")?.contains(&id));
    ok(&ctl(&["lease", "revoke", &id])?, "revoke")?;
    assert_eq!(ok(&ctl(&["get", "leased"])?, "get leased")?, "");

    eprintln!("step: Lock and election");
    // Lock and election.
    let locked = ok(&ctl(&["lock", "mylock", "echo", "inside"])?, "lock")?;
    assert_eq!(locked, "inside\n");
    let elect = etcdctl_through(&h, &admin, Some("3"), &["elect", "myelection", "me"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1000));
    let candidates = ok(&ctl(&["get", "--prefix", "myelection/", "--keys-only"])?, "election keys")?;
    // Observing the election (a server-streaming call, etcd's frames passed through) shows the leader; `timeout`
    // ends the observer, which would wait for the next leader.
    let observed = etcdctl_through(&h, &admin, Some("1"), &["elect", "--listen", "myelection"]).output()?;
    let leader = stdout(&observed);
    assert!(leader.starts_with("myelection/") && leader.ends_with("\nme\n"), "{leader}{}", stderr(&observed));
    // `timeout` ends the campaigning etcdctl after 3 s (killing `timeout` itself would orphan it).
    let elected = elect.wait_with_output()?;
    assert!(stdout(&elected).starts_with("myelection/"), "{}{}", stdout(&elected), stderr(&elected));
    assert!(candidates.starts_with("myelection/"), "{candidates}");

    eprintln!("step: Cluster and maintenance");
    // Cluster and maintenance.
    let members = ok(&ctl(&["member", "list"])?, "member list")?;
    assert!(members.contains("https://127.0.0.1:23790"), "advertised URL: {members}");
    assert!(!members.contains(&h.etcd.client_url), "etcd's own URL leaked: {members}");
    let status = ok(&ctl(&["endpoint", "status"])?, "endpoint status")?;
    assert!(status.contains("3.4") || status.contains("3.5") || status.contains("3.6"), "{status}");
    ok(&ctl(&["endpoint", "health"])?, "endpoint health")?;
    ok(&ctl(&["alarm", "list"])?, "alarm list")?;
    let rev = ok(&ctl(&["get", "foo", "-w", "json"])?, "rev")?;
    let rev = rev
        .split("\"revision\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .ok_or("no revision")?
        .to_string();
    assert!(ok(&ctl(&["compaction", &rev])?, "compaction")?.contains("compacted revision"));
    assert!(ok(&ctl(&["defrag"])?, "defrag")?.contains("Finished defragmenting"));
    let snap = h.pki.path("snap.db");
    let snap_s = snap.display().to_string();
    ok(&ctl(&["snapshot", "save", &snap_s])?, "snapshot save")?;
    let status = Command::new(etcd_tool("etcdctl"))
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", &snap_s, "-w", "json"])
        .output()?;
    assert!(ok(&status, "snapshot status")?.contains("\"totalKey\""), "{}", stdout(&status));
    ok(&ctl(&["user", "list"])?, "auth service")?;
    Ok(())
}
