//! The upstream leg: client deadlines reach etcd, and an unreachable etcd is `Unavailable`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_guard_proto::v3lockpb::LockRequest;
use etcd_guard_proto::v3lockpb::lock_client::LockClient;
use etcd_guard_tests::{ClientCert, Harness, TestResult};
use tonic::Code;

/// A bare HTTP/2 connection to the proxy. Unlike tonic's `Channel` it does not enforce `grpc-timeout` itself, so
/// whatever answer comes back was decided on the far side.
#[derive(Clone)]
struct BareH2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type H2Future = Pin<Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for BareH2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = H2Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> H2Future {
        Box::pin(self.0.send_request(req))
    }
}

async fn bare_h2(h: &Harness, who: &ClientCert) -> TestResult<BareH2> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(h.pki.ca_file())? {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(&who.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&who.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(h.proxy_addr).await?;
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost")?, tcp).await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await?;
    tokio::spawn(conn);
    Ok(BareH2(send))
}

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
    let mut lock = LockClient::with_origin(bare_h2(&h, &admin).await?, "https://localhost".parse()?);
    let mut req = tonic::Request::new(LockRequest { name: b"held".to_vec(), lease: other_lease });
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), lock.lock(req)).await;
    let status = match r {
        Ok(Err(status)) => status,
        Ok(Ok(_)) => return Err("the second lock must not be granted while the first is held".into()),
        Err(_) => return Err("no answer within 10 s: the deadline did not reach etcd".into()),
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
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
