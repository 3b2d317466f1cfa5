//! `etcd-guard audit verify` and `etcd-guard audit review` as a user runs them, on generated audit files.

use std::path::Path;
use std::process::{Command, Output};

use etcd_guard::audit::chain::{GENESIS, Hasher};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn guard(args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_etcd-guard")).args(args).output()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `n` chained records from seq 1: odd ones allowed reads of `app/<seq>` by alice, even ones denied puts of
/// `secret/<seq>` by bob.
fn records(hasher: &Hasher, n: u64) -> Vec<Vec<u8>> {
    let mut prev = GENESIS.to_owned();
    let mut out = Vec::new();
    for seq in 1..=n {
        let (cn, rpc, op, key, decision, code) = if seq % 2 == 1 {
            ("alice", "KV/Range", "range", format!("app/{seq}"), "allow", "OK")
        } else {
            ("bob", "KV/Put", "put", format!("secret/{seq}"), "deny", "PermissionDenied")
        };
        let mut line = format!(
            concat!(
                r#"{{"seq":{},"time":"2026-03-01T10:{:02}:00.000000Z","conn":3,"peer":"10.0.0.9:40000","#,
                r#""identity":{{"common_name":"{}","organizations":[],"organizational_units":[],"dns_sans":[],"#,
                r#""uri_sans":[],"fingerprint_sha256":"ab"}},"roles":[],"rpc":"{}","event":"call","#,
                r#""ops":[{{"op":"{}","key":"{}"}}],"decision":"{}","reason":"r","code":"{}","latency_us":5,"#,
                r#""prev_hash":"{}""#
            ),
            seq,
            seq % 60,
            cn,
            rpc,
            op,
            key,
            decision,
            code,
            prev
        );
        hasher.seal(&mut line, 0, &mut prev);
        out.push(line.into_bytes());
    }
    out
}

/// Records 1..=8 in `audit.log.00000000000000000001` (1..=5) and `audit.log` (6..=8).
fn write_set(dir: &Path, lines: &[Vec<u8>]) -> std::io::Result<()> {
    std::fs::write(dir.join("audit.log.00000000000000000001"), lines[..5].concat())?;
    std::fs::write(dir.join("audit.log"), lines[5..].concat())
}

#[test]
fn verify_accepts_an_intact_set_and_exits_0() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_set(dir.path(), &records(&Hasher::unkeyed(), 8))?;
    let d = dir.path().to_string_lossy().into_owned();
    let o = guard(&["audit", "verify", &d])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // These records end without the writer's close record: a note says so, and the set verifies.
    assert!(text(&o).starts_with("note: the last record (seq 8) is not the writer's close record"), "{}", text(&o));
    assert!(text(&o).lines().any(|l| l.starts_with("ok: 8 records in 2 files, seq 1..=8, last hash ")), "{}", text(&o));
    // The files named in the wrong order are still read in chain order.
    let old = dir.path().join("audit.log.00000000000000000001").to_string_lossy().into_owned();
    let new = dir.path().join("audit.log").to_string_lossy().into_owned();
    let o = guard(&["audit", "verify", &new, &old])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    Ok(())
}

/// An anchor verify printed holds for `verify` and `review`; a wrong one fails (exit 1); a malformed one, or two for
/// one seq, are refused before anything is read (exit 2).
#[test]
fn anchors_are_held_or_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_set(dir.path(), &records(&Hasher::unkeyed(), 8))?;
    let d = dir.path().to_string_lossy().into_owned();
    let o = guard(&["audit", "verify", &d])?;
    let printed = text(&o);
    let (_, after) = printed.split_once("keep `--anchor ").ok_or("no anchor printed")?;
    let anchor = after.split('`').next().unwrap_or_default().to_owned();
    assert!(anchor.starts_with("8:") && anchor.len() == 66, "{printed}");
    let o = guard(&["audit", "verify", &d, "--anchor", &anchor])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("; 1 anchor held)"), "{}", text(&o));
    let o = guard(&["audit", "review", &d, "--anchor", &anchor, "--output", "json"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let wrong = format!("8:{}", "0".repeat(64));
    let o = guard(&["audit", "verify", &d, "--anchor", &wrong])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("rewritten: "), "{}", text(&o));
    let o = guard(&["audit", "review", &d, "--anchor", &wrong, "--output", "json"])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    for command in ["verify", "review"] {
        for bad in [&["--anchor", "8"][..], &["--anchor", &anchor, "--anchor", &wrong]] {
            let o = guard(&[&["audit", command, &d][..], bad].concat())?;
            assert_eq!(o.status.code(), Some(2), "{command} {bad:?}: {}", text(&o));
            assert!(text(&o).contains("anchor"), "{}", text(&o));
        }
    }
    Ok(())
}

#[test]
fn verify_points_at_the_altered_line_and_exits_1() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut lines = records(&Hasher::unkeyed(), 8);
    // seq 7 is line 2 of audit.log: app/7 -> app/8.
    let at = lines[6].windows(5).position(|w| w == b"app/7").ok_or("no key")?;
    lines[6][at + 4] = b'8';
    write_set(dir.path(), &lines)?;
    let o = guard(&["audit", "verify", &dir.path().to_string_lossy()])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let want = format!("altered: {}:2 (seq 7)", dir.path().join("audit.log").display());
    assert!(text(&o).starts_with(&want), "{}", text(&o));
    Ok(())
}

/// Files without a single record verify nothing: a log the proxy wrote starts with its `open` record, so an
/// emptied one must not pass (before: "ok", exit 0).
#[test]
fn verify_refuses_files_without_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("audit.log"), "")?;
    let o = guard(&["audit", "verify", &dir.path().to_string_lossy()])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no records") && text(&o).contains("never empty"), "{}", text(&o));
    Ok(())
}

#[test]
fn verify_with_hmac_key_right_and_wrong() -> TestResult {
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs)?;
    let key = b"a-test-key-of-enough-bytes";
    write_set(&logs, &records(&Hasher::keyed(key), 8))?;
    let right = dir.path().join("right.key");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&right, key)?;
    std::fs::write(&wrong, b"another-key-of-enough-bytes")?;
    let l = logs.to_string_lossy().into_owned();
    let o = guard(&["audit", "verify", &l, "--hmac-key", &right.to_string_lossy()])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("HMAC"), "{}", text(&o));
    let o = guard(&["audit", "verify", &l, "--hmac-key", &wrong.to_string_lossy()])?;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("audit.log.00000000000000000001:1"), "{}", text(&o));
    // A missing key file is a usage error.
    let o = guard(&["audit", "verify", &l, "--hmac-key", &dir.path().join("nope").to_string_lossy()])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    Ok(())
}

#[test]
fn verify_and_review_report_missing_paths_with_exit_2() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.log").to_string_lossy().into_owned();
    for command in ["verify", "review"] {
        let o = guard(&["audit", command, &missing])?;
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains("missing.log"), "{}", text(&o));
    }
    Ok(())
}

#[test]
fn review_filters_and_prints_the_original_lines_as_json() -> TestResult {
    let dir = tempfile::tempdir()?;
    let lines = records(&Hasher::unkeyed(), 8);
    write_set(dir.path(), &lines)?;
    let d = dir.path().to_string_lossy().into_owned();
    let o = guard(&["audit", "review", &d, "--output", "json", "--decision", "deny", "--key-prefix", "secret/"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let want = [&lines[1], &lines[3], &lines[5], &lines[7]].map(|l| l.as_slice()).concat();
    assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&want));

    let o = guard(&["audit", "review", &d, "--output", "json", "--identity", "ali*", "--rpc", "range"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(o.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count(), 4);

    // The puts (even records), denied or not, are the writes.
    let o = guard(&["audit", "review", &d, "--output", "json", "--writes"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&want));

    let o = guard(&["audit", "review", &d, "--output", "json", "--summary"])?;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(summary["records"], 8);
    assert_eq!(summary["counts"][0]["count"], 4);

    let o = guard(&["audit", "review", &d, "--since", "not a time"])?;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    Ok(())
}
