//! Hot reload without dropping connections: a new policy is in force for new requests at once, open watches
//! whose permission was withdrawn are canceled as etcd cancels them, a broken file is refused and the old one
//! stays, and a client revoked by a reloaded CRL is refused on its next connection.

use std::time::{Duration, Instant};

use etcd_client::WatchOptions;
use etcd_guard::config::Config;
use etcd_guard::server::{Proxy, Running};
use etcd_guard_tests::{ClientCert, Etcd, Pki, ProxyProcess, TestResult, http_get, proxy_process, watch_matrix};

/// How long a test waits for an answer that depends on a paused etcd and a reload.
const WAIT_LONG: Duration = Duration::from_secs(30);

const DENIED_REASON: &str = "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

const BEFORE: &str = r#"
roles:
  - name: admin
    keys: [ { prefix: "", access: readwrite } ]
    cluster: [admin]
  - name: cilium
    keys:
      - { prefix: "cilium/", access: readwrite }
      - { prefix: "shared/", access: read }
    cluster: [status]
bindings:
  - role: admin
    subjects: [ { common_name: "admin" } ]
  - role: cilium
    subjects: [ { common_name: "cilium-agent" }, { common_name: "revokable" } ]
"#;

struct Setup {
    pki: Pki,
    etcd: Etcd,
    proxy: Running,
}

async fn start(policy: &str) -> TestResult<Setup> {
    start_polling(policy, 0).await
}

async fn start_polling(policy: &str, reload_check_interval_ms: u64) -> TestResult<Setup> {
    start_with(policy, reload_check_interval_ms, "").await
}

/// [`start_polling`], with `extra` appended to the configuration.
async fn start_with(policy: &str, reload_check_interval_ms: u64, extra: &str) -> TestResult<Setup> {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    std::fs::write(pki.path("policy.yaml"), policy)?;
    std::fs::write(pki.path("crl.pem"), pki.ca.crl(&[], 1, Duration::from_secs(3600))?)?;
    let config = format!(
        r#"listen: "127.0.0.1:0"
tls: {{ cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt, crl_files: [crl.pem] }}
upstream: {{ endpoints: ["{}"], ca_file: ca.crt, cert_file: upstream-client.crt, key_file: upstream-client.key }}
policy_file: policy.yaml
metrics_listen: "127.0.0.1:0"
reload_check_interval_ms: {reload_check_interval_ms}
audit: {{ file: audit/audit.log }}
{extra}{}"#,
        etcd.client_url,
        watch_matrix(extra)
    );
    std::fs::write(pki.path("etcd-guard.yaml"), config)?;
    let proxy = Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await?.spawn();
    Ok(Setup { pki, etcd, proxy })
}

async fn client(s: &Setup, who: &ClientCert) -> TestResult<etcd_client::Client> {
    client_waiting(s, who, Duration::from_secs(5)).await
}

/// A client whose requests wait up to `timeout` for their answers.
async fn client_waiting(s: &Setup, who: &ClientCert, timeout: Duration) -> TestResult<etcd_client::Client> {
    let tls = s.pki.client_tls(who)?;
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(timeout);
    Ok(etcd_client::Client::connect([format!("https://{}", s.proxy.local_addr)], Some(opts)).await?)
}

fn metric(s: &Setup, prefix: &str) -> TestResult<f64> {
    let addr = s.proxy.metrics_addr.ok_or("no metrics listener")?;
    let (_, body) = http_get(addr, "/metrics")?;
    Ok(body.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0))
}

fn is_denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::PermissionDenied)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reloaded_policy_applies_at_once_and_cancels_withdrawn_watches() -> TestResult {
    let s = start(BEFORE).await?;
    let cilium = s.pki.client("cilium", "cilium-agent", None, &[])?;
    let mut admin = client(&s, &s.pki.client("admin", "admin", None, &[])?).await?;
    let mut c = client(&s, &cilium).await?;
    admin.put("shared/a", "1", None).await?;
    assert_eq!(c.get("shared/a", None).await?.kvs().len(), 1);

    let mut w = c.watch("shared/", Some(WatchOptions::new().with_prefix())).await?;
    let shared_watch = w.message().await?.ok_or("stream ended")?;
    assert!(shared_watch.created() && !shared_watch.canceled());
    w.watch("cilium/", Some(WatchOptions::new().with_prefix())).await?;
    let cilium_watch = w.message().await?.ok_or("stream ended")?;
    assert!(cilium_watch.created() && !cilium_watch.canceled());

    // The policy loses `shared/`.
    std::fs::write(s.pki.path("policy.yaml"), BEFORE.replace(r#"      - { prefix: "shared/", access: read }"#, ""))?;
    s.proxy.reload.trigger();
    let canceled = tokio::time::timeout(Duration::from_secs(5), w.message()).await??.ok_or("stream ended")?;
    assert!(canceled.canceled(), "{canceled:?}");
    assert_eq!(canceled.watch_id(), shared_watch.watch_id());
    assert_eq!(canceled.cancel_reason(), DENIED_REASON);
    // The same connection: new requests are decided by the new policy, the other watch goes on.
    let e = c.get("shared/a", None).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");
    admin.put("cilium/x", "1", None).await?;
    let event = tokio::time::timeout(Duration::from_secs(5), w.message()).await??.ok_or("stream ended")?;
    assert_eq!(event.watch_id(), cilium_watch.watch_id());
    assert_eq!(event.events().len(), 1);
    assert!(metric(&s, r#"etcd_guard_reloads_total{result="ok"}"#)? >= 1.0);

    // A broken policy is refused; the one in force stays.
    std::fs::write(s.pki.path("policy.yaml"), "roles: [\n")?;
    s.proxy.reload.trigger();
    reaches(&s, r#"etcd_guard_reloads_total{result="failed"}"#, 1.0).await?;
    assert_eq!(c.get("cilium/x", None).await?.kvs().len(), 1);
    let e = c.get("shared/a", None).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");

    // So is an empty one (a file emptied by an editor before it is written again): nothing is taken away.
    std::fs::write(s.pki.path("policy.yaml"), "")?;
    s.proxy.reload.trigger();
    reaches(&s, r#"etcd_guard_reloads_total{result="failed"}"#, 2.0).await?;
    assert_eq!(c.get("cilium/x", None).await?.kvs().len(), 1);
    drop((w, c, admin));
    s.proxy.stop().await;

    let log = std::fs::read_to_string(s.pki.path("audit/audit.log"))?;
    assert!(log.lines().any(|l| l.contains("withdrawn by a policy reload")), "the cancel is recorded");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_revoked_by_a_reloaded_crl_loses_its_open_connections_and_is_refused_on_its_next() -> TestResult {
    let s = start(BEFORE).await?;
    let revokable = s.pki.client("revokable", "revokable", None, &[])?;
    let cilium = s.pki.client("cilium", "cilium-agent", None, &[])?;
    let mut c = client(&s, &revokable).await?;
    c.put("cilium/before", "1", None).await?;
    let mut other = client(&s, &cilium).await?;
    other.put("cilium/other", "0", None).await?;
    let mut watch = c.watch("cilium/", Some(WatchOptions::new().with_prefix())).await?;
    assert!(watch.message().await?.is_some_and(|r| r.created()));

    std::fs::write(
        s.pki.path("crl.pem"),
        s.pki.ca.crl(std::slice::from_ref(&revokable.serial), 2, Duration::from_secs(3600))?,
    )?;
    s.proxy.reload.trigger();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s, r#"etcd_guard_reloads_total{result="ok"}"#)? < 3.0 {
        assert!(Instant::now() < deadline, "reload not done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = match client(&s, &revokable).await {
        Err(_) => true,
        Ok(mut c) => c.put("cilium/after", "1", None).await.is_err(),
    };
    assert!(refused, "a revoked certificate was accepted");
    // Its open connection was closed: the watch stream ends, and nothing more is streamed to it.
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message()).await?;
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    assert!(c.put("cilium/after", "1", None).await.is_err(), "the revoked client's connection still serves");
    assert_eq!(metric(&s, "etcd_guard_connections_untrusted_total")?, 1.0);
    // The client can see the refusal (the server's alert) before the server has counted it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s, r#"etcd_guard_tls_handshake_failures_total{reason="revoked"}"#)? < 1.0 {
        assert!(Instant::now() < deadline, "the refused handshake was not counted as revoked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Others keep their connections and still connect.
    other.put("cilium/other", "1", None).await?;
    let mut ok = client(&s, &cilium).await?;
    ok.put("cilium/other", "2", None).await?;
    // The end record of the watch stream says why it ended.
    drop((watch, c, other, ok));
    s.proxy.stop().await;
    let log = std::fs::read_to_string(s.pki.path("audit/audit.log"))?;
    let end = log.lines().find(|l| l.contains(r#""rpc":"Watch/Watch""#) && l.contains(r#""event":"end""#));
    assert!(end.is_some_and(|l| l.contains("no longer trusted") && l.contains(r#""decision":"deny""#)), "{end:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_policy_file_is_noticed_without_a_signal() -> TestResult {
    let s = start_polling(BEFORE, 100).await?;
    let mut c = client(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?).await?;
    c.get("shared/a", None).await?;
    std::fs::write(s.pki.path("policy.yaml"), BEFORE.replace(r#"      - { prefix: "shared/", access: read }"#, ""))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.get("shared/a", None).await {
            Err(e) if is_denied(&e) => break,
            _ if Instant::now() > deadline => return Err("the policy change was not noticed".into()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok(())
}

/// The CRLs' nextUpdate is a metric (once it passes, new handshakes are refused), and follows a reloaded CRL.
#[tokio::test(flavor = "multi_thread")]
async fn the_crls_next_update_is_a_metric() -> TestResult {
    let s = start(BEFORE).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as f64;
    let next = metric(&s, "etcd_guard_crl_next_update_timestamp_seconds ")?;
    assert!((now + 3500.0..=now + 3700.0).contains(&next), "{next} vs now {now}");
    std::fs::write(s.pki.path("crl.pem"), s.pki.ca.crl(&[], 2, Duration::from_secs(7200))?)?;
    s.proxy.reload.trigger();
    reaches(&s, "etcd_guard_crl_next_update_timestamp_seconds ", now + 7000.0).await
}

/// A file whose mode alone changed is loaded again: a `chmod` that fixes an unreadable file is picked up without a
/// signal (before: only the modification time, size and inode were compared). Root reads any file, so the test
/// counts the reload itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_whose_permissions_changed_is_loaded_again() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let s = start_polling(BEFORE, 100).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = metric(&s, r#"etcd_guard_reloads_total{result="ok"}"#)?;
    std::fs::set_permissions(s.pki.path("policy.yaml"), std::fs::Permissions::from_mode(0o640))?;
    reaches(&s, r#"etcd_guard_reloads_total{result="ok"}"#, before + 1.0).await
}

/// Wait until the metric `prefix` is at least `floor`.
async fn reaches(s: &Setup, prefix: &str, floor: f64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(s, prefix)? < floor {
        if Instant::now() > deadline {
            return Err(format!("{prefix} did not reach {floor} in 5 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// [`BEFORE`] with the `lease` capability for cilium: a proxy with it, and cilium's client.
async fn start_with_leases() -> TestResult<(Setup, etcd_client::Client)> {
    let s = start(&BEFORE.replace("cluster: [status]", "cluster: [status, lease]")).await?;
    let c = client(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?).await?;
    Ok((s, c))
}

/// Reload the policy of [`start_with_leases`] with cilium's write on cilium/ taken away; returns once it is in force.
async fn withdraw_cilium_write(s: &Setup) -> TestResult {
    let policy = BEFORE.replace("cluster: [status]", "cluster: [status, lease]");
    let read_only = r#"      - { prefix: "cilium/", access: read }"#;
    std::fs::write(
        s.pki.path("policy.yaml"),
        policy.replace(r#"      - { prefix: "cilium/", access: readwrite }"#, read_only),
    )?;
    s.proxy.reload.trigger();
    reaches(s, r#"etcd_guard_reloads_total{result="ok"}"#, 1.0).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_whose_check_a_reload_overtook_is_decided_by_the_new_policy() -> TestResult {
    // Revoking a lease needs write on every key attached to it, and the proxy asks etcd which keys those are.
    let (s, mut c) = start_with_leases().await?;
    let lease = c.lease_grant(60, None).await?.id();
    c.put("cilium/k", "v", Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    let lookups = metric(&s, "etcd_guard_lease_key_lookups_total")?;

    // etcd stops answering while the revoke waits for the lease's keys; meanwhile the role loses write on cilium/.
    s.etcd.pause()?;
    // Its answer may wait for etcd, the reload and two lookups: a generous deadline, so a slow machine gets the
    // proxy's answer rather than the client's own timeout.
    let mut patient = client_waiting(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?, WAIT_LONG).await?;
    let revoke = tokio::spawn(async move { patient.lease_revoke(lease).await });
    let paused = async {
        reaches(&s, "etcd_guard_lease_key_lookups_total", lookups + 1.0).await?;
        withdraw_cilium_write(&s).await
    };
    let paused: TestResult = paused.await;
    s.etcd.resume()?;
    paused?;

    // The lookup answers after the reload: the revoke is decided by the policy now in force.
    let revoked = tokio::time::timeout(WAIT_LONG, revoke).await.map_err(|_| "the revoke")??;
    assert!(revoked.as_ref().is_err_and(is_denied), "{revoked:?}");
    assert_eq!(c.get("cilium/k", None).await?.kvs().len(), 1, "the lease and its key are still there");
    assert!(c.lease_time_to_live(lease, None).await?.ttl() > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_limit_set_by_a_reload_counts_the_watches_already_open() -> TestResult {
    let s = start(BEFORE).await?;
    let mut c = client(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?).await?;
    let mut w = c.watch("cilium/a", None).await?;
    let first = w.message().await?.ok_or("stream ended")?;
    assert!(first.created() && !first.canceled(), "{first:?}");
    w.watch("cilium/b", None).await?;
    assert!(w.message().await?.is_some_and(|m| m.created() && !m.canceled()));

    // The role gets a limit of two open watches: both are open already.
    let limited = BEFORE.replace("    cluster: [status]\n", "    cluster: [status]\n    limits: { open_watches: 2 }\n");
    assert_ne!(limited, BEFORE);
    std::fs::write(s.pki.path("policy.yaml"), limited)?;
    s.proxy.reload.trigger();
    reaches(&s, r#"etcd_guard_reloads_total{result="ok"}"#, 1.0).await?;
    w.watch("cilium/c", None).await?;
    let third = w.message().await?.ok_or("stream ended")?;
    assert!(third.created() && third.canceled(), "{third:?}");
    assert!(third.cancel_reason().contains("ResourceExhausted"), "{}", third.cancel_reason());
    // Closing one frees a slot.
    w.cancel(first.watch_id()).await?;
    assert!(w.message().await?.is_some_and(|m| m.canceled()));
    w.watch("cilium/d", None).await?;
    let fourth = w.message().await?.ok_or("stream ended")?;
    assert!(fourth.created() && !fourth.canceled(), "{fourth:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_waiting_when_a_reload_withdraws_its_permission_ends_and_leaves_no_key() -> TestResult {
    let (s, mut c) = start_with_leases().await?;
    let mut admin = client(&s, &s.pki.client("admin", "admin", None, &[])?).await?;
    let prefix = || Some(etcd_client::GetOptions::new().with_prefix());
    let holder = admin.lease_grant(60, None).await?.id();
    let held = admin.lock("cilium/lk", Some(etcd_client::LockOptions::new().with_lease(holder))).await?;
    // cilium waits for the lock (etcd has its waiter's key under cilium/lk/)...
    let lease = c.lease_grant(60, None).await?.id();
    let waiting = {
        let mut c = c.clone();
        tokio::spawn(async move { c.lock("cilium/lk", Some(etcd_client::LockOptions::new().with_lease(lease))).await })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while admin.get("cilium/lk/", prefix()).await?.count() < 2 {
        assert!(Instant::now() < deadline, "cilium's waiter key did not appear");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...when a reload takes write on cilium/ away: the wait ends as etcd refuses a lock it may not take.
    withdraw_cilium_write(&s).await?;
    let answer = tokio::time::timeout(Duration::from_secs(4), waiting).await.map_err(|_| "the lock still waits")??;
    assert!(answer.as_ref().is_err_and(is_denied), "{answer:?}");
    // etcd took the waiter's key back: only the holder's is left.
    let deadline = Instant::now() + Duration::from_secs(3);
    while admin.get("cilium/lk/", prefix()).await?.count() != 1 {
        assert!(Instant::now() < deadline, "cilium's waiter key is still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin.unlock(held.key()).await?;
    drop((c, admin));
    s.proxy.stop().await;
    let log = std::fs::read_to_string(s.pki.path("audit/audit.log"))?;
    assert!(
        log.lines().any(|l| l.contains(r#""rpc":"Lock/Lock""#) && l.contains("withdrawn by a policy reload")),
        "the lock's record says why it ended"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_closed_watch_stream_still_loses_what_a_reload_withdraws() -> TestResult {
    let s = start(BEFORE).await?;
    let mut admin = client(&s, &s.pki.client("admin", "admin", None, &[])?).await?;
    let mut c = client(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?).await?;
    let (watcher, mut w) = c.watch("shared/", Some(WatchOptions::new().with_prefix())).await?.split();
    let created = w.message().await?.ok_or("stream ended")?;
    assert!(created.created() && !created.canceled(), "{created:?}");
    // The client sends nothing more; etcd goes on streaming, as it does for a half-closed stream of its own.
    drop(watcher);
    admin.put("shared/a", "1", None).await?;
    let event = tokio::time::timeout(Duration::from_secs(5), w.message()).await??.ok_or("stream ended")?;
    assert_eq!(event.events().len(), 1, "{event:?}");

    // The policy loses shared/: etcd's permission-denied cancel, as on a stream still open both ways.
    std::fs::write(s.pki.path("policy.yaml"), BEFORE.replace(r#"      - { prefix: "shared/", access: read }"#, ""))?;
    s.proxy.reload.trigger();
    let canceled = tokio::time::timeout(Duration::from_secs(5), w.message()).await??.ok_or("stream ended")?;
    assert!(canceled.canceled() && canceled.cancel_reason() == DENIED_REASON, "{canceled:?}");
    admin.put("shared/a", "2", None).await?;
    let after = tokio::time::timeout(Duration::from_millis(500), w.message()).await;
    assert!(!matches!(after, Ok(Ok(Some(_)))), "{after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn open_keep_alive_streams_are_rechecked_after_a_reload() -> TestResult {
    let s = start(&BEFORE.replace("cluster: [status]", "cluster: [status, lease]")).await?;
    let mut c = client(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?).await?;
    let lease = c.lease_grant(30, None).await?.id();
    let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    assert!(answers.message().await?.is_some());
    // The role loses `lease`: the next keep-alive on the open stream is refused, as etcd refuses it.
    std::fs::write(s.pki.path("policy.yaml"), BEFORE)?;
    s.proxy.reload.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    keeper.keep_alive().await?;
    let next = tokio::time::timeout(Duration::from_secs(5), answers.message()).await?;
    assert!(next.as_ref().is_err_and(is_denied), "{next:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reloaded_upstream_certificate_is_used_for_new_connections() -> TestResult {
    let s = start(BEFORE).await?;
    let mut admin = client(&s, &s.pki.client("admin", "admin", None, &[])?).await?;
    admin.put("k", "v", None).await?;
    let (cert, key) = (s.pki.path("upstream-client.crt"), s.pki.path("upstream-client.key"));
    let (good_cert, good_key) = (std::fs::read(&cert)?, std::fs::read(&key)?);
    // A certificate etcd does not trust: once in force, etcd refuses the proxy's new connections.
    let stranger = etcd_guard::certs::DevCa::new("another CA")?;
    let other = stranger.issue(etcd_guard::certs::LeafKind::Client, "etcd-guard", None, &[], &[])?;
    std::fs::write(&cert, &other.cert_pem)?;
    std::fs::write(&key, &other.key_pem)?;
    s.proxy.reload.trigger();
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin.put("k", "v", None).await.is_ok() {
        assert!(Instant::now() < deadline, "the new upstream certificate was not used");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The right one again: served again.
    std::fs::write(&cert, good_cert)?;
    std::fs::write(&key, good_key)?;
    s.proxy.reload.trigger();
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin.put("k", "v", None).await.is_err() {
        assert!(Instant::now() < deadline, "the restored upstream certificate was not used");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A watch whose create etcd had not yet answered when a reload withdrew its permission is canceled too, once etcd
/// answers it: none escapes the reload. One stream creates watches on `shared/` as fast as it can while the reload
/// lands, so some creates are on their way to etcd at that moment (the race this pins down); creates decided
/// after it are refused as etcd refuses them.
#[tokio::test(flavor = "multi_thread")]
async fn watches_created_while_a_reload_lands_are_canceled_too() -> TestResult {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // Below the proxy's bound of 4,096 creates waiting for etcd's answers on one stream (which a loaded machine,
    // etcd answering slower than the client sends, would reach).
    const MOST: usize = 4000;
    let s = start(BEFORE).await?;
    let mut c = client(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?).await?;
    let prefix = || Some(WatchOptions::new().with_prefix());
    let (mut requests, mut responses) = c.watch("shared/", prefix()).await?.split();
    let stop = Arc::new(AtomicBool::new(false));
    let mut sender = Some({
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 1;
            while sent < MOST && !stop.load(Ordering::SeqCst) {
                requests.watch("shared/", prefix()).await?;
                sent += 1;
                if sent % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            TestResult::Ok((requests, sent))
        })
    });
    std::fs::write(s.pki.path("policy.yaml"), BEFORE.replace(r#"      - { prefix: "shared/", access: read }"#, ""))?;
    let (mut answered, mut refused, mut live, mut revoked) = (0, 0, HashSet::new(), 0);
    let mut triggered = false;
    let (mut sent, mut _requests) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Until every create is answered and no watch is left open.
    while sent.is_none_or(|sent| answered < sent) || !live.is_empty() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(wait, async {
            match sender.as_mut() {
                Some(sending) => tokio::select! {
                    done = sending => Err(done),
                    next = responses.message() => Ok(next),
                },
                None => Ok(responses.message().await),
            }
        });
        let Ok(next) = next.await else {
            return Err(format!(
                "{} of {answered} watches escaped the reload ({revoked} canceled by it, {refused} creates refused; \
                 creates sent: {sent:?})",
                live.len(),
            )
            .into());
        };
        let next = match next {
            Ok(next) => next,
            Err(done) => {
                // Its half of the stream stays open: a client closing it ends the stream at etcd.
                let (requests, count) = done??;
                (sent, _requests, sender) = (Some(count), Some(requests), None);
                continue;
            }
        };
        let r = next?.ok_or("the watch stream ended")?;
        if r.created() {
            answered += 1;
            if r.canceled() {
                assert_eq!(r.cancel_reason(), DENIED_REASON);
                refused += 1;
                stop.store(true, Ordering::SeqCst);
            } else {
                live.insert(r.watch_id());
            }
        } else if r.canceled() {
            assert_eq!(r.cancel_reason(), DENIED_REASON, "{r:?}");
            assert!(live.remove(&r.watch_id()), "a cancel of a watch not open: {r:?}");
            revoked += 1;
        }
        if !triggered && answered >= 200 {
            s.proxy.reload.trigger();
            triggered = true;
        }
    }
    assert!(refused > 0 && revoked > 0, "the reload landed while watches were created: {refused}, {revoked}");
    Ok(())
}

/// An election's Observe stream is a watch of its leader key: a reload that withdraws read on it ends the stream
/// with etcd's permission-denied status, and the end is recorded with why.
#[tokio::test(flavor = "multi_thread")]
async fn an_observe_stream_whose_permission_a_reload_withdrew_ends() -> TestResult {
    let s = start(BEFORE).await?;
    let mut admin = client(&s, &s.pki.client("admin", "admin", None, &[])?).await?;
    let mut c = client(&s, &s.pki.client("cilium", "cilium-agent", None, &[])?).await?;
    let lease = admin.lease_grant(30, None).await?.id();
    admin.campaign("shared/leader", "admin-1", lease).await?;
    let mut shared = c.observe("shared/leader").await?;
    let leader = tokio::time::timeout(Duration::from_secs(5), shared.message()).await??.ok_or("stream ended")?;
    assert_eq!(leader.kv().map(|kv| kv.value()), Some(&b"admin-1"[..]));
    // etcd answers an Observe (headers included) once the election has a leader.
    let own_leader = admin.campaign("cilium/leader", "admin-2", lease).await?.take_leader().ok_or("no leader key")?;
    let mut own = c.observe("cilium/leader").await?;
    let leader = tokio::time::timeout(Duration::from_secs(5), own.message()).await??.ok_or("stream ended")?;
    assert_eq!(leader.kv().map(|kv| kv.value()), Some(&b"admin-2"[..]));

    std::fs::write(s.pki.path("policy.yaml"), BEFORE.replace(r#"      - { prefix: "shared/", access: read }"#, ""))?;
    s.proxy.reload.trigger();
    let ended = tokio::time::timeout(Duration::from_secs(5), shared.message()).await?;
    assert!(ended.as_ref().is_err_and(is_denied), "{ended:?}");
    // The stream on what the identity may still read goes on.
    admin.proclaim("admin-3", Some(etcd_client::ProclaimOptions::new().with_leader(own_leader))).await?;
    let leader = tokio::time::timeout(Duration::from_secs(5), own.message()).await??.ok_or("stream ended")?;
    assert_eq!(leader.kv().map(|kv| kv.value()), Some(&b"admin-3"[..]));
    drop((own, c, admin));
    s.proxy.stop().await;

    let log = std::fs::read_to_string(s.pki.path("audit/audit.log"))?;
    let end = log.lines().find(|l| l.contains("Observe") && l.contains("withdrawn by a policy reload"));
    assert!(end.is_some_and(|l| l.contains("PermissionDenied")), "the end is recorded");
    Ok(())
}

/// A watch replaying a long history passes etcd's answer to its client in parts; a reload that withdraws the watch
/// while the answer is on its way stops the rest of it (the stream ends, since part of a message cannot be taken
/// back), and the client gets none of the withdrawn events.
///
/// A watch of its own stream's, so with coalescing off whatever the test matrix says: a shared watch reads etcd's
/// answer whole and lets what it had queued for the client by the reload go out first (docs/watch-coalescing.md).
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_stops_a_long_answer_of_a_withdrawn_watch_on_its_way() -> TestResult {
    let s = start_with(BEFORE, 0, "watch: { coalesce: false }\n").await?;
    let mut admin = client(&s, &s.pki.client("admin", "admin", None, &[])?).await?;
    for i in 0..24 {
        admin.put(format!("shared/{i:02}"), vec![b'v'; 1 << 20], None).await?;
    }
    let cilium = s.pki.client("cilium", "cilium-agent", None, &[])?;
    let c = s.pki.etcd_client(&format!("https://{}", s.proxy.local_addr), &cilium, None).await?;
    let options = WatchOptions::new().with_prefix().with_start_revision(1);
    let mut w = c.watch_client().max_decoding_message_size(64 << 20).watch("shared/", Some(options)).await?;
    // Not read: the 24 MiB answer starts on its way and stops at the client's window.
    tokio::time::sleep(Duration::from_secs(3)).await;

    std::fs::write(s.pki.path("policy.yaml"), BEFORE.replace(r#"      - { prefix: "shared/", access: read }"#, ""))?;
    s.proxy.reload.trigger();
    reaches(&s, r#"etcd_guard_reloads_total{result="ok"}"#, 1.0).await?;

    let mut events = 0;
    let ended = tokio::time::timeout(WAIT_LONG, async {
        loop {
            match w.message().await {
                Ok(Some(answer)) if answer.canceled() => return Ok(answer.cancel_reason().to_string()),
                Ok(Some(answer)) => events += answer.events().len(),
                Ok(None) => return Ok("ended".to_string()),
                Err(e) => return Err(e),
            }
        }
    })
    .await?;
    assert_eq!(events, 0, "events of the withdrawn watch reached the client");
    match ended {
        Ok(reason) => assert_eq!(reason, DENIED_REASON),
        Err(e) => assert!(is_denied(&e), "{e:?}"),
    }
    Ok(())
}

/// The proxy binary keeps accepting clients and answering its health endpoint while a reload loads its files:
/// they are read on a blocking thread, not on the runtime of the accept loop (a 10,000-role policy takes about a
/// second to parse); and a SIGTERM during a reload ends it. A FIFO as the policy file holds the reload in its read
/// for as long as the test wants.
#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_serves_new_clients_while_a_reload_reads_its_files() -> TestResult {
    use std::io::Write;

    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let mut proxy =
        proxy_process(env!("CARGO_BIN_EXE_guard-under-test"), &pki, &etcd, BEFORE, "reload_check_interval_ms: 0\n")?;
    let (addr, metrics_addr) = (proxy.addr.clone(), proxy.metrics_addr);
    let reloads = |result: &str| -> TestResult<f64> {
        let (_, body) = http_get(metrics_addr, "/metrics")?;
        let prefix = format!("etcd_guard_reloads_total{{result=\"{result}\"}}");
        Ok(body
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0))
    };
    let in_progress = || -> TestResult<Option<f64>> {
        let (_, body) = http_get(metrics_addr, "/metrics")?;
        Ok(body.lines().find_map(|l| l.strip_prefix("etcd_guard_reload_in_progress ")?.parse().ok()))
    };

    // The policy file becomes a FIFO; a SIGHUP makes the reload open it and wait for a writer's bytes.
    let fifo = pki.path("policy.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    assert!(made.success(), "mkfifo: {made}");
    std::fs::rename(&fifo, pki.path("policy.yaml"))?;
    let mut writer = reading_fifo(&proxy, &pki.path("policy.yaml"))?;

    // Meanwhile: the health endpoint answers, a new client connects and is served by the policy in force.
    assert_eq!(http_get(metrics_addr, "/healthz")?.0, 200);
    let cilium = pki.client("cilium", "cilium-agent", None, &[])?;
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(pki.client_tls(&cilium)?)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5));
    let mut c = etcd_client::Client::connect([format!("https://{addr}")], Some(opts)).await?;
    assert_eq!(c.get("shared/a", None).await?.kvs().len(), 0);
    assert_eq!(reloads("ok")?, 0.0, "the reload is still reading");

    // A SIGHUP meanwhile is not lost: a warning names the part the reload is still loading, and another round
    // follows once this one ends.
    assert_eq!(in_progress()?, Some(1.0));
    proxy.signal("HUP")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(pki.path("proxy.log"))?;
        if log.lines().any(|l| {
            l.contains("reload requested while the previous reload is still loading")
                && l.contains("loading=\"the policy ")
        }) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("no warning of the reload still loading: {log}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The reload gets its policy (without shared/) and puts it in force; the policy file is a plain file again
    // for the second round.
    let after = BEFORE.replace(r#"      - { prefix: "shared/", access: read }"#, "");
    std::fs::write(pki.path("policy.new"), &after)?;
    std::fs::rename(pki.path("policy.new"), pki.path("policy.yaml"))?;
    writer.write_all(after.as_bytes())?;
    drop(writer);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Two rounds of a SIGHUP, three parts each.
    while reloads("ok")? < 6.0 || in_progress()? != Some(0.0) {
        if Instant::now() > deadline {
            return Err(format!("no reload: {}", std::fs::read_to_string(pki.path("proxy.log"))?).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = c.get("shared/a", None).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");
    drop(c);

    // A SIGTERM while a reload waits for its file: the proxy shuts down all the same, it does not wait for the
    // reload.
    let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    assert!(made.success(), "mkfifo: {made}");
    std::fs::rename(&fifo, pki.path("policy.yaml"))?;
    let _held = reading_fifo(&proxy, &pki.path("policy.yaml"))?;
    proxy.signal("TERM")?;
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .map_err(|e| format!("{e}, after SIGTERM while a reload waited for its file"))?;
    assert!(status.success(), "{status}: {}", std::fs::read_to_string(pki.path("proxy.log"))?);
    Ok(())
}

/// Send SIGHUP to `proxy` and return the write end of `fifo` (its policy file) once the reload has opened it: the
/// reload then waits in its read for as long as the write end is held open without a write.
fn reading_fifo(proxy: &ProxyProcess, fifo: &std::path::Path) -> TestResult<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    proxy.signal("HUP")?;
    // Opening a FIFO without blocking for writing succeeds once a reader has it open: the reload is reading.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match std::fs::OpenOptions::new().write(true).custom_flags(O_NONBLOCK).open(fifo) {
            Ok(w) => return Ok(w),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("the reload did not open the policy file: {e}").into()),
        }
    }
}

/// `O_NONBLOCK` on Linux.
const O_NONBLOCK: i32 = 0o4000;

/// A reloaded listener certificate that no longer covers `advertise_client_urls` is warned of, as at start: clients
/// that take their endpoints from MemberList would refuse the proxy after their next sync.
#[tokio::test(flavor = "multi_thread")]
async fn a_reloaded_listener_certificate_is_checked_against_the_advertised_urls() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let extra = "reload_check_interval_ms: 0\nadvertise_client_urls: [\"https://127.0.0.1:23790\"]\n";
    let proxy = proxy_process(env!("CARGO_BIN_EXE_guard-under-test"), &pki, &etcd, BEFORE, extra)?;
    let log = || std::fs::read_to_string(pki.path("proxy.log")).unwrap_or_default();
    let warning = "advertise_client_urls https://127.0.0.1:23790: the listener certificate";
    assert!(!log().contains(warning), "the certificate at start covers it: {}", log());

    let elsewhere =
        pki.ca.issue(etcd_guard::certs::LeafKind::Server, "etcd-guard", None, &["elsewhere.example"], &[])?;
    pki.write_pair("server", &elsewhere.cert_pem, &elsewhere.key_pem)?;
    proxy.signal("HUP")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log().contains(warning) {
        assert!(Instant::now() < deadline, "no warning after the reload: {}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(log().contains("not valid for 127.0.0.1"), "{}", log());
    Ok(())
}
