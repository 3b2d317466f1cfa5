//! TLS on both legs: the client-facing listener (mutual TLS, client certificate required and verified) and the
//! upstream connection to etcd (mutual TLS with the proxy's own identity).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::http2::client::{Connection, Connector};

use crate::config;

/// Why TLS material was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: no certificate found in the file")]
    NoCertificate { path: PathBuf },
    #[error("{cert} and {key}: the private key does not match the certificate ({message})")]
    KeyMismatch { cert: PathBuf, key: PathBuf, message: String },
    #[error("{path}: {message}")]
    Verifier { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("upstream endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("{path}: the CRL expired at {next_update} (its nextUpdate); get a fresh one from the CA")]
    CrlExpired { path: PathBuf, next_update: String },
    #[error("{path}: not a CRL: {message}")]
    BadCrl { path: PathBuf, message: String },
}

/// HTTP/2 connection window, both legs. h2 closes a connection whose unread small DATA frames exceed half of it,
/// so it must hold bursts of small gRPC messages (watch events, keep-alives); memory is only used while data
/// is actually unread.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// HTTP/2 stream window, both legs (etcd's responses can be large: a Range of many keys, a snapshot chunk).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// The crypto provider used everywhere: rustls with *ring*.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Build the listener's rustls configuration: the server certificate, client certificates required and verified
/// against the client CA bundle (and CRLs, with expired CRLs refused), HTTP/2 only.
pub fn server_config(tls: &config::ListenerTls) -> Result<ServerTls, TlsError> {
    let provider = provider();
    let chain = load_certs(&tls.cert_file)?;
    let key = load_key(&tls.key_file)?;
    let certified = check_pair(&chain, &key, &tls.cert_file, &tls.key_file, &provider)?;

    let mut roots = RootCertStore::empty();
    let cas = load_certs(&tls.client_ca_file)?;
    let mut crls = Vec::new();
    for path in &tls.crl_files {
        let loaded = load_crls(path)?;
        if !tls.danger_accept_expired_crls {
            for crl in &loaded {
                check_crl_current(path, crl)?;
            }
        }
        crls.extend(loaded);
    }
    let trust_digest = trust_digest(&cas, &crls, tls.danger_accept_expired_crls);
    for ca in cas {
        roots.add(ca).map_err(|e| TlsError::Pem { path: tls.client_ca_file.clone(), message: e.to_string() })?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).with_crls(crls);
    if !tls.danger_accept_expired_crls {
        builder = builder.enforce_revocation_expiration();
    }
    let verifier =
        builder.build().map_err(|e| TlsError::Verifier { path: tls.client_ca_file.clone(), message: e.to_string() })?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls { config: Arc::new(config), client_verifier: verifier, trust_digest })
}

/// What a client certificate verifier is made of — the CA certificates, the CRLs and whether expired CRLs are
/// accepted — as one digest, so a reload that changed none of it leaves open connections alone.
fn trust_digest(
    cas: &[CertificateDer<'_>],
    crls: &[CertificateRevocationListDer<'_>],
    accept_expired: bool,
) -> TrustDigest {
    let mut h = Sha256::new();
    for der in cas.iter().map(|c| c.as_ref()).chain([&[][..]]).chain(crls.iter().map(|c| c.as_ref())) {
        // Each part with its length, and an empty one between the CAs and the CRLs: no two inputs hash alike.
        h.update((der.len() as u64).to_be_bytes());
        h.update(der);
    }
    h.update([u8::from(accept_expired)]);
    h.finalize().into()
}

/// See [`trust_digest`].
pub type TrustDigest = [u8; 32];

/// The listener's TLS: the rustls configuration for new handshakes and the client certificate verifier it uses
/// (the client CA bundle and CRLs), which open connections are checked against again after a reload.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    pub trust_digest: TrustDigest,
}

/// The client certificate verifier in force. A reload of the listener that changes the client CA bundle or the
/// CRLs replaces it, and every open connection checks its client's certificate chain against the new one
/// ([`ClientTrust::untrusted`]): a certificate a new CRL revokes, or a CA taken out of the bundle, loses its open
/// connections too, not only its next handshake.
pub struct ClientTrust {
    verifier: watch::Sender<Arc<dyn ClientCertVerifier>>,
    digest: Mutex<TrustDigest>,
}

/// A connection's view of [`ClientTrust`]: its client's chain, the time of its handshake, and the verifier it was
/// last checked against.
pub struct PeerTrust {
    chain: Vec<CertificateDer<'static>>,
    verified_at: UnixTime,
    verifier: watch::Receiver<Arc<dyn ClientCertVerifier>>,
}

// === impl ClientTrust ===

impl ClientTrust {
    pub fn new(tls: &ServerTls) -> ClientTrust {
        ClientTrust { verifier: watch::Sender::new(tls.client_verifier.clone()), digest: Mutex::new(tls.trust_digest) }
    }

    /// Put a reloaded verifier in force for open connections, if it is made of other CAs or CRLs than the one in
    /// force (every connection checks its chain again then): whether it was.
    pub fn replace(&self, tls: &ServerTls) -> bool {
        let mut digest = self.digest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *digest == tls.trust_digest {
            return false;
        }
        *digest = tls.trust_digest;
        self.verifier.send_replace(tls.client_verifier.clone());
        true
    }

    /// Taken before the handshake's acceptor is (the reload replaces the acceptor first), so that a reload between
    /// the two is still seen by the connection.
    pub fn watch(&self) -> watch::Receiver<Arc<dyn ClientCertVerifier>> {
        self.verifier.subscribe()
    }
}

// === impl PeerTrust ===

impl PeerTrust {
    /// After a handshake that verified `chain` (leaf first).
    pub fn new(chain: &[CertificateDer<'_>], verifier: watch::Receiver<Arc<dyn ClientCertVerifier>>) -> PeerTrust {
        let chain = chain.iter().map(|c| c.clone().into_owned()).collect();
        PeerTrust { chain, verified_at: UnixTime::now(), verifier }
    }

    /// Resolves when a reloaded verifier no longer trusts the chain, with the reason. The chain is checked as of
    /// its handshake: a reload ends connections whose certificate was revoked or whose CA was removed, not those
    /// whose certificate expired since they were made (etcd does not end those either).
    pub async fn untrusted(&mut self) -> rustls::Error {
        loop {
            if self.verifier.changed().await.is_err() {
                return std::future::pending().await;
            }
            let verifier = self.verifier.borrow_and_update().clone();
            let Some((leaf, intermediates)) = self.chain.split_first() else {
                return rustls::Error::NoCertificatesPresented;
            };
            if let Err(e) = verifier.verify_client_cert(leaf, intermediates, self.verified_at) {
                return e;
            }
        }
    }
}

/// The upstream connections: `connections_per_endpoint` per endpoint, each made at its first call and made again
/// after it breaks.
pub fn upstream_connections(up: &config::Upstream) -> Result<Vec<(String, Connection)>, TlsError> {
    let tls = TlsConnector::from(upstream_tls(up)?);
    let mut endpoints = Vec::with_capacity(up.endpoints.len());
    for url in &up.endpoints {
        let bad = |message: String| TlsError::Endpoint { endpoint: url.clone(), message };
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme".into()))?;
        if scheme != http::uri::Scheme::HTTPS {
            return Err(bad("only https:// endpoints are supported".into()));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host".into()))?;
        let authority = match authority.port_u16() {
            Some(_) => authority,
            None => {
                format!("{}:443", authority.as_str()).parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?
            }
        };
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let server_name = ServerName::try_from(host).map_err(|e| bad(e.to_string()))?;
        let connector = Connector {
            tls: tls.clone(),
            scheme,
            authority,
            server_name,
            connect_timeout: up.connect_timeout,
            // See CONNECTION_WINDOW: a watch fanning one put out to thousands of watchers arrives as thousands of
            // small DATA frames on this one connection.
            connection_window: CONNECTION_WINDOW,
            stream_window: STREAM_WINDOW,
            keep_alive_interval: std::time::Duration::from_secs(30),
            keep_alive_timeout: std::time::Duration::from_secs(10),
        };
        // Several connections per endpoint, so one HTTP/2 connection (one task, one TLS stream) is not the
        // bottleneck for every client of the proxy.
        for _ in 0..up.connections_per_endpoint.max(1) {
            endpoints.push((url.clone(), Connection::new(connector.clone())));
        }
    }
    Ok(endpoints)
}

/// Check the upstream TLS files (readable, parseable, key matching certificate) without connecting.
pub fn upstream_channel_check(up: &config::Upstream) -> Result<(), TlsError> {
    upstream_tls(up).map(|_| ())
}

/// Parse everything now so a bad file is reported at start, not at the first request.
fn upstream_tls(up: &config::Upstream) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&up.ca_file)? {
        roots.add(ca).map_err(|e| TlsError::Pem { path: up.ca_file.clone(), message: e.to_string() })?;
    }
    let chain = load_certs(&up.cert_file)?;
    let key = load_key(&up.key_file)?;
    let certified = check_pair(&chain, &key, &up.cert_file, &up.key_file, &provider)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Read every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// Read the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: format!("no usable private key: {e}") })
}

/// Read the CRLs in a file, PEM or DER.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let pem = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: e.to_string() })?;
    if pem.is_empty() {
        // Not PEM: take the file as one DER CRL; the verifier parses it when built.
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    Ok(pem)
}

/// Refuse a CRL whose nextUpdate has passed: revocations issued since are unknown.
fn check_crl_current(path: &Path, crl: &CertificateRevocationListDer<'_>) -> Result<(), TlsError> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
        .map_err(|e| TlsError::BadCrl { path: path.to_path_buf(), message: e.to_string() })?;
    if let Some(next) = parsed.next_update() {
        if next.timestamp() < ::time::OffsetDateTime::now_utc().unix_timestamp() {
            return Err(TlsError::CrlExpired { path: path.to_path_buf(), next_update: next.to_string() });
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn check_pair(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let mismatch =
        |message: String| TlsError::KeyMismatch { cert: cert_path.to_path_buf(), key: key_path.to_path_buf(), message };
    let signing = provider.key_provider.load_private_key(key.clone_key()).map_err(|e| mismatch(e.to_string()))?;
    let certified = CertifiedKey::new(chain.to_vec(), signing);
    certified.keys_match().map_err(|e| mismatch(e.to_string()))?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{self, DevCa, InitOptions};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn listener(dir: &Path, crl: &str, danger: bool) -> config::ListenerTls {
        config::ListenerTls {
            cert_file: dir.join("server.crt"),
            key_file: dir.join("server.key"),
            client_ca_file: dir.join("ca.crt"),
            crl_files: vec![dir.join(crl)],
            danger_accept_expired_crls: danger,
            handshake_timeout: std::time::Duration::from_secs(1),
        }
    }

    fn ca(dir: &Path) -> Result<DevCa, Box<dyn std::error::Error>> {
        certs::init_dir(dir, &InitOptions::default())?;
        Ok(DevCa::from_pem(
            &std::fs::read_to_string(dir.join("ca.crt"))?,
            &std::fs::read_to_string(dir.join("ca.key"))?,
        )?)
    }

    #[test]
    fn an_expired_crl_is_refused_unless_explicitly_accepted() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = ca(dir.path())?;
        let now = ::time::OffsetDateTime::now_utc();
        let expired = ca.crl_between(&[], 1, now - ::time::Duration::days(2), now - ::time::Duration::days(1))?;
        std::fs::write(dir.path().join("expired.pem"), expired)?;
        let err = server_config(&listener(dir.path(), "expired.pem", false)).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("expired.pem") && e.contains("expired")), "{err:?}");
        assert!(server_config(&listener(dir.path(), "expired.pem", true)).is_ok());
        Ok(())
    }

    #[test]
    fn crls_load_as_pem_or_der() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = ca(dir.path())?;
        let pem = ca.crl(&[vec![1, 2, 3]], 1, std::time::Duration::from_secs(3600))?;
        std::fs::write(dir.path().join("crl.pem"), &pem)?;
        let der = CertificateRevocationListDer::pem_slice_iter(pem.as_bytes()).next().ok_or("no CRL")??;
        std::fs::write(dir.path().join("crl.der"), der.as_ref())?;
        assert!(server_config(&listener(dir.path(), "crl.pem", false)).is_ok());
        assert!(server_config(&listener(dir.path(), "crl.der", false)).is_ok());
        std::fs::write(dir.path().join("junk.der"), b"not a crl")?;
        assert!(server_config(&listener(dir.path(), "junk.der", false)).is_err());
        Ok(())
    }

    #[test]
    fn open_connections_are_checked_again_only_when_the_cas_or_crls_changed() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = ca(dir.path())?;
        let crl = |serials: &[Vec<u8>], number| ca.crl(serials, number, std::time::Duration::from_secs(3600));
        std::fs::write(dir.path().join("crl.pem"), crl(&[], 1)?)?;
        let trust = ClientTrust::new(&server_config(&listener(dir.path(), "crl.pem", false))?);
        let mut open = trust.watch();
        // The same files again (a SIGHUP, a renewed server certificate): nothing for open connections to do.
        assert!(!trust.replace(&server_config(&listener(dir.path(), "crl.pem", false))?));
        assert!(!open.has_changed()?);
        // A new CRL: every open connection checks its chain against it.
        std::fs::write(dir.path().join("crl.pem"), crl(&[vec![1, 2, 3]], 2)?)?;
        assert!(trust.replace(&server_config(&listener(dir.path(), "crl.pem", false))?));
        assert!(open.has_changed()?);
        open.mark_unchanged();
        // Accepting expired CRLs changes what is trusted too.
        assert!(trust.replace(&server_config(&listener(dir.path(), "crl.pem", true))?));
        assert!(open.has_changed()?);
        Ok(())
    }
}
