//! The listener refuses clients without a valid certificate at the TLS handshake.

use std::sync::Arc;

use etcd_guard::certs::{DevCa, LeafKind};
use etcd_guard_tests::{Harness, TestResult};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn roots(h: &Harness) -> TestResult<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(h.pki.ca_file())? {
        roots.add(c?)?;
    }
    Ok(roots)
}

/// Try a TLS connection and one HTTP/2 preface; Ok(true) if the server kept talking.
async fn handshake(h: &Harness, client: Option<(String, String)>) -> TestResult<bool> {
    handshake_with(h, client_config(h, client, rustls::DEFAULT_VERSIONS)?).await
}

fn client_config(
    h: &Harness,
    client: Option<(String, String)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TestResult<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots(h)?);
    let mut config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// [`handshake`] with a client configuration of the caller's (which keeps its TLS sessions for resumption).
async fn handshake_with(h: &Harness, config: Arc<rustls::ClientConfig>) -> TestResult<bool> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::net::TcpStream::connect(h.proxy_addr).await?;
    let mut tls = match connector.connect(ServerName::try_from("localhost")?, tcp).await {
        Ok(t) => t,
        Err(_) => return Ok(false),
    };
    // TLS 1.3 client auth failures surface on the first read after the handshake.
    if tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.is_err() {
        return Ok(false);
    }
    let mut buf = [0u8; 9];
    Ok(tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_exact(&mut buf)).await.is_ok_and(|r| r.is_ok()))
}

/// The proxy's `/metrics` once it holds every line of `lines` (or after 5 s, for the caller's assertions to tell
/// which is missing). A refused handshake is counted after its alert has gone out, so a client that has read the
/// alert can ask for the metrics before the count is there.
async fn metrics_with(h: &Harness, lines: &[String]) -> TestResult<String> {
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, metrics) = etcd_guard_tests::http_get(addr, "/metrics")?;
        let all = lines.iter().all(|line| metrics.lines().any(|l| l == line));
        if all || std::time::Instant::now() > deadline {
            return Ok(metrics);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_are_checked_at_the_handshake() -> TestResult {
    let h = Harness::start().await?;
    let good = h.pki.ca.issue(LeafKind::Client, "admin", None, &[], &[])?;
    assert!(handshake(&h, Some((good.cert_pem, good.key_pem))).await?, "a valid certificate is accepted");

    assert!(!handshake(&h, None).await?, "no certificate");

    let other = DevCa::new("some other CA")?.issue(LeafKind::Client, "admin", None, &[], &[])?;
    assert!(!handshake(&h, Some((other.cert_pem, other.key_pem))).await?, "another CA");

    let expired = h.pki.ca.issue_with(LeafKind::Client, "admin", None, &[], &[], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    })?;
    assert!(!handshake(&h, Some((expired.cert_pem, expired.key_pem))).await?, "expired");
    let failures: Vec<String> = ["expired", "unknown_issuer", "no_certificate"]
        .iter()
        .map(|reason| format!("etcd_guard_tls_handshake_failures_total{{reason=\"{reason}\"}} 1"))
        .collect();
    let metrics = metrics_with(&h, &failures).await?;
    for certificate in ["listener", "client_ca", "upstream_client", "upstream_ca"] {
        let name = format!("etcd_guard_certificate_expiration_timestamp_seconds{{certificate=\"{certificate}\"}} ");
        assert!(metrics.lines().any(|l| l.starts_with(&name)), "{name} not in:\n{metrics}");
    }
    for line in &failures {
        assert!(metrics.lines().any(|l| l == line), "{line} not in:\n{metrics}");
    }
    Ok(())
}

/// A certificate that verifies but makes no identity (here a SPIFFE ID in another spelling than the spec's) is
/// refused in the handshake with a TLS alert the client can report (before: the handshake completed and the
/// proxy closed the connection without a word, which etcdctl reports as "context deadline exceeded"), and
/// counted as `bad_identity`.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_without_an_identity_is_refused_with_an_alert() -> TestResult {
    let h = Harness::start().await?;
    let bad = h.pki.ca.issue(LeafKind::Client, "app", None, &[], &["spiffe://cluster.local/ns/../sa/admin"])?;
    let config = client_config(&h, Some((bad.cert_pem, bad.key_pem)), rustls::DEFAULT_VERSIONS)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::net::TcpStream::connect(h.proxy_addr).await?;
    let mut tls = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
    // TLS 1.3: the server's verdict on the client certificate arrives after the client's side of the handshake.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 9];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_exact(&mut buf)).await?;
    let error = read.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("CertificateUnknown"), "the client gets an alert: {error:?}");
    let line = "etcd_guard_tls_handshake_failures_total{reason=\"bad_identity\"} 1";
    let metrics = metrics_with(&h, &[line.to_string()]).await?;
    assert!(metrics.lines().any(|l| l == line), "{line} not in:\n{metrics}");
    Ok(())
}

/// A client certificate that expired since its session began cannot resume the session: resumption would skip
/// the certificate's verification (before: an expired certificate kept working for as long as its client kept
/// resuming). Over TLS 1.3 and 1.2, with a client that keeps its sessions.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_cannot_resume_its_session() -> TestResult {
    let h = Harness::start().await?;
    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
        let short = h.pki.ca.issue_with(LeafKind::Client, "admin", None, &[], &[], |p| {
            let now = std::time::SystemTime::now();
            p.not_before = (now - std::time::Duration::from_secs(60)).into();
            p.not_after = (now + std::time::Duration::from_secs(3)).into();
        })?;
        let config = client_config(&h, Some((short.cert_pem, short.key_pem)), versions)?;
        assert!(handshake_with(&h, config.clone()).await?, "{versions:?}: accepted while valid");
        tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        assert!(!handshake_with(&h, config).await?, "{versions:?}: the expired certificate resumed its session");
    }
    Ok(())
}

/// A client that completes TLS but never starts HTTP/2 is let go after the handshake timeout (10 s by default),
/// as one that never completes TLS is: it does not hold a connection for good (before: it did).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_starts_http2_is_let_go() -> TestResult {
    let h = Harness::start().await?;
    let good = h.pki.ca.issue(LeafKind::Client, "nobody", None, &[], &[])?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(good.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&h)?)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(good.key_pem.as_bytes())?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(h.proxy_addr).await?;
    let mut tls = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
    let started = std::time::Instant::now();
    // The server's SETTINGS may come first; then the end of the connection, not a wait for ever.
    let mut buf = [0u8; 256];
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "still open after {:?}", started.elapsed());
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(5),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    Ok(())
}
