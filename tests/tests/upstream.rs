//! The upstream leg: client deadlines reach etcd, and an unreachable etcd is `Unavailable`.

use std::time::{Duration, Instant};

use etcd_guard_proto::v3lockpb::LockRequest;
use etcd_guard_proto::v3lockpb::lock_client::LockClient;
use etcd_guard_tests::{Harness, TestResult, bare_h2};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn client_deadline_reaches_etcd() -> TestResult {
    let h = Harness::start().await?;
    let admin = h.admin()?;
    let mut c = h.client(&admin).await?;
    // Hold a lock, then ask for it again with a 300 ms deadline over a connection that only sends `grpc-timeout`:
    // it is etcd that gives up, so `DeadlineExceeded` within seconds shows the deadline went through the proxy.
    let lease = c.lease_grant(30, None).await?.id();
    c.lock("held", Some(etcd_client::LockOptions::new().with_lease(lease))).await?;

    let other_lease = c.lease_grant(30, None).await?.id();
    let mut lock = LockClient::with_origin(bare_h2(&h, &admin, None).await?, "https://localhost".parse()?);
    let mut req = tonic::Request::new(LockRequest { name: b"held".to_vec(), lease: other_lease });
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), lock.lock(req)).await;
    let status = match r {
        Ok(Err(status)) => status,
        Ok(Ok(_)) => return Err("the second lock must not be granted while the first is held".into()),
        Err(_) => return Err("no answer within 10 s: the deadline did not reach etcd".into()),
    };
    // etcd answers in one of two ways, depending on which of its goroutines sees the deadline first: grpc-go's
    // transport (`DeadlineExceeded`) or the lock handler returning Go's context error (`Unknown`, "context deadline
    // exceeded"). Both come from etcd; the proxy forwards either unchanged.
    let from_etcd = status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Unknown && status.message() == "context deadline exceeded");
    assert!(from_etcd, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_etcd_is_unavailable() -> TestResult {
    let mut h = Harness::start().await?;
    let admin = h.admin()?;
    let mut c = h.client(&admin).await?;
    c.put("k", "v", None).await?;
    h.etcd.kill()?;
    let e = c.get("k", None).await.err();
    match e {
        Some(etcd_client::Error::GRpcStatus(s)) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        other => return Err(format!("expected Unavailable, got {other:?}").into()),
    }
    Ok(())
}

/// clientv3 and kube-apiserver ping idle connections (every 30 s, or as configured, e.g. 5 s): the listener must
/// answer pings, not close the connection. Here a client pings every 300 ms for 3 s, then uses the connection.
#[tokio::test(flavor = "multi_thread")]
async fn frequent_client_pings_keep_the_connection() -> TestResult {
    use etcd_guard_proto::etcdserverpb::RangeRequest;
    use etcd_guard_proto::etcdserverpb::kv_client::KvClient;
    let h = Harness::start().await?;
    let conn = bare_h2(&h, &h.admin()?, Some(Duration::from_millis(300))).await?;
    let mut kv = KvClient::with_origin(conn, "https://localhost".parse()?);
    kv.range(RangeRequest { key: b"a".to_vec(), ..Default::default() }).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Same HTTP/2 connection (BareH2 never reconnects): it is still open.
    kv.range(RangeRequest { key: b"a".to_vec(), ..Default::default() }).await?;
    Ok(())
}

/// A client that stops reading its watches holds up only its own streams. HTTP/2 flow control is per connection:
/// etcd's events a client leaves unread hold their connection's window, so on a connection to etcd shared with
/// others (before: 8 streams × 4 MiB unread filled its 16 MiB) etcd could answer nobody on it any more.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_its_watches_holds_up_nobody_else() -> TestResult {
    let h = Harness::start().await?;
    let mut stalled = h.client(&h.cilium()?).await?;
    let mut unread = Vec::new();
    for _ in 0..8 {
        let prefix = etcd_client::WatchOptions::new().with_prefix();
        unread.push(stalled.watch("cilium/big/", Some(prefix)).await?);
    }
    let mut direct = h.client_direct().await?;
    let value = vec![b'x'; 1 << 20];
    for i in 0..24 {
        direct.put(format!("cilium/big/{i}"), value.clone(), None).await?;
    }
    let mut admin = h.client(&h.admin()?).await?;
    for _ in 0..3 {
        let answer = tokio::time::timeout(Duration::from_secs(5), admin.get("cilium/big/0", None)).await;
        assert!(matches!(&answer, Ok(Ok(r)) if r.kvs().len() == 1), "{:?}", answer.map(|r| r.map(|_| ())));
    }
    // (The stalled client's own connection to the proxy is full of what it did not read: like a connection to etcd,
    // it carries nothing more for that client until it reads.)
    drop(unread);
    Ok(())
}

/// Connections etcd has open now (its end of each: local port `port`, ESTABLISHED), from /proc/net/tcp.
fn etcd_connections(port: u16) -> TestResult<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let port = format!(":{port:04X}");
    Ok(table
        .lines()
        .skip(1)
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "01"
        })
        .count())
}

/// A client connection's own connection to etcd for its streams is made at its first stream and closed with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_connections_own_connection_to_etcd_ends_with_it() -> TestResult {
    let h = Harness::start().await?;
    let port: u16 = h.etcd.client_url.rsplit(':').next().ok_or("no port")?.parse()?;
    let mut c = h.client(&h.cilium()?).await?;
    c.get("cilium/x", None).await?;
    let mut direct = h.client_direct().await?;
    direct.get("cilium/x", None).await?;
    let before = etcd_connections(port)?;
    // A keep-alive stream (a watch may be served from a shared watch when `watch.coalesce` is on).
    let lease = c.lease_grant(30, None).await?.id();
    let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    let got = tokio::time::timeout(Duration::from_secs(5), answers.message()).await;
    assert!(matches!(&got, Ok(Ok(Some(_)))), "{got:?}");
    assert_eq!(etcd_connections(port)?, before + 1, "a connection of its own for the stream");
    let mut other = c.watch("cilium/y", Some(etcd_client::WatchOptions::new().with_start_revision(1))).await?;
    direct.put("cilium/y", "1", None).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), other.message()).await;
    assert!(matches!(&got, Ok(Ok(Some(_)))), "{got:?}");
    assert_eq!(etcd_connections(port)?, before + 1, "its streams share it");
    drop((keeper, answers, other, c));
    let deadline = Instant::now() + Duration::from_secs(10);
    while etcd_connections(port)? > before {
        assert!(Instant::now() < deadline, "still {} connections, {} before", etcd_connections(port)?, before);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `config check --connect` reaches every endpoint as the proxy would, and says of each whether it works: etcd's
/// version and leader for one that does; the reason for one that refuses connections, or whose certificate the
/// upstream CA did not sign.
#[test]
fn config_check_connect_reports_each_endpoint() -> TestResult {
    use etcd_guard_tests::{Etcd, Pki, free_port};

    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let closed = format!("https://127.0.0.1:{}", free_port()?);
    let policy = "roles: [ { name: r, keys: [ { prefix: \"r/\", access: read } ] } ]\nbindings: [ { role: r, subjects: [ { common_name: x } ] } ]\n";
    std::fs::write(pki.path("policy.yaml"), policy)?;
    let config = |ca: &str| -> TestResult<std::path::PathBuf> {
        let path = pki.path(&format!("check-{ca}.yaml"));
        std::fs::write(
            &path,
            format!(
                r#"listen: "127.0.0.1:{}"
tls: {{ cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt }}
upstream: {{ endpoints: ["{}", "{closed}"], ca_file: {ca}, cert_file: upstream-client.crt, key_file: upstream-client.key, connect_timeout_ms: 2000 }}
policy_file: policy.yaml
audit: {{ enabled: false }}
"#,
                free_port()?,
                etcd.client_url
            ),
        )?;
        Ok(path)
    };
    let check = |path: &std::path::Path, connect: bool| -> TestResult<std::process::Output> {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test"));
        cmd.args(["config", "check", "--config"]).arg(path);
        if connect {
            cmd.arg("--connect");
        }
        Ok(cmd.output()?)
    };

    // Without --connect the files are all it looks at: it passes though one endpoint is closed.
    let right = config("ca.crt")?;
    let o = check(&right, false)?;
    assert!(o.status.success(), "{}", etcd_guard_tests::stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("upstream"), "{out}");

    let o = check(&right, true)?;
    let (out, err) = (String::from_utf8_lossy(&o.stdout), etcd_guard_tests::stderr(&o));
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    let ok = format!("upstream {}: ok (etcd 3.", etcd.client_url);
    assert!(out.contains(&ok) && out.contains(", the leader)"), "{out}");
    assert!(err.contains(&format!("upstream {closed}: cannot connect to etcd")), "{err}");
    assert!(err.contains("refused") && !err.contains("next attempt"), "{err}");

    // An upstream CA that did not sign etcd's certificate (another CA of the same name): both endpoints fail, the
    // first for that reason.
    let other = Pki::new()?;
    std::fs::copy(other.path("ca.crt"), pki.path("other-ca.crt"))?;
    let o = check(&config("other-ca.crt")?, true)?;
    let (out, err) = (String::from_utf8_lossy(&o.stdout), etcd_guard_tests::stderr(&o));
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(!out.contains("upstream"), "{out}");
    let first = err.lines().find(|l| l.contains(&etcd.client_url)).unwrap_or_default();
    assert!(first.contains("invalid peer certificate") && !first.contains("next attempt"), "{err}");

    // An upstream certificate etcd does not trust (another PKI's): etcd refuses it after the handshake.
    let other_client = other.path("upstream-client.crt");
    let foreign = std::fs::read_to_string(config("ca.crt")?)?
        .replace("cert_file: upstream-client.crt", &format!("cert_file: {}", other_client.display()))
        .replace(
            "key_file: upstream-client.key",
            &format!("key_file: {}", other.path("upstream-client.key").display()),
        );
    std::fs::write(pki.path("check-foreign.yaml"), foreign)?;
    let o = check(&pki.path("check-foreign.yaml"), true)?;
    let (out, err) = (String::from_utf8_lossy(&o.stdout), etcd_guard_tests::stderr(&o));
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    let first = err.lines().find(|l| l.contains(&etcd.client_url)).unwrap_or_default();
    assert!(first.contains("etcd refused the proxy's certificate"), "{err}");

    // etcd's auth on, and the upstream certificate's name (`etcd-guard`) no user of etcd's: connected, but the
    // keyspace cannot be read, which the proxy needs.
    let etcdctl = |args: &[&str]| -> TestResult {
        let o = std::process::Command::new(etcd_guard_tests::etcd_tool("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.client_url))
            .arg(format!("--cacert={}", pki.path("ca.crt").display()))
            .arg(format!("--cert={}", pki.path("upstream-client.crt").display()))
            .arg(format!("--key={}", pki.path("upstream-client.key").display()))
            .args(args)
            .output()?;
        assert!(o.status.success(), "etcdctl {args:?}: {}", etcd_guard_tests::stderr(&o));
        Ok(())
    };
    etcdctl(&["user", "add", "root:not-used-here"])?;
    etcdctl(&["user", "grant-role", "root", "root"])?;
    etcdctl(&["auth", "enable"])?;
    let o = check(&right, true)?;
    let (out, err) = (String::from_utf8_lossy(&o.stdout), etcd_guard_tests::stderr(&o));
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    let first = err.lines().find(|l| l.contains(&etcd.client_url)).unwrap_or_default();
    assert!(first.contains("reading the keyspace failed") && first.contains("root role"), "{err}");
    Ok(())
}
