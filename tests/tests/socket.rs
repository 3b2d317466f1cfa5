//! The upstream leg over etcd's unix socket (`unixs://` endpoints): an etcd on the same host, reached with the same
//! mutual TLS as over TCP, and etcd's certificate checked against the endpoint's name.

use etcd_guard_tests::{Etcd, Harness, Pki, TEST_POLICY, TestResult, free_port, stderr, stdout};
use tonic::Code;

/// Through a proxy whose only endpoint is etcd's unix socket: reads, writes, a watch (on the client connection's
/// own upstream connection) and a lease keep-alive work as over TCP; a denied request is still denied.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_serves_over_etcds_unix_socket() -> TestResult {
    let h = Harness::over_socket(TEST_POLICY, "audit: { file: audit/audit.log }\n").await?;
    let admin = h.admin()?;
    let o = h.ctl(&admin, &["put", "over/socket", "v1"])?;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = h.ctl(&admin, &["get", "over/socket", "--print-value-only"])?;
    assert_eq!(stdout(&o).trim(), "v1", "{}", stderr(&o));
    // What the proxy wrote is in etcd: read over etcd's TCP port, past the proxy.
    let o = h.ctl_direct(&["get", "over/socket", "--print-value-only"])?;
    assert_eq!(stdout(&o).trim(), "v1", "{}", stderr(&o));

    let mut c = h.client(&admin).await?;
    let mut w = c.watch("over/", Some(etcd_client::WatchOptions::new().with_prefix())).await?;
    let wait = std::time::Duration::from_secs(10);
    let created = tokio::time::timeout(wait, w.message()).await??.ok_or("watch stream ended")?;
    assert!(created.created());
    c.put("over/watched", "v2", None).await?;
    let event = tokio::time::timeout(wait, w.message()).await??.ok_or("watch stream ended")?;
    let keys: Vec<_> = event.events().iter().filter_map(|e| e.kv()).map(|kv| kv.key().to_vec()).collect();
    assert_eq!(keys, vec![b"over/watched".to_vec()]);
    let lease = c.lease_grant(30, None).await?.id();
    let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    let answer = tokio::time::timeout(wait, answers.message()).await??;
    assert_eq!(answer.map(|a| a.id()), Some(lease));

    let mut cilium = h.client(&h.cilium()?).await?;
    match cilium.put("over/socket", "no", None).await {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!((s.code(), s.message()), (Code::PermissionDenied, "etcdserver: permission denied"));
        }
        other => return Err(format!("expected a denial, got {other:?}").into()),
    }
    cilium.put("cilium/over-socket", "yes", None).await?;
    Ok(())
}

/// etcd stopped under a proxy that reaches it over its socket — gracefully (the socket goes) or killed (the socket
/// stays, refusing connections) — is `Unavailable` to clients, and is reached again once it is back on the socket,
/// without a restart of the proxy.
#[tokio::test(flavor = "multi_thread")]
async fn etcd_back_on_its_socket_is_reached_again() -> TestResult {
    let mut h = Harness::over_socket(TEST_POLICY, "audit: { file: audit/audit.log }\n").await?;
    let mut c = h.client(&h.admin()?).await?;
    c.put("k", "v1", None).await?;
    for killed in [false, true] {
        if killed {
            h.etcd.kill()?
        } else {
            h.etcd.stop()?
        }
        match c.get("k", None).await {
            Err(etcd_client::Error::GRpcStatus(s)) => assert_eq!(s.code(), Code::Unavailable, "{killed}: {s:?}"),
            other => return Err(format!("{killed}: expected Unavailable, got {other:?}").into()),
        }
        h.etcd.restart(&h.pki)?;
        // The next attempt waits at most a second after failed ones; the health probe marks the endpoint healthy
        // within its interval.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            match c.get("k", None).await {
                Ok(r) if r.kvs().first().is_some_and(|kv| kv.value() == b"v1") => break,
                other if std::time::Instant::now() > deadline => {
                    return Err(format!("{killed}: etcd back on its socket, but: {other:?}").into());
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}

/// `config check --connect` reaches a `unixs://` endpoint as the proxy would: etcd's socket answers; one whose name
/// etcd's certificate is not valid for is refused, with the names it is valid for; a socket that is not there cannot
/// be connected to. And the configuration refuses etcd's own form of a socket URL, with the form it takes.
#[test]
fn config_check_connect_reaches_unix_sockets() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start_with_socket(&pki)?;
    let socket = etcd.socket_url().ok_or("etcd has no socket")?;
    let path = etcd.socket.as_ref().ok_or("etcd has no socket")?.display();
    let wrong_name = format!("unixs://etcd-0.example{path}");
    let missing = format!("unixs://localhost{path}.missing");
    std::fs::write(
        pki.path("policy.yaml"),
        "roles: [ { name: r, keys: [ { prefix: \"r/\", access: read } ] } ]\nbindings: [ { role: r, subjects: [ { common_name: x } ] } ]\n",
    )?;
    let config = |endpoints: &str| -> TestResult<std::path::PathBuf> {
        let path = pki.path("check.yaml");
        std::fs::write(
            &path,
            format!(
                r#"listen: "127.0.0.1:{}"
tls: {{ cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt }}
upstream: {{ endpoints: [{endpoints}], ca_file: ca.crt, cert_file: upstream-client.crt, key_file: upstream-client.key, connect_timeout_ms: 2000 }}
policy_file: policy.yaml
audit: {{ enabled: false }}
"#,
                free_port()?
            ),
        )?;
        Ok(path)
    };
    let check = |path: &std::path::Path| -> TestResult<std::process::Output> {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_guard-under-test"));
        Ok(cmd.args(["config", "check", "--connect", "--config"]).arg(path).output()?)
    };

    let o = check(&config(&format!("\"{socket}\", \"{wrong_name}\", \"{missing}\""))?)?;
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(out.contains(&format!("upstream {socket}: ok (etcd 3.")), "{out}");
    let line = |url: &str| err.lines().find(|l| l.contains(url)).unwrap_or_default().to_owned();
    let wrong = line(&wrong_name);
    // The names it is valid for (the URL names `localhost` in its path too: 127.0.0.1 is the certificate's).
    assert!(wrong.contains("not valid for name \"etcd-0.example\"") && wrong.contains("127.0.0.1"), "{err}");
    let gone = line(&missing);
    assert!(gone.contains("No such file or directory"), "{err}");

    // etcd's form names a socket relative to etcd's working folder, which the proxy cannot know.
    let o = check(&config("\"unixs://localhost:2379\"")?)?;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("unixs://localhost/var/run/etcd/localhost:2379"), "{err}");
    // Without TLS there is no mutual TLS.
    let o = check(&config(&format!("\"unix://localhost{path}\""))?)?;
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("only https:// and unixs://"), "{err}");
    Ok(())
}
