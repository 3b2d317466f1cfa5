//! The audit log against a real etcd: every request of a mixed session appears once with its fields, values
//! never appear, the chain holds across rotated files, and the write-failure policy works both ways.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use etcd_guard::audit::chain::{self, GENESIS, Hasher};
use etcd_guard_tests::{
    Etcd, Harness, Pki, ProxyProcess, TEST_POLICY, TestResult, etcdctl_at, proxy_process, stderr, stdout,
};
use serde_json::Value;

const SECRET: &str = "s3cr3t-VALUE-0x5e1f-do-not-log";
const SECRET2: &str = "an0ther-s3cr3t-VALUE";

/// Every audit file in `dir`, ordered by the seq of its first record.
fn audit_files(dir: &Path) -> TestResult<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let first_seq = text
            .lines()
            .next()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v["seq"].as_u64())
            .unwrap_or(u64::MAX);
        files.push((first_seq, path));
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// All records, checking the chain on the way: every line intact, seq 1, 2, 3, …, each `prev_hash` the hash
/// before it.
fn read_chain(dir: &Path) -> TestResult<Vec<Value>> {
    let hasher = Hasher::unkeyed();
    let mut prev = GENESIS.to_string();
    let mut records = Vec::new();
    for file in audit_files(dir)? {
        for (i, line) in std::fs::read_to_string(&file)?.lines().enumerate() {
            let at = format!("{}:{}", file.display(), i + 1);
            assert!(chain::line_is_intact(&hasher, line.as_bytes()), "{at}: hash");
            let v: Value = serde_json::from_str(line)?;
            assert_eq!(v["seq"].as_u64(), Some(records.len() as u64 + 1), "{at}: seq");
            assert_eq!(v["prev_hash"].as_str(), Some(prev.as_str()), "{at}: prev_hash");
            prev = v["hash"].as_str().ok_or("no hash")?.to_string();
            records.push(v);
        }
    }
    Ok(records)
}

/// All records, unchecked (for a keyed chain, which `audit verify` checks).
fn records_of(dir: &Path) -> TestResult<Vec<Value>> {
    let mut records = Vec::new();
    for file in audit_files(dir)? {
        for line in std::fs::read_to_string(&file)?.lines() {
            records.push(serde_json::from_str(line)?);
        }
    }
    Ok(records)
}

fn all_bytes(dir: &Path) -> TestResult<Vec<u8>> {
    let mut all = Vec::new();
    for f in audit_files(dir)? {
        all.extend(std::fs::read(f)?);
    }
    Ok(all)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Records matching `rpc` and `event`, from the identity with this CN.
fn select<'a>(records: &'a [Value], cn: &str, rpc: &str, event: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["identity"]["common_name"] == cn && r["rpc"] == rpc && r["event"] == event).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_of_a_mixed_session_is_recorded_once_without_values() -> TestResult {
    let mut h = Harness::start().await?;
    let admin = h.admin()?;
    let mut a = h.client(&admin).await?;
    let mut cilium = h.client(&h.cilium()?).await?;

    let put = a.put("app/secret", SECRET, None).await?;
    let put_revision = put.header().map(|h| h.revision()).ok_or("no header")?;
    a.get("app/", Some(GetOptions::new().with_prefix().with_limit(10))).await?;
    let txn = Txn::new()
        .when([Compare::value("app/secret", CompareOp::Equal, SECRET)])
        .and_then([TxnOp::put("app/x", SECRET2, None), TxnOp::txn(Txn::new().and_then([TxnOp::get("app/x", None)]))])
        .or_else([TxnOp::delete("app/", Some(etcd_client::DeleteOptions::new().with_prefix()))]);
    assert!(a.txn(txn).await?.succeeded());
    a.delete("app/x", None).await?;

    // A watch: created, an event, canceled.
    let mut w = a.watch("app/", Some(WatchOptions::new().with_prefix())).await?;
    let created = w.message().await?.ok_or("watch stream ended")?;
    assert!(created.created());
    a.put("app/y", SECRET2, None).await?;
    assert!(w.message().await?.is_some_and(|m| !m.events().is_empty()));
    w.cancel(created.watch_id()).await?;
    assert!(w.message().await?.is_some_and(|m| m.canceled()));
    drop(w);

    // A lease with three more keep-alives.
    let lease = a.lease_grant(30, None).await?.id();
    let (mut keeper, mut answers) = a.lease_keep_alive(lease).await?;
    for _ in 0..3 {
        keeper.keep_alive().await?;
        answers.message().await?;
    }
    drop((keeper, answers));
    a.lease_revoke(lease).await?;

    // Denied: a read outside the grant, and a watch outside it (answered in-stream).
    assert!(cilium.get("app/secret", None).await.is_err());
    let mut cw = cilium.watch("app/", Some(WatchOptions::new().with_prefix())).await?;
    assert!(cw.message().await?.is_some_and(|m| m.canceled()));
    drop(cw);
    // Give the stream ends a moment to be noticed, then flush everything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop((a, cilium));
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.stop_proxy().await;

    let dir = h.audit_dir();
    let bytes = all_bytes(&dir)?;
    assert!(!contains(&bytes, SECRET), "a value reached the audit log");
    assert!(!contains(&bytes, SECRET2), "a value reached the audit log");
    let records = read_chain(&dir)?;

    // Put: once, with its fields.
    let puts = select(&records, "admin", "KV/Put", "call");
    let secret_puts: Vec<_> = puts.iter().filter(|r| r["ops"][0]["key"] == "app/secret").collect();
    assert_eq!(secret_puts.len(), 1, "{puts:#?}");
    let p = secret_puts[0];
    assert_eq!(p["decision"], "allow");
    assert_eq!(p["code"], "OK");
    assert_eq!(p["revision"].as_i64(), Some(put_revision));
    assert_eq!(p["roles"], serde_json::json!(["admin"]));
    assert!(p["identity"]["fingerprint_sha256"].as_str().is_some_and(|f| f.len() == 64));
    assert!(p["peer"].as_str().is_some_and(|peer| peer.starts_with("127.0.0.1:")));
    assert!(p["conn"].as_u64().is_some() && p["latency_us"].as_u64().is_some());
    let time = p["time"].as_str().ok_or("no time")?;
    assert!(time.len() == 27 && time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
    assert!(p["reason"].as_str().is_some_and(|r| r.contains("admin")), "{p}");

    // Range with its flags; txn as a tree; delete.
    let ranges = select(&records, "admin", "KV/Range", "call");
    assert_eq!(ranges.len(), 1, "{ranges:#?}");
    assert_eq!(ranges[0]["ops"][0]["from"], "app/");
    assert_eq!(ranges[0]["ops"][0]["to"], "app0");
    assert_eq!(ranges[0]["ops"][0]["limit"], 10);
    let txns = select(&records, "admin", "KV/Txn", "call");
    assert_eq!(txns.len(), 1);
    let t = &txns[0]["ops"][0];
    assert_eq!(t["compare"][0]["key"], "app/secret");
    assert_eq!(t["compare"][0]["target"], "value");
    assert_eq!(t["success"][0]["key"], "app/x");
    assert_eq!(t["success"][1]["op"], "txn");
    assert_eq!(t["success"][1]["success"][0]["key"], "app/x");
    assert_eq!(t["failure"][0]["op"], "delete");
    assert_eq!(select(&records, "admin", "KV/DeleteRange", "call").len(), 1);

    // Watch: the create and the cancel as messages of one stream, and its end.
    let watch = select(&records, "admin", "Watch/Watch", "message");
    let ops: Vec<&str> = watch.iter().filter_map(|r| r["ops"][0]["op"].as_str()).collect();
    assert_eq!(ops, ["watch_create", "watch_cancel"], "{watch:#?}");
    let stream = watch[0]["stream"].as_u64().ok_or("no stream id")?;
    assert_eq!(watch[1]["stream"].as_u64(), Some(stream));
    let ends = select(&records, "admin", "Watch/Watch", "end");
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0]["stream"].as_u64(), Some(stream));

    // Lease: grant, keep-alives on one stream (etcd-client sends one when it opens the stream, then our three)
    // and its end, revoke.
    assert_eq!(select(&records, "admin", "Lease/LeaseGrant", "call").len(), 1);
    let kas = select(&records, "admin", "Lease/LeaseKeepAlive", "message");
    assert_eq!(kas.len(), 4, "{kas:#?}");
    assert!(kas.iter().all(|r| r["ops"][0]["lease"].as_i64() == Some(lease)));
    assert_eq!(select(&records, "admin", "Lease/LeaseKeepAlive", "end").len(), 1);
    assert_eq!(select(&records, "admin", "Lease/LeaseRevoke", "call").len(), 1);

    // Denials, with the reason.
    let denied = select(&records, "cilium-agent", "KV/Range", "call");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["decision"], "deny");
    assert_eq!(denied[0]["code"], "PermissionDenied");
    assert!(denied[0]["reason"].as_str().is_some_and(|r| r.contains("app/secret")), "{}", denied[0]);
    let denied_watch = select(&records, "cilium-agent", "Watch/Watch", "message");
    assert_eq!(denied_watch.len(), 1);
    assert_eq!(denied_watch[0]["decision"], "deny");
    assert_eq!(denied_watch[0]["ops"][0]["from"], "app/");

    // `audit review` finds the same: the cilium identity's denials, by its SPIFFE ID.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test"))
        .args(["audit", "review", "--identity", "spiffe://*/sa/cilium", "--decision", "deny", "--output", "json"])
        .arg(&dir)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let rpcs: Vec<&str> = found.iter().filter_map(|r| r["rpc"].as_str()).collect();
    assert_eq!(rpcs, ["KV/Range", "Watch/Watch"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test"))
        .args(["audit", "review", "--key-prefix", "app/secret", "--output", "json"])
        .arg(&dir)
        .output()?;
    let about_secret = String::from_utf8_lossy(&out.stdout).lines().count();
    // The put, the txn (compare on it), the denied read; the prefix range and watches on app/ cover it too.
    assert!(about_secret >= 3, "{about_secret}");

    // `--lease`, with the ID as etcdctl prints it: the grant (etcd picked the ID: the record has it from the
    // answer), the keep-alives and the revoke; in a table, the revoke names the lease's keys.
    let by_lease = |output: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test"))
            .args(["audit", "review", "--lease", &format!("{lease:016x}"), "--output", output])
            .arg(&dir)
            .output()
    };
    let out = by_lease("json")?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let rpcs: Vec<&str> = found.iter().filter_map(|r| r["rpc"].as_str()).collect();
    assert_eq!(rpcs.first(), Some(&"Lease/LeaseGrant"), "{rpcs:?}");
    assert_eq!(found[0]["ops"][0]["granted"].as_i64(), Some(lease));
    assert_eq!(rpcs.iter().filter(|&&r| r == "Lease/LeaseKeepAlive").count(), 4, "{rpcs:?}");
    assert_eq!(rpcs.last(), Some(&"Lease/LeaseRevoke"), "{rpcs:?}");
    let table = String::from_utf8_lossy(&by_lease("table")?.stdout).into_owned();
    assert!(table.contains(&format!("(keys of lease {lease:016x})")), "{table}");

    // A denial turned into an allow by editing the file: review still shows the line, but warns and exits 1, as
    // the chain no longer verifies (`--no-verify` takes the lines at their word).
    let active = dir.join("audit.log");
    let text = std::fs::read_to_string(&active)?;
    let forged = text.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1);
    assert_ne!(forged, text);
    std::fs::write(&active, forged)?;
    let review_allowed = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test"))
            .args(["audit", "review", "--identity", "spiffe://*/sa/cilium", "--decision", "allow", "--output", "json"])
            .args(extra)
            .arg(&dir)
            .output()
    };
    let out = review_allowed(&[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("warning: the audit chain does not verify"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("app/secret"), "the forged record is still shown");
    let out = review_allowed(&["--no-verify"])?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chain_continues_across_rotated_files() -> TestResult {
    let extra = "audit: { file: audit/audit.log, max_file_bytes: 4096, max_files: 0 }\n";
    let mut h = Harness::with_config(TEST_POLICY, extra).await?;
    let mut a = h.client(&h.admin()?).await?;
    for i in 0..60 {
        a.put(format!("k/{i:03}"), "v", None).await?;
    }
    drop(a);
    h.stop_proxy().await;
    let files = audit_files(&h.audit_dir())?;
    assert!(files.len() >= 4, "rotated: {files:?}");
    let names: Vec<String> =
        files.iter().filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    assert_eq!(names.last().map(String::as_str), Some("audit.log"), "{names:?}");
    let records = read_chain(&h.audit_dir())?;
    let puts = records.iter().filter(|r| r["rpc"] == "KV/Put").count();
    assert_eq!(puts, 60);

    // `audit verify` agrees, then points at the record that was tampered with.
    let dir = h.audit_dir();
    let verify = |d: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test")).arg("audit").arg("verify").arg(d).output()
    };
    let out = verify(&dir)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{} records", records.len())));
    // The second rotated file, third line: changed, deleted, or preceded by an inserted line.
    let victim = files.get(1).ok_or("no second file")?.clone();
    let victim_name = victim.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let original = std::fs::read_to_string(&victim)?;
    let lines: Vec<&str> = original.lines().collect();
    let mut changed = lines.clone();
    let flipped = lines[2].replacen("\"k/", "\"K/", 1);
    changed[2] = &flipped;
    let mut deleted = lines.clone();
    deleted.remove(2);
    let mut inserted = lines.clone();
    inserted.insert(2, lines[1]);
    for (what, content, expect) in [
        ("one byte changed", changed, "altered"),
        ("a line deleted", deleted, "removed"),
        ("a line inserted", inserted, "inserted"),
    ] {
        std::fs::write(&victim, content.join("\n") + "\n")?;
        let out = verify(&dir)?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        assert!(text.contains(expect), "{what}: {text}");
        assert!(text.contains(&format!("{victim_name}:3")), "{what} points at the right line: {text}");
    }
    std::fs::write(&victim, original)?;
    assert!(verify(&dir)?.status.success());
    Ok(())
}

/// Setting and changing the HMAC key, as an operator does it with the proxy binary: `audit change-key` (not while
/// a proxy writes the log) puts a record under the new key on the chain, after which the proxy starts only with the
/// new key; `audit verify` and `audit review` verify the log with every key, oldest first, and not with fewer or in
/// another order.
#[tokio::test(flavor = "multi_thread")]
async fn the_hmac_key_is_set_and_changed_without_starting_a_new_chain() -> TestResult {
    let bin = env!("CARGO_BIN_EXE_guard-under-test");
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    std::fs::write(pki.path("old.key"), "the key of the first year, 32 b\n")?;
    std::fs::write(pki.path("new.key"), "the key after the change, 32 by\n")?;
    let admin = pki.client("admin", "admin", None, &[])?;
    let section = |key: &str| format!("audit: {{ file: audit/audit.log{key} }}\n");
    let start = |key: &str| proxy_process(bin, &pki, &etcd, TEST_POLICY, &section(key));
    let stop = |mut proxy: ProxyProcess| -> TestResult {
        proxy.signal("TERM")?;
        assert!(proxy.wait_exit(Duration::from_secs(20))?.success());
        Ok(())
    };
    let run = |key: &str, put: &str| -> TestResult {
        let proxy = start(key)?;
        let out = etcdctl_at(&format!("https://{}", proxy.addr), &pki.ca_file(), &admin, &["put", put, SECRET])?;
        assert!(out.status.success(), "{}", stderr(&out));
        stop(proxy)
    };
    // With the configuration of the last start (the key in use) in place.
    let change_key = |new: &str| -> TestResult<std::process::Output> {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["audit", "change-key", "--config"]).arg(pki.path("etcd-guard.yaml"));
        Ok(cmd.arg("--new-key").arg(pki.path(new)).output()?)
    };
    run("", "unkeyed")?;
    let changed = change_key("old.key")?;
    assert!(changed.status.success(), "{}", stderr(&changed));
    assert!(stdout(&changed).contains("next: set audit.hmac_key_file to "), "{}", stdout(&changed));
    // Started as before the change: refused, naming the way out.
    let message = start("").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("does not verify") && message.contains("audit change-key"), "{message}");
    run(", hmac_key_file: old.key", "before")?;

    // Not while a proxy writes the log.
    let proxy = start(", hmac_key_file: old.key")?;
    let refused = change_key("new.key")?;
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("another etcd-guard writes an audit log in this folder"), "{}", stderr(&refused));
    stop(proxy)?;
    // The log as it was before the second change, for a holder of the old key to put back below.
    let before_change = pki.path("audit-before-change");
    copy_files(&pki.path("audit"), &before_change)?;
    let changed = change_key("new.key")?;
    assert!(changed.status.success(), "{}", stderr(&changed));
    let anchor = anchor_in(&stdout(&changed)).ok_or_else(|| format!("no --anchor in {}", stdout(&changed)))?;
    run(", hmac_key_file: new.key", "after")?;

    let records = records_of(&pki.path("audit"))?;
    let changes: Vec<&Value> = records.iter().filter(|r| r["rpc"] == "etcd-guard/AuditKeyChange").collect();
    assert_eq!(changes.len(), 2);
    assert_eq!((&changes[0]["ops"][0]["from"], &changes[1]["ops"][0]["from"]), (&"unkeyed".into(), &"hmac".into()));
    let opens = records.iter().filter(|r| r["rpc"] == "etcd-guard/AuditOpen");
    // Each run after a change opened after a clean close: a key change after one is no crash.
    assert!(opens.clone().count() == 4 && opens.skip(1).all(|o| o["ops"][0]["previous"] == "closed"), "{records:?}");
    assert_eq!(records.iter().filter(|r| r["rpc"] == "KV/Put").count(), 3);

    let audit = |args: &[&str], keys: &[&str]| -> TestResult<std::process::Output> {
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("audit").args(args).arg(pki.path("audit"));
        for key in keys {
            match *key {
                "unkeyed" => cmd.arg("--unkeyed-before"),
                key => cmd.arg("--hmac-key").arg(pki.path(key)),
            };
        }
        Ok(cmd.output()?)
    };
    let every = ["unkeyed", "old.key", "new.key"];
    let verified = audit(&["verify"], &every)?;
    let text = stdout(&verified);
    assert!(verified.status.success(), "{text}{}", stderr(&verified));
    assert!(
        text.contains("goes on under --hmac-key #1 of 2") && text.contains("goes on under --hmac-key #2 of 2"),
        "{text}"
    );
    assert!(text.contains(&format!("ok: {} records", records.len())), "{text}");
    for keys in [
        &["old.key", "new.key"][..],
        &["unkeyed", "new.key"],
        &["unkeyed", "old.key"],
        &["new.key"],
        &["unkeyed", "new.key", "old.key"],
    ] {
        let out = audit(&["verify"], keys)?;
        assert_eq!(out.status.code(), Some(1), "{keys:?}: {}", stdout(&out));
    }
    let review = audit(&["review", "--rpc", "Put", "--output", "json"], &every)?;
    assert!(review.status.success(), "{}", stderr(&review));
    assert_eq!(stdout(&review).lines().count(), 3, "{}", stdout(&review));
    let review = audit(&["review", "--rpc", "Put"], &["old.key", "new.key"])?;
    assert_eq!(review.status.code(), Some(1), "{}", stderr(&review));
    // The anchor `change-key` printed is held; and verify prints one for its last record.
    let anchored = audit(&["verify", "--anchor", &anchor], &every)?;
    assert!(anchored.status.success(), "{}", stdout(&anchored));
    assert!(stdout(&anchored).contains("; 1 anchor held"), "{}", stdout(&anchored));
    let last = anchor_in(&stdout(&anchored)).ok_or_else(|| format!("no --anchor in {}", stdout(&anchored)))?;

    // A holder of the old key puts the log back as it was before the second change and writes on under that key;
    // the operator, finding the proxy refuse the log, runs change-key again: the chain verifies with every key,
    // but not with the anchors kept.
    std::fs::remove_dir_all(pki.path("audit"))?;
    copy_files(&before_change, &pki.path("audit"))?;
    let message = start(", hmac_key_file: new.key").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("does not verify"), "{message}");
    run(", hmac_key_file: old.key", "forged")?;
    let laundered = change_key("new.key")?;
    assert!(laundered.status.success(), "{}", stderr(&laundered));
    assert!(audit(&["verify"], &every)?.status.success());
    let rewritten = audit(&["verify", "--anchor", &anchor], &every)?;
    assert_eq!(rewritten.status.code(), Some(1), "{}", stdout(&rewritten));
    assert!(stdout(&rewritten).contains("rewritten: "), "{}", stdout(&rewritten));
    let review = audit(&["review", "--rpc", "Put", "--anchor", &last], &every)?;
    assert_eq!(review.status.code(), Some(1), "{}", stderr(&review));
    assert!(stderr(&review).contains("the audit chain does not verify"), "{}", stderr(&review));
    Ok(())
}

/// The `SEQ:HASH` of the first `--anchor SEQ:HASH` in `text`.
fn anchor_in(text: &str) -> Option<String> {
    let (_, after) = text.split_once("--anchor ")?;
    Some(after.split(|c: char| !c.is_ascii_alphanumeric() && c != ':').next()?.to_owned())
}

/// Copy the files of folder `from` into folder `to` (made if missing).
fn copy_files(from: &Path, to: &Path) -> TestResult {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Put until `ok(result)` or 10 s pass; returns the results seen.
async fn put_until(
    c: &mut etcd_client::Client,
    key: &str,
    ok: impl Fn(&Result<etcd_client::PutResponse, etcd_client::Error>) -> bool,
) -> TestResult<Vec<Result<(), String>>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let r = c.put(key, "v", None).await;
        let done = ok(&r);
        seen.push(r.map(|_| ()).map_err(|e| e.to_string()));
        if done {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            return Err(format!("condition not reached: {seen:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the audit files hold `text` (records reach the file shortly after the answer).
async fn written(dir: &Path, text: &str) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&all_bytes(dir)?).contains(text) {
        if Instant::now() > deadline {
            return Err(format!("{text} was not written").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn is_unavailable(r: &Result<etcd_client::PutResponse, etcd_client::Error>) -> bool {
    matches!(r, Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::Unavailable)
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_on_write_failure_refuses_requests_until_the_log_works_again() -> TestResult {
    let mut h = Harness::start().await?;
    let mut a = h.client(&h.admin()?).await?;
    a.put("before", "v", None).await?;
    let lease_during_failure = a.lease_grant(60, None).await?.id();
    written(&h.audit_dir(), "\"before\"").await?;
    // The audit folder disappears: the writer cannot reopen its file.
    std::fs::remove_dir_all(h.audit_dir())?;
    let seen = put_until(&mut a, "during", is_unavailable).await?;
    let refused = seen.last().cloned().unwrap_or(Ok(()));
    assert!(refused.as_ref().is_err_and(|e| e.contains("audit log")), "{seen:?}");
    // A keep-alive the policy allows is refused too, and says why (not the rule that allowed it).
    // (etcd-client sends the first keep-alive as it opens the stream: the refusal may answer the open.)
    let refusal = match a.lease_keep_alive(lease_during_failure).await {
        Err(e) => e.to_string(),
        Ok((mut keeper, mut answers)) => {
            let _ = keeper.keep_alive().await;
            let answer = tokio::time::timeout(Duration::from_secs(10), answers.message()).await?;
            answer.err().map(|e| e.to_string()).unwrap_or_default()
        }
    };
    assert!(refusal.contains("audit log cannot be written") && !refusal.contains("role"), "{refusal}");
    // It comes back: requests are served again.
    std::fs::create_dir_all(h.audit_dir())?;
    put_until(&mut a, "after", Result::is_ok).await?;
    drop(a);
    h.stop_proxy().await;
    // The new file continues the chain; refused requests are recorded as refused.
    let text = String::from_utf8(all_bytes(&h.audit_dir())?)?;
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(records.iter().any(|r| r["rpc"] == "KV/Put" && r["code"] == "Unavailable"), "{text}");
    assert!(records.iter().any(|r| r["rpc"] == "KV/Put" && r["ops"][0]["key"] == "after" && r["code"] == "OK"));
    assert!(records.first().and_then(|r| r["seq"].as_u64()).is_some_and(|s| s > 1), "continues the seq");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_on_write_failure_keeps_serving_and_writes_the_records_later() -> TestResult {
    let extra = "audit: { file: audit/audit.log, on_write_failure: allow }\n";
    let mut h = Harness::with_config(TEST_POLICY, extra).await?;
    let mut a = h.client(&h.admin()?).await?;
    a.put("before", "v", None).await?;
    written(&h.audit_dir(), "\"before\"").await?;
    std::fs::remove_dir_all(h.audit_dir())?;
    // Served throughout, although nothing can be written.
    for i in 0..20 {
        a.put(format!("during/{i}"), "v", None).await?;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    std::fs::create_dir_all(h.audit_dir())?;
    a.put("after", "v", None).await?;
    drop(a);
    h.stop_proxy().await;
    let text = String::from_utf8(all_bytes(&h.audit_dir())?)?;
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        if r["rpc"] == "KV/Put" {
            *by_key.entry(r["ops"][0]["key"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    // The records kept while failing are written once the folder is back (none were lost: well under the queue).
    for i in 0..20 {
        assert_eq!(by_key.get(&format!("during/{i}")), Some(&1), "{by_key:?}");
    }
    assert_eq!(by_key.get("after"), Some(&1));
    Ok(())
}

/// `answer_after: written`: a client gets its answer only once the request's record is in the file, so a proxy
/// that crashes right after answering (SIGKILL, OOM) has lost no record of an answered request.
#[tokio::test(flavor = "multi_thread")]
async fn answer_after_written_answers_once_the_record_is_in_the_file() -> TestResult {
    let extra = "audit: { file: audit/audit.log, answer_after: written }\n";
    let h = Harness::with_config(TEST_POLICY, extra).await?;
    let mut a = h.client(&h.admin()?).await?;
    let mut c = h.client(&h.cilium()?).await?;
    for i in 0..20 {
        a.put(format!("written/{i}"), SECRET, None).await?;
        // Read at once, without waiting: with `queued` the record reaches the file a few milliseconds later.
        let text = String::from_utf8(all_bytes(&h.audit_dir())?)?;
        assert!(text.contains(&format!("\"written/{i}\"")), "put {i} answered before its record was written");
        // A denial too.
        assert!(c.get(format!("written/{i}"), None).await.is_err());
        let text = String::from_utf8(all_bytes(&h.audit_dir())?)?;
        let denied = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|r| r["rpc"] == "KV/Range" && r["decision"] == "deny" && r["ops"][0]["key"] == format!("written/{i}"));
        assert!(denied, "denial {i} answered before its record was written");
        assert!(!text.contains(SECRET));
    }
    let dir = h.audit_dir();
    let records = read_chain(&dir)?;
    assert!(records.len() >= 40, "{}", records.len());
    Ok(())
}

/// A call the client cancels after the proxy forwarded it (a deadline, a reset, a client gone) may still be
/// applied by etcd: it is recorded all the same, as canceled (before the fix: not at all).
#[tokio::test(flavor = "multi_thread")]
async fn a_call_canceled_after_it_was_forwarded_is_recorded() -> TestResult {
    let mut h = Harness::start().await?;
    let mut c = h.client(&h.admin()?).await?;
    c.put("warm", "up", None).await?;
    h.etcd.pause()?;
    // The client gives up (and resets its stream) while etcd holds the request: after 2 s, so that the proxy has
    // forwarded it by then even on a loaded machine (500 ms was seen to be tight beside a compile).
    let put = tokio::time::timeout(Duration::from_secs(2), c.put("forwarded", SECRET, None)).await;
    assert!(put.is_err(), "etcd answered while paused: {put:?}");
    h.etcd.resume()?;
    // etcd's part is timed for the dropped call too, as `request_duration` counts it: the warm-up put and this one.
    let metrics_addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics listener")?;
    let count = r#"etcd_guard_upstream_duration_seconds_count{rpc="KV/Put"} "#;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = etcd_guard_tests::http_get(metrics_addr, "/metrics")?;
        let puts = metrics.lines().find_map(|l| l.strip_prefix(count)).and_then(|v| v.parse::<f64>().ok());
        if puts == Some(2.0) {
            break;
        }
        assert!(Instant::now() < deadline, "puts timed at etcd: {puts:?}\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Whether etcd applied it depends on whether it read the request before the reset (here: usually not).
    h.stop_proxy().await;
    let records = read_chain(&h.audit_dir())?;
    let put: Vec<_> = records.iter().filter(|r| r["rpc"] == "KV/Put" && r["ops"][0]["key"] == "forwarded").collect();
    assert_eq!(put.len(), 1, "{records:#?}");
    assert_eq!((&put[0]["decision"], &put[0]["code"]), (&"allow".into(), &"Cancelled".into()), "{:?}", put[0]);
    assert!(put[0]["reason"].as_str().is_some_and(|r| r.contains("may have applied")), "{:?}", put[0]);
    assert!(!contains(&all_bytes(&h.audit_dir())?, SECRET));
    Ok(())
}

/// An allowed call that failed is recorded with what its client was told beside the grant: a write etcd refused
/// (a lease it does not know), and one whose deadline passed while etcd held it (it may still be applied, as
/// without the proxy: the reviewer must be able to tell it from a refusal).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_allowed_call_is_recorded_with_how_it_failed() -> TestResult {
    use etcd_guard_proto::etcdserverpb::PutRequest;
    use http_body_util::BodyExt;
    use tonic::codegen::Service;

    let mut h = Harness::start().await?;
    let mut c = h.client(&h.admin()?).await?;
    let unknown = c.put("leased", SECRET, Some(etcd_client::PutOptions::new().with_lease(0x1234))).await;
    assert!(unknown.is_err(), "{unknown:?}");
    let mut conn = etcd_guard_tests::bare_h2(&h, &h.admin()?, None).await?;
    h.etcd.pause()?;
    let msg = PutRequest { key: b"late".to_vec(), value: SECRET.as_bytes().to_vec(), ..Default::default() };
    let body = tonic::body::Body::new(http_body_util::Full::new(etcd_guard_tests::grpc_message(&msg)));
    let mut request = etcd_guard_tests::grpc_request(etcd_guard_proto::methods::KV_PUT, body)?;
    request.headers_mut().insert("grpc-timeout", http::HeaderValue::from_static("300m"));
    std::future::poll_fn(|cx| conn.poll_ready(cx)).await?;
    let response = tokio::time::timeout(Duration::from_secs(10), conn.call(request)).await??;
    let status = match response.headers().get("grpc-status").cloned() {
        Some(status) => Some(status),
        None => response.into_body().collect().await?.trailers().and_then(|t| t.get("grpc-status").cloned()),
    };
    h.etcd.resume()?;
    assert_eq!(status.as_ref().map(http::HeaderValue::as_bytes), Some(&b"4"[..]), "DeadlineExceeded");
    h.stop_proxy().await;
    let records = read_chain(&h.audit_dir())?;
    let find = |key: &str| records.iter().find(|r| r["rpc"] == "KV/Put" && r["ops"][0]["key"] == key);
    let leased = find("leased").ok_or("no record of the leased put")?;
    assert_eq!((&leased["decision"], &leased["code"]), (&"allow".into(), &"NotFound".into()), "{leased}");
    let reason = leased["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("role ") && reason.ends_with("; failed: etcdserver: requested lease not found"),
        "{leased}"
    );
    let late = find("late").ok_or("no record of the late put")?;
    assert_eq!((&late["decision"], &late["code"]), (&"allow".into(), &"DeadlineExceeded".into()), "{late}");
    assert!(late["reason"].as_str().is_some_and(|r| r.contains("; failed: ")), "{late}");
    assert!(!contains(&all_bytes(&h.audit_dir())?, SECRET));
    Ok(())
}

/// A client with nothing but denials (here one no binding matches: any holder of a certificate from the client CA)
/// gets `audit.denial_records` records of its own; the rest of its denials are counted in summary records, written
/// before its next recorded denial (each taking a record of the budget) and at shutdown at the latest. Every denial
/// is accounted for, by the records' counts and by `audit review --summary`; allowed requests are recorded each,
/// whatever the denials did.
#[tokio::test(flavor = "multi_thread")]
async fn denials_over_the_record_budget_are_counted_in_summary_records() -> TestResult {
    let extra = "audit: { file: audit/audit.log, denial_records: { per_second: 1, burst: 5 } }\n";
    let mut h = Harness::with_config(TEST_POLICY, extra).await?;
    let nobody = h.nobody()?;
    const DENIED: u64 = 60;
    let started = Instant::now();
    {
        let mut c = h.client(&nobody).await?;
        for i in 0..DENIED {
            let e = c.get(format!("k{i}"), None).await.err().ok_or("a get by nobody was served")?;
            assert!(e.to_string().contains("etcdserver: permission denied"), "{e}");
        }
        // Two records' worth of refill: the summary of the denials before, then the late one's own record.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        c.get("late", None).await.err().ok_or("a get by nobody was served")?;
        for i in 0..10 {
            c.get(format!("after{i}"), None).await.err().ok_or("a get by nobody was served")?;
        }
    }
    // A new connection of the same certificate has no fresh budget.
    let mut c = h.client(&nobody).await?;
    for i in 0..5 {
        c.get(format!("again{i}"), None).await.err().ok_or("a get by nobody was served")?;
    }
    let elapsed = started.elapsed().as_secs();
    // Allowed requests are recorded each, over any budget of denials.
    let mut admin = h.client(&h.admin()?).await?;
    for i in 0..20 {
        admin.put(format!("app/allowed{i}"), SECRET, None).await?;
    }
    let metrics = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics listener")?;
    let (status, body) = tokio::task::block_in_place(|| etcd_guard_tests::http_get(metrics, "/metrics"))?;
    assert_eq!(status, 200);
    let summarised = body
        .lines()
        .find_map(|l| l.strip_prefix("etcd_guard_audit_denials_summarised_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or("no etcd_guard_audit_denials_summarised_total")? as u64;
    // The summary of the last denials is written at shutdown at the latest.
    h.stop_proxy().await;
    let dir = h.audit_dir();
    let records = read_chain(&dir)?;

    let own = select(&records, "nobody", "KV/Range", "call");
    let summaries = select(&records, "nobody", "KV/Range", "summary");
    let total = DENIED + 16;
    // The burst and the refill: records of their own and summaries together.
    let budget = 5 + elapsed + 1;
    assert!(own.len() >= 6, "{} records of their own", own.len());
    assert!((own.len() + summaries.len()) as u64 <= budget + 1, "{} + {} records", own.len(), summaries.len());
    assert!(summaries.len() >= 2, "a summary before the late denial and one at shutdown: {summaries:?}");
    let counted: u64 = summaries.iter().filter_map(|s| s["count"].as_u64()).sum();
    assert_eq!(own.len() as u64 + counted, total, "every denial is accounted for");
    assert_eq!(counted, summarised, "etcd_guard_audit_denials_summarised_total");
    for s in &summaries {
        assert_eq!(s["decision"], "deny");
        assert_eq!(s["code"], "PermissionDenied");
        assert_eq!(s["ops"], serde_json::json!([]));
        assert!(s["reason"].as_str().is_some_and(|r| r.contains("no binding matches")), "{s}");
        assert!(s["last_time"].as_str() >= s["time"].as_str(), "{s}");
    }
    // The summary of the denials before the late one comes right before the late one's record.
    let late = records
        .iter()
        .position(|r| r["identity"]["common_name"] == "nobody" && r["ops"][0]["key"] == "late")
        .ok_or("no record of the late denial")?;
    assert_eq!(records[late - 1]["event"], "summary", "{}", records[late - 1]);
    assert_eq!(select(&records, "admin", "KV/Put", "call").len(), 20);
    assert!(!contains(&all_bytes(&dir)?, SECRET));

    // `audit review --summary` counts the requests, not the records.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test"))
        .args(["audit", "review", "--identity", "nobody", "--summary", "--output", "json"])
        .arg(&dir)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(summary["requests"], total, "{summary}");
    assert_eq!(summary["records"], own.len() as u64 + summaries.len() as u64, "{summary}");
    let counts = summary["counts"].as_array().ok_or("no counts")?;
    assert!(counts.iter().any(|c| c["rpc"] == "KV/Range" && c["count"] == total), "{summary}");
    Ok(())
}
