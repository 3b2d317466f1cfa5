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
use crate::identity::Identity;

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
    #[error("{path}: {message}")]
    Unusable { path: PathBuf, message: String },
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
    check_leaf(&tls.cert_file, &chain, Purpose::Server)?;
    // `check_pair` refuses an empty chain.
    let leaf = chain.first().cloned().ok_or_else(|| TlsError::NoCertificate { path: tls.cert_file.clone() })?;

    let mut roots = RootCertStore::empty();
    let cas = load_certs(&tls.client_ca_file)?;
    let mut crls = Vec::new();
    let mut earliest_next_update: Option<i64> = None;
    for path in &tls.crl_files {
        let loaded = load_crls(path)?;
        for crl in &loaded {
            let next = match crl_next_update(path, crl) {
                Ok(next) => next,
                // Not refused here with danger_accept_expired_crls: the verifier refuses a CRL it cannot parse.
                Err(_) if tls.danger_accept_expired_crls => None,
                Err(e) => return Err(e),
            };
            let Some(next) = next else { continue };
            // A CRL whose nextUpdate has passed is refused: revocations issued since are unknown.
            if !tls.danger_accept_expired_crls && next.timestamp() < ::time::OffsetDateTime::now_utc().unix_timestamp()
            {
                return Err(TlsError::CrlExpired { path: path.to_path_buf(), next_update: next.to_string() });
            }
            let next = next.timestamp();
            earliest_next_update = Some(earliest_next_update.map_or(next, |n| n.min(next)));
        }
        crls.extend(loaded);
    }
    let issuers = Arc::new(Issuers::load(tls, &cas, &crls, &provider)?);
    let trust_digest = trust_digest(&cas, &crls, tls.danger_accept_expired_crls, &issuers);
    let expiries = [Expiry::of("listener", &tls.cert_file, &chain), Expiry::of("client_ca", &tls.client_ca_file, &cas)]
        .into_iter()
        .flatten()
        .collect();
    for ca in cas {
        roots.add(ca).map_err(|e| TlsError::Pem { path: tls.client_ca_file.clone(), message: e.to_string() })?;
    }
    let verifier = client_verifier(roots, &crls, tls.danger_accept_expired_crls, &provider)
        .map_err(|e| TlsError::Verifier { path: tls.client_ca_file.clone(), message: e.to_string() })?;
    let verifier: Arc<dyn ClientCertVerifier> = Arc::new(StrictClientVerifier { webpki: verifier });

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session reuses the client certificate of its first handshake without
    // verifying it again, so an expired (or, until the next reload, revoked) certificate would keep working for
    // as long as the client keeps resuming. Every connection makes a full handshake; clients of etcd hold
    // long-lived connections, so this costs little.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    let acceptor = Acceptor { tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)), issuers: issuers.clone() };
    let trust = Trust { verifier, issuers };
    Ok(ServerTls { acceptor, trust, trust_digest, expiries, crl_next_update: earliest_next_update, leaf })
}

/// A client certificate verifier trusting `roots`, checking revocation against `crls` (expired CRLs refused
/// unless `accept_expired`): the listener's, and each named CA's of `tls.issuers`.
fn client_verifier(
    roots: RootCertStore,
    crls: &[CertificateRevocationListDer<'static>],
    accept_expired: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).with_crls(crls.to_vec());
    if !accept_expired {
        builder = builder.enforce_revocation_expiration();
    }
    builder.build()
}

/// The listener's client certificate verifier: webpki's (chain, validity, key usage for client authentication,
/// revocation), then what webpki leaves out, so that a certificate the proxy cannot use is refused *in* the
/// handshake, with a TLS alert the client reports (`certificate_unknown`), rather than by closing the connection
/// after it:
/// - every CA certificate the client sent on the way to its leaf must be allowed to sign certificates (a key
///   usage, when it has one, with `keyCertSign`: RFC 5280 6.1.4 (n); webpki does not check it, so a key
///   certified for something else, such as signing CRLs, could issue client identities);
/// - the leaf must make an identity ([`Identity::from_der`]: one CN at most, text attributes, SPIFFE IDs in their
///   one spelling).
///
/// It is also what open connections are checked against again after a reload.
#[derive(Debug)]
struct StrictClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
}

/// Why `StrictClientVerifier` refused a certificate that webpki accepted.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("the CA certificate {0} the client sent may not sign certificates (its key usage lacks keyCertSign)")]
    SignerCannotSign(String),
    #[error("a certificate the client sent does not parse: {0}")]
    Unreadable(String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

/// What a client certificate verifier is made of — the CA certificates, the CRLs, whether expired CRLs are
/// accepted and the named CAs — as one digest, so a reload that changed none of it leaves open connections alone.
fn trust_digest(
    cas: &[CertificateDer<'_>],
    crls: &[CertificateRevocationListDer<'_>],
    accept_expired: bool,
    issuers: &Issuers,
) -> TrustDigest {
    let mut h = Sha256::new();
    let mut part = |der: &[u8]| {
        // Each part with its length, and an empty one between lists: no two inputs hash alike.
        h.update((der.len() as u64).to_be_bytes());
        h.update(der);
    };
    for der in cas.iter().map(|c| c.as_ref()).chain([&[][..]]).chain(crls.iter().map(|c| c.as_ref())) {
        part(der);
    }
    part(&[u8::from(accept_expired)]);
    for (name, ders) in &issuers.digested {
        part(&[]);
        part(name.as_bytes());
        for der in ders {
            part(der);
        }
    }
    h.finalize().into()
}

/// See `trust_digest`.
pub type TrustDigest = [u8; 32];

/// The listener's TLS: the rustls configuration for new handshakes and the client certificate verifier it uses
/// (the client CA bundle and CRLs), which open connections are checked against again after a reload.
pub struct ServerTls {
    pub acceptor: Acceptor,
    pub trust: Trust,
    pub trust_digest: TrustDigest,
    /// When the listener's certificate and the client CAs expire.
    pub expiries: Vec<Expiry>,
    /// The earliest nextUpdate of the CRLs (Unix seconds): once it passes, every new handshake is refused until a
    /// fresh CRL is loaded (unless `danger_accept_expired_crls`).
    pub crl_next_update: Option<i64>,
    /// The listener's certificate (the leaf of `tls.cert_file`), for [`ServerTls::advertise_warnings`].
    leaf: CertificateDer<'static>,
}

// === impl ServerTls ===

impl ServerTls {
    /// The addresses of `advertise_client_urls` (what MemberList answers, so what clients that sync their endpoints
    /// dial) that the listener's certificate (from `cert_file`) is not valid for, as clients check it (webpki's
    /// rules: DNS and IP SANs, no common name, a wildcard only as a whole first label): one warning each. Such
    /// clients (`etcdctl --discovery-srv`, clientv3 with `AutoSyncInterval`) would refuse the proxy after a sync.
    pub fn advertise_warnings(&self, cert_file: &Path, urls: &[String]) -> Vec<String> {
        let Ok(cert) = webpki::EndEntityCert::try_from(&self.leaf) else { return Vec::new() };
        let mut warnings = Vec::new();
        for url in urls {
            let Some(host) = url.parse::<http::Uri>().ok().and_then(|u| u.host().map(str::to_owned)) else {
                continue;
            };
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let valid =
                ServerName::try_from(bare).is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok());
            if !valid {
                warnings.push(format!(
                    "advertise_client_urls {url}: the listener certificate ({}) is not valid for {bare}: clients \
                     that take their endpoints from MemberList would refuse it",
                    cert_file.display()
                ));
            }
        }
        warnings
    }
}

/// What new client connections are accepted with: the TLS configuration and the named CAs (`tls.issuers`) their
/// certificates are matched against.
#[derive(Clone)]
pub struct Acceptor {
    pub tls: tokio_rustls::TlsAcceptor,
    pub issuers: Arc<Issuers>,
}

/// The CAs of the client CA bundle that `tls.issuers` names, so that a binding can require a certificate to come
/// from one of them (`issuer:`): with a bundle of etcd's CA and a CA for components, a component certificate must
/// not pass for kube-apiserver's by taking its common name.
#[derive(Default)]
pub struct Issuers {
    /// Name → a verifier that trusts only that name's CAs, with the listener's CRLs.
    named: Vec<(String, Arc<dyn ClientCertVerifier>)>,
    /// Name → its CA certificates (DER), for the trust digest.
    digested: Vec<(String, Vec<Vec<u8>>)>,
}

/// What open connections are checked against after a reload: the client certificate verifier and the named CAs.
#[derive(Clone)]
pub struct Trust {
    pub verifier: Arc<dyn ClientCertVerifier>,
    pub issuers: Arc<Issuers>,
}

/// The upstream leg: the connections to etcd and when the files they use expire.
pub struct UpstreamTls {
    pub channels: Vec<(String, Connection)>,
    pub expiries: Vec<Expiry>,
}

/// When the certificates of one file expire: the earliest notAfter among them (a chain is as good as its first
/// certificate to expire; a CA bundle warns at its first CA to expire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// Which file: `listener`, `client_ca`, `upstream_client`, `upstream_ca`.
    pub certificate: &'static str,
    pub path: PathBuf,
    /// Unix seconds.
    pub not_after: i64,
}

/// How far ahead of our clock a certificate of our own may start (`notBefore`) and still be loaded.
pub const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// Warn this long before a certificate expires.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// The client certificate verifier in force. A reload of the listener that changes the client CA bundle or the
/// CRLs replaces it, and every open connection checks its client's certificate chain against the new one
/// ([`PeerTrust::untrusted`]): a certificate a new CRL revokes, or a CA taken out of the bundle, loses its open
/// connections too, not only its next handshake.
pub struct ClientTrust {
    trust: watch::Sender<Trust>,
    digest: Mutex<TrustDigest>,
}

/// A connection's view of [`ClientTrust`]: its client's chain, the time of its handshake, the names of the CAs it
/// chains to (`tls.issuers`), and the trust it was last checked against.
pub struct PeerTrust {
    chain: Vec<CertificateDer<'static>>,
    verified_at: UnixTime,
    issuers: Vec<String>,
    trust: watch::Receiver<Trust>,
}

/// Whether `cert` may be a CA: refused only when it says it is not (basic constraints `CA:FALSE`, or a key usage
/// without certificate signing). A certificate without either extension (a v1 CA, which the verifier accepts as a
/// trust anchor), or one that cannot be parsed, is left to the verifier.
fn is_ca(cert: &CertificateDer<'_>) -> bool {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else { return true };
    // Basic constraints that do not parse (or come twice) are not taken for none (fail closed).
    let says_not_ca = parsed.basic_constraints().map_or(true, |b| b.is_some_and(|b| !b.value.ca));
    // A key usage that does not parse is not taken for none (fail closed).
    let cannot_sign = parsed.key_usage().map_or(true, |k| k.is_some_and(|k| !k.value.key_cert_sign()));
    !(says_not_ca || cannot_sign)
}

/// `"CN=…"`: a certificate's subject, for messages.
fn subject_of(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, parsed)) => format!("{:?}", parsed.subject().to_string()),
        Err(_) => "a certificate".into(),
    }
}

// === impl StrictClientVerifier ===

impl ClientCertVerifier for StrictClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.webpki.verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |e: ChainError| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
        };
        check_signers(end_entity, intermediates).map_err(refuse)?;
        Identity::from_der(end_entity).map_err(|e| refuse(e.into()))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.webpki.requires_raw_public_keys()
    }
}

/// The CA certificates a client sent that can be on the way from its leaf to a root (whose subject is the issuer
/// of the leaf or of another one sent) must be allowed to sign certificates. Certificates sent that issued none
/// of the others are not on any path and are left alone, as webpki leaves them (but every one, the leaf too, must
/// parse, its key usage included).
///
/// Fails closed: a certificate sent that does not parse, or a key usage that does not (webpki keeps the extension's
/// bytes without reading them), is refused rather than taken for one that may sign.
pub fn check_signers(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Result<(), ChainError> {
    fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<x509_parser::certificate::X509Certificate<'a>, ChainError> {
        x509_parser::parse_x509_certificate(der.as_ref())
            .map(|(_, c)| c)
            .map_err(|e| ChainError::Unreadable(e.to_string()))
    }
    let sent = intermediates.iter().map(parse).collect::<Result<Vec<_>, _>>()?;
    let leaf = parse(end_entity)?;
    let issuers: Vec<&[u8]> =
        std::iter::once(leaf.issuer().as_raw()).chain(sent.iter().map(|c| c.issuer().as_raw())).collect();
    // Every certificate sent, the leaf too, must have a key usage that parses (Go, etcd's x509, refuses one that
    // does not); those on the way to the root must be allowed to sign.
    for (cert, on_path) in std::iter::once((&leaf, false)).chain(sent.iter().map(|ca| (ca, true))) {
        let subject = || format!("{:?}", cert.subject().to_string());
        match cert.key_usage() {
            Ok(None) => {}
            Ok(Some(usage)) if usage.value.key_cert_sign() || !on_path => {}
            Ok(Some(_)) if !issuers.contains(&cert.subject().as_raw()) => {}
            Ok(Some(_)) => return Err(ChainError::SignerCannotSign(subject())),
            Err(e) => return Err(ChainError::Unreadable(format!("the key usage of {}: {e}", subject()))),
        }
    }
    Ok(())
}

/// Why a handshake was refused, for the log: [`ChainError`]'s words rather than rustls' debug form of them.
pub fn refusal_text(e: &std::io::Error) -> String {
    match chain_error(e) {
        Some(chain) => format!("invalid peer certificate: {chain}"),
        None => e.to_string(),
    }
}

/// The [`ChainError`] a handshake failed with, if it was `StrictClientVerifier` that refused it.
pub fn chain_error(e: &std::io::Error) -> Option<&ChainError> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => other.0.downcast_ref(),
        _ => None,
    }
}

// === impl Issuers ===

impl Issuers {
    /// Each named file's CAs, which must all be in the client CA bundle (`bundle`): a name cannot widen what is
    /// trusted. Their verifiers check revocation as the listener's does, so a name is found only along a path the
    /// listener's verifier would accept too.
    fn load(
        tls: &config::ListenerTls,
        bundle: &[CertificateDer<'static>],
        crls: &[CertificateRevocationListDer<'static>],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Issuers, TlsError> {
        let bundle_path = &tls.client_ca_file;
        let mut issuers = Issuers::default();
        for (name, path) in &tls.issuers {
            let mut roots = RootCertStore::empty();
            let cas = load_certs(path)?;
            issuers.digested.push((name.clone(), cas.iter().map(|c| c.to_vec()).collect()));
            for ca in cas {
                if !is_ca(&ca) {
                    return Err(TlsError::Unusable {
                        path: path.clone(),
                        message: format!(
                            "tls.issuers.{name}: {} in this file is not a CA certificate that may sign (a server \
                             or client certificate? or its basic constraints or key usage do not parse): name the \
                             CA that issued the clients' certificates",
                            subject_of(&ca)
                        ),
                    });
                }
                if !bundle.contains(&ca) {
                    return Err(TlsError::Unusable {
                        path: path.clone(),
                        message: format!(
                            "tls.issuers.{name}: the CA {} in this file is not in tls.client_ca_file ({}); every \
                             issuer's CAs must be in the client CA bundle",
                            subject_of(&ca),
                            bundle_path.display()
                        ),
                    });
                }
                roots.add(ca).map_err(|e| TlsError::Pem { path: path.clone(), message: e.to_string() })?;
            }
            let verifier = client_verifier(roots, crls, tls.danger_accept_expired_crls, provider)
                .map_err(|e| TlsError::Verifier { path: path.clone(), message: e.to_string() })?;
            issuers.named.push((name.clone(), verifier));
        }
        Ok(issuers)
    }

    /// The names whose CAs `chain` (leaf first, verified by the listener) leads to, as of `now`.
    pub fn of(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Vec<String> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Vec::new();
        };
        self.named
            .iter()
            .filter(|(_, verifier)| verifier.verify_client_cert(leaf, intermediates, now).is_ok())
            .map(|(name, _)| name.clone())
            .collect()
    }
}

// === impl ClientTrust ===

impl ClientTrust {
    pub fn new(tls: &ServerTls) -> ClientTrust {
        ClientTrust { trust: watch::Sender::new(tls.trust.clone()), digest: Mutex::new(tls.trust_digest) }
    }

    /// Put a reloaded verifier in force for open connections, if it is made of other CAs or CRLs than the one in
    /// force (every connection checks its chain again then): whether it was.
    pub fn replace(&self, tls: &ServerTls) -> bool {
        let mut digest = self.digest.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *digest == tls.trust_digest {
            return false;
        }
        *digest = tls.trust_digest;
        self.trust.send_replace(tls.trust.clone());
        true
    }

    /// Taken before the handshake's acceptor is (the reload replaces the acceptor first), so that a reload between
    /// the two is still seen by the connection.
    pub fn watch(&self) -> watch::Receiver<Trust> {
        self.trust.subscribe()
    }
}

// === impl PeerTrust ===

impl PeerTrust {
    /// After a handshake that verified `chain` (leaf first) with `acceptor`: the connection's trust, and the
    /// names of the CAs its certificate chains to.
    pub fn new(chain: &[CertificateDer<'_>], acceptor: &Acceptor, trust: watch::Receiver<Trust>) -> PeerTrust {
        let chain: Vec<_> = chain.iter().map(|c| c.clone().into_owned()).collect();
        let verified_at = UnixTime::now();
        let issuers = acceptor.issuers.of(&chain, verified_at);
        PeerTrust { chain, verified_at, issuers, trust }
    }

    /// The names (`tls.issuers`) of the CAs the certificate chains to, as of its handshake.
    pub fn issuers(&self) -> &[String] {
        &self.issuers
    }

    /// Resolves when a reloaded trust no longer trusts the chain, or names its CAs differently, with the reason.
    /// The chain is checked as of its handshake: a reload ends connections whose certificate was revoked, whose
    /// CA was removed or whose issuers changed (their permissions were found with the old ones), not those whose
    /// certificate expired since they were made (etcd does not end those either).
    pub async fn untrusted(&mut self) -> String {
        loop {
            if self.trust.changed().await.is_err() {
                return std::future::pending().await;
            }
            let trust = self.trust.borrow_and_update().clone();
            let Some((leaf, intermediates)) = self.chain.split_first() else {
                return rustls::Error::NoCertificatesPresented.to_string();
            };
            if let Err(e) = trust.verifier.verify_client_cert(leaf, intermediates, self.verified_at) {
                return e.to_string();
            }
            let issuers = trust.issuers.of(&self.chain, self.verified_at);
            if issuers != self.issuers {
                return format!("the CAs tls.issuers names for it changed from {:?} to {issuers:?}", self.issuers);
            }
        }
    }
}

/// The upstream connections: `connections_per_endpoint` per endpoint, each made at its first call and made again
/// after it breaks.
pub fn upstream_connections(up: &config::Upstream) -> Result<UpstreamTls, TlsError> {
    let (config, expiries) = upstream_tls(up)?;
    let tls = TlsConnector::from(config);
    let mut endpoints = Vec::with_capacity(up.endpoints.len());
    for url in &up.endpoints {
        let bad = |message: String| TlsError::Endpoint { endpoint: url.clone(), message };
        let config::Endpoint { authority, socket, server_name } = config::endpoint(url).map_err(bad)?;
        let connector = Connector {
            tls: tls.clone(),
            scheme: http::uri::Scheme::HTTPS,
            authority,
            socket,
            server_name,
            connect_timeout: up.connect_timeout,
            // See CONNECTION_WINDOW: a watch fanning one put out to thousands of watchers arrives as thousands of
            // small DATA frames on this one connection.
            connection_window: CONNECTION_WINDOW,
            stream_window: STREAM_WINDOW,
            keep_alive_interval: std::time::Duration::from_secs(30),
            keep_alive_timeout: std::time::Duration::from_secs(10),
            ping_slowdowns: Arc::default(),
        };
        // Several connections per endpoint, so one HTTP/2 connection (one task, one TLS stream) is not the
        // bottleneck for every client of the proxy.
        for _ in 0..up.connections_per_endpoint.max(1) {
            endpoints.push((url.clone(), Connection::new(connector.clone())));
        }
    }
    Ok(UpstreamTls { channels: endpoints, expiries })
}

/// Check the upstream TLS files (readable, parseable, key matching certificate) without connecting.
pub fn upstream_channel_check(up: &config::Upstream) -> Result<Vec<Expiry>, TlsError> {
    upstream_tls(up).map(|(_, expiries)| expiries)
}

/// Parse everything now so a bad file is reported at start, not at the first request.
fn upstream_tls(up: &config::Upstream) -> Result<(Arc<ClientConfig>, Vec<Expiry>), TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    let cas = load_certs(&up.ca_file)?;
    let mut expiries: Vec<Expiry> = Expiry::of("upstream_ca", &up.ca_file, &cas).into_iter().collect();
    for ca in cas {
        roots.add(ca).map_err(|e| TlsError::Pem { path: up.ca_file.clone(), message: e.to_string() })?;
    }
    let chain = load_certs(&up.cert_file)?;
    expiries.extend(Expiry::of("upstream_client", &up.cert_file, &chain));
    let key = load_key(&up.key_file)?;
    let certified = check_pair(&chain, &key, &up.cert_file, &up.key_file, &provider)?;
    check_leaf(&up.cert_file, &chain, Purpose::Client)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), expiries))
}

// === impl Expiry ===

impl Expiry {
    /// The earliest notAfter of `certs` (certificates that do not parse are left to rustls, which refuses them).
    pub fn of(certificate: &'static str, path: &Path, certs: &[CertificateDer<'_>]) -> Option<Expiry> {
        certs
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
            .map(|(_, parsed)| parsed.validity().not_after.timestamp())
            .min()
            .map(|not_after| Expiry { certificate, path: path.to_path_buf(), not_after })
    }

    /// Seconds left until it expires (negative: expired), from `now` (Unix seconds).
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.not_after.saturating_sub(now)
    }

    /// [`Expiry::warning`] as of now.
    pub fn warning_now(&self) -> Option<String> {
        self.warning(::time::OffsetDateTime::now_utc().unix_timestamp())
    }

    /// A warning if it expires within [`EXPIRY_WARNING`] of `now`, or has expired.
    pub fn warning(&self, now: i64) -> Option<String> {
        let left = self.seconds_left(now);
        let what = format!("{} ({})", self.path.display(), self.certificate);
        if left <= 0 {
            Some(format!("{what}: a certificate in it expired {} ago", days(-left)))
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            Some(format!("{what}: a certificate in it expires in {}", days(left)))
        } else {
            None
        }
    }
}

fn days(seconds: i64) -> String {
    match seconds / 86_400 {
        0 => format!("{} hours", seconds / 3_600),
        1 => "1 day".to_string(),
        d => format!("{d} days"),
    }
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

/// A CRL's nextUpdate, if it has one (parsed once, for the expiry check and the metric).
fn crl_next_update(
    path: &Path,
    crl: &CertificateRevocationListDer<'_>,
) -> Result<Option<x509_parser::time::ASN1Time>, TlsError> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
        .map_err(|e| TlsError::BadCrl { path: path.to_path_buf(), message: e.to_string() })?;
    Ok(parsed.next_update())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// What a certificate of the proxy's own is used for.
#[derive(Clone, Copy, Debug)]
enum Purpose {
    /// The listener's certificate, shown to clients.
    Server,
    /// The upstream client certificate, shown to etcd.
    Client,
}

/// Refuse a certificate of the proxy's own that its peers would refuse: outside its validity period, or with an
/// extended key usage that leaves out its purpose (none at all is accepted, as by Go and rustls).
fn check_leaf(path: &Path, chain: &[CertificateDer<'_>], purpose: Purpose) -> Result<(), TlsError> {
    let unusable = |message: String| TlsError::Unusable { path: path.to_path_buf(), message };
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| unusable(format!("the certificate does not parse: {e}")))?;
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        return Err(unusable(format!("the certificate expired at {} (its notAfter)", validity.not_after)));
    }
    // A renewed certificate may be stamped by an issuer whose clock is a little ahead of ours.
    if validity.not_before.timestamp() > now + CLOCK_SKEW.as_secs() as i64 {
        return Err(unusable(format!(
            "the certificate is not valid before {} (its notBefore; is the clock right?)",
            validity.not_before
        )));
    }
    let eku = cert.extended_key_usage().map_err(|e| unusable(format!("its extended key usage: {e}")))?;
    if let Some(eku) = eku {
        let (allowed, name) = match purpose {
            Purpose::Server => (eku.value.server_auth, "serverAuth (TLS server)"),
            Purpose::Client => (eku.value.client_auth, "clientAuth (TLS client)"),
        };
        if !allowed && !eku.value.any {
            return Err(unusable(format!(
                "the certificate's extended key usage does not include {name}, which this use needs"
            )));
        }
    }
    Ok(())
}

/// Why the listener would refuse `der` as a client certificate for what it says of itself, for `policy check
/// --cert` and `policy grants --cert`, which do not verify its chain: what webpki refuses when it reads a leaf
/// (not version 3, an unknown critical extension, duplicate or malformed extensions, …), a CA certificate, an
/// extended key usage without `clientAuth` (webpki takes `anyExtendedKeyUsage` for none of its uses), outside its
/// validity. Not checked: its chain, its revocation, and whether its key is one the crypto provider can verify.
pub fn client_leaf_refusal(der: &[u8]) -> Option<String> {
    let certificate = CertificateDer::from(der);
    if let Err(e) = webpki::EndEntityCert::try_from(&certificate) {
        return Some(format!("webpki cannot read it: {e}"));
    }
    let (_, cert) = match x509_parser::parse_x509_certificate(der) {
        Ok(parsed) => parsed,
        Err(e) => return Some(format!("it does not parse: {e}")),
    };
    match cert.basic_constraints() {
        Ok(Some(b)) if b.value.ca => {
            return Some("it is a CA certificate (basic constraints CA:TRUE), which no client may present".into());
        }
        Err(e) => return Some(format!("its basic constraints do not parse: {e}")),
        _ => {}
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if !eku.value.client_auth => {
            return Some("its extended key usage does not include clientAuth (TLS client)".into());
        }
        Err(e) => return Some(format!("its extended key usage does not parse: {e}")),
        _ => {}
    }
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        return Some(format!("it expired at {} (its notAfter)", validity.not_after));
    }
    if validity.not_before.timestamp() > now {
        return Some(format!("it is not valid before {} (its notBefore)", validity.not_before));
    }
    None
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

/// For tests of the HTTP/2 client against small endpoints of their own.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    /// A TLS acceptor for `localhost` (a fresh CA's certificate) and a client configuration that trusts it, both
    /// offering `h2`.
    pub fn loopback_h2() -> Result<(tokio_rustls::TlsAcceptor, rustls::ClientConfig), Box<dyn std::error::Error>> {
        loopback(false)
    }

    /// The same, with an acceptor that requires a client certificate from the CA (which the client has none of).
    pub fn loopback_h2_with_client_auth()
    -> Result<(tokio_rustls::TlsAcceptor, rustls::ClientConfig), Box<dyn std::error::Error>> {
        loopback(true)
    }

    fn loopback(
        client_auth: bool,
    ) -> Result<(tokio_rustls::TlsAcceptor, rustls::ClientConfig), Box<dyn std::error::Error>> {
        let ca = crate::certs::DevCa::new("test ca")?;
        let leaf = ca.issue(crate::certs::LeafKind::Server, "localhost", None, &["localhost"], &[])?;
        let certs = vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())?];
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
        let builder =
            rustls::ServerConfig::builder_with_provider(super::provider()).with_safe_default_protocol_versions()?;
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?)?;
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), super::provider())
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut server = builder.with_single_cert(certs, key)?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?)?;
        let mut client = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok((tokio_rustls::TlsAcceptor::from(Arc::new(server)), client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{self, DevCa, InitOptions};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// `tls.issuers` refuses only what says it is no CA: a v1-style CA without extensions stays accepted.
    #[test]
    fn only_certificates_that_say_they_are_no_ca_are_refused_as_issuers() -> TestResult {
        let der = |is_ca: rcgen::IsCa| -> Result<CertificateDer<'static>, rcgen::Error> {
            let mut params = rcgen::CertificateParams::new(vec!["x".to_string()])?;
            params.is_ca = is_ca;
            let key = rcgen::KeyPair::generate()?;
            Ok(params.self_signed(&key)?.der().clone())
        };
        assert!(is_ca(&der(rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained))?));
        assert!(is_ca(&der(rcgen::IsCa::NoCa)?), "no basic constraints: left to the verifier");
        assert!(!is_ca(&der(rcgen::IsCa::ExplicitNoCa)?));
        Ok(())
    }

    /// webpki accepts a CA certificate whose key usage lacks keyCertSign on the way to the leaf, and leaves the
    /// identity to the caller: the listener's verifier refuses both in the handshake.
    #[test]
    fn the_listener_refuses_signers_that_may_not_sign_and_certificates_without_an_identity() -> TestResult {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose as Ku};
        let ca = |name: &str, usages: Vec<Ku>| -> Result<(CertificateParams, KeyPair), rcgen::Error> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = usages;
            Ok((params, KeyPair::generate()?))
        };
        let (root_params, root_key) = ca("root", vec![Ku::KeyCertSign, Ku::CrlSign])?;
        let root = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, root_key);
        let leaf = |issuer: &Issuer<'_, KeyPair>, uri: &str| -> Result<CertificateDer<'static>, rcgen::Error> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, "app");
            params.subject_alt_names.push(rcgen::SanType::URI(uri.try_into()?));
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            Ok(params.signed_by(&KeyPair::generate()?, issuer)?.der().clone())
        };
        let mut roots = RootCertStore::empty();
        roots.add(root.der().clone())?;
        let verifier = StrictClientVerifier { webpki: client_verifier(roots, &[], false, &provider())? };
        let now = UnixTime::now();
        let verify = |leaf: &CertificateDer<'_>, sent: &[CertificateDer<'_>]| {
            verifier.verify_client_cert(leaf, sent, now).map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => o.to_string(),
                other => format!("webpki: {other}"),
            })
        };
        let good_id = "spiffe://td/ns/a/sa/app";

        for (usages, signs) in
            [(vec![Ku::KeyCertSign, Ku::DigitalSignature], true), (vec![Ku::DigitalSignature], false)]
        {
            let (params, key) = ca("intermediate", usages)?;
            let cert = params.signed_by(&key, &root_issuer)?.der().clone();
            let issuer = Issuer::new(params, key);
            let result = verify(&leaf(&issuer, good_id)?, std::slice::from_ref(&cert));
            if signs {
                assert!(result.is_ok(), "{result:?}");
            } else {
                let e = result.err().unwrap_or_default();
                assert!(e.contains("\"CN=intermediate\" the client sent may not sign certificates"), "{e}");
            }
            // An unrelated certificate sent along, which issued nothing of the chain, is not looked at.
            let direct = leaf(&root_issuer, good_id)?;
            assert!(verify(&direct, std::slice::from_ref(&cert)).is_ok());
        }

        // A key usage that does not parse (an OCTET STRING where a BIT STRING belongs) is not taken for none.
        let (mut params, key) = ca("intermediate", vec![])?;
        let mut usage = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x04, 0x02, 0x07, 0x80]);
        usage.set_criticality(true);
        params.custom_extensions.push(usage);
        let cert = params.signed_by(&key, &root_issuer)?.der().clone();
        let issuer = Issuer::new(params, key);
        let e = verify(&leaf(&issuer, good_id)?, std::slice::from_ref(&cert)).err().unwrap_or_default();
        assert!(e.contains("the key usage of \"CN=intermediate\""), "{e}");
        // Also when it issued nothing of the chain (sent along), and on the leaf itself: Go refuses both.
        let e = verify(&leaf(&root_issuer, good_id)?, std::slice::from_ref(&cert)).err().unwrap_or_default();
        assert!(e.contains("the key usage of \"CN=intermediate\""), "{e}");
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "app");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let mut usage = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x04, 0x02, 0x07, 0x80]);
        usage.set_criticality(true);
        params.custom_extensions.push(usage);
        let bad_leaf = params.signed_by(&KeyPair::generate()?, &root_issuer)?.der().clone();
        let e = verify(&bad_leaf, &[]).err().unwrap_or_default();
        assert!(e.contains("the key usage of \"CN=app\""), "{e}");

        let bad = verify(&leaf(&root_issuer, "spiffe://td/ns/../sa/app")?, &[]);
        assert_eq!(
            bad.err().as_deref(),
            Some("the client certificate's URI SAN \"spiffe://td/ns/../sa/app\" is not a valid SPIFFE ID")
        );
        Ok(())
    }

    /// `policy … --cert` refuses what the handshake would for the certificate's own sake.
    #[test]
    fn client_leaf_refusals_name_the_reason() -> TestResult {
        let ca = DevCa::new("ca")?;
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| c.to_vec());
        let client = ca.issue(certs::LeafKind::Client, "app", None, &[], &[])?;
        assert_eq!(client_leaf_refusal(&der(&client.cert_pem)?), None);
        let server = ca.issue(certs::LeafKind::Server, "app", None, &[], &[])?;
        let why = client_leaf_refusal(&der(&server.cert_pem)?).unwrap_or_default();
        assert!(why.contains("does not include clientAuth"), "{why}");
        let expired = ca.issue_with(certs::LeafKind::Client, "app", None, &[], &[], |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })?;
        assert!(client_leaf_refusal(&der(&expired.cert_pem)?).unwrap_or_default().starts_with("it expired at "));
        let why = client_leaf_refusal(&der(ca.cert_pem())?).unwrap_or_default();
        assert!(why.starts_with("it is a CA certificate"), "{why}");
        // What webpki cannot read as a leaf: here an unknown critical extension.
        let critical = ca.issue_with(certs::LeafKind::Client, "app", None, &[], &[], |p| {
            let mut unknown = rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
            unknown.set_criticality(true);
            p.custom_extensions.push(unknown);
        })?;
        let why = client_leaf_refusal(&der(&critical.cert_pem)?).unwrap_or_default();
        assert!(why.starts_with("webpki cannot read it: "), "{why}");
        Ok(())
    }

    /// An advertised URL the listener's certificate does not name is warned of, as a client would check it: DNS
    /// and IP SANs (IPv6 in brackets), a wildcard for one label only, case-insensitive.
    #[test]
    fn advertised_urls_the_listener_certificate_is_not_valid_for_are_warned_of() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::new("ca")?;
        let sans = ["etcd-guard.kube-system.svc", "*.example.com", "127.0.0.1", "::1"];
        let leaf = ca.issue(certs::LeafKind::Server, "not-a-san.example.org", None, &sans, &[])?;
        std::fs::write(dir.path().join("server.crt"), &leaf.cert_pem)?;
        std::fs::write(dir.path().join("server.key"), &leaf.key_pem)?;
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())?;
        let tls = config::ListenerTls { crl_files: Vec::new(), ..listener(dir.path(), "", false) };
        let server = server_config(&tls)?;
        let advertise_warnings = |urls: &[String]| server.advertise_warnings(&tls.cert_file, urls);
        let warned = |url: &str| !advertise_warnings(&[url.to_string()]).is_empty();
        for good in [
            "https://etcd-guard.kube-system.svc:2379",
            "https://ETCD-GUARD.kube-system.svc:2379",
            "https://a.example.com:23790",
            "https://127.0.0.1:23790",
            "https://[::1]:23790",
        ] {
            assert!(!warned(good), "{good}");
        }
        for bad in [
            "https://etcd-guard:2379",
            "https://b.a.example.com:2379",
            "https://example.com:2379",
            "https://10.0.0.1:2379",
            "https://[::2]:2379",
            "https://not-a-san.example.org:2379",
        ] {
            assert!(warned(bad), "{bad}");
        }
        let all = advertise_warnings(&["https://10.0.0.1:2379".into(), "https://127.0.0.1:1".into()]);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(all[0].contains("not valid for 10.0.0.1") && all[0].contains("server.crt"), "{all:?}");
        Ok(())
    }

    fn listener(dir: &Path, crl: &str, danger: bool) -> config::ListenerTls {
        config::ListenerTls {
            cert_file: dir.join("server.crt"),
            key_file: dir.join("server.key"),
            client_ca_file: dir.join("ca.crt"),
            issuers: Default::default(),
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

    fn upstream(dir: &Path) -> config::Upstream {
        config::Upstream {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join("upstream-client.crt"),
            key_file: dir.join("upstream-client.key"),
            connect_timeout: std::time::Duration::from_secs(1),
            health_check_interval: std::time::Duration::from_secs(1),
            connections_per_endpoint: 1,
        }
    }

    #[test]
    fn certificates_of_our_own_that_peers_would_refuse_are_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = ca(dir.path())?;
        let no_crl = || config::ListenerTls { crl_files: Vec::new(), ..listener(dir.path(), "", false) };
        assert!(server_config(&no_crl()).is_ok());
        assert!(upstream_channel_check(&upstream(dir.path())).is_ok());
        let write = |name: &str, issued: certs::Issued| -> std::io::Result<()> {
            std::fs::write(dir.path().join(format!("{name}.crt")), issued.cert_pem)?;
            std::fs::write(dir.path().join(format!("{name}.key")), issued.key_pem)
        };
        let refused = |name: &str| -> Option<String> {
            match name {
                "server" => server_config(&no_crl()).err().map(|e| e.to_string()),
                _ => upstream_channel_check(&upstream(dir.path())).err().map(|e| e.to_string()),
            }
        };
        let now = std::time::SystemTime::now();
        let hour = std::time::Duration::from_secs(3600);
        for (name, kind, wrong_kind) in [
            ("server", certs::LeafKind::Server, certs::LeafKind::Client),
            ("upstream-client", certs::LeafKind::Client, certs::LeafKind::Server),
        ] {
            write(
                name,
                ca.issue_with(kind, "x", None, &["localhost"], &[], |p| {
                    p.not_before = (now - 2 * hour).into();
                    p.not_after = (now - hour).into();
                })?,
            )?;
            let err = refused(name).unwrap_or_default();
            assert!(err.contains(&format!("{name}.crt")) && err.contains("expired"), "{name}: {err}");
            write(
                name,
                ca.issue_with(kind, "x", None, &["localhost"], &[], |p| {
                    p.not_before = (now + hour).into();
                    p.not_after = (now + 2 * hour).into();
                })?,
            )?;
            let err = refused(name).unwrap_or_default();
            assert!(err.contains("not valid before"), "{name}: {err}");
            // A minute ahead of our clock (an issuer's clock a little fast): loaded.
            write(
                name,
                ca.issue_with(kind, "x", None, &["localhost"], &[], |p| {
                    p.not_before = (now + std::time::Duration::from_secs(60)).into();
                    p.not_after = (now + 2 * hour).into();
                })?,
            )?;
            assert_eq!(refused(name), None, "{name}: a minute of clock skew");
            write(name, ca.issue(wrong_kind, "x", None, &["localhost"], &[])?)?;
            let err = refused(name).unwrap_or_default();
            assert!(err.contains("extended key usage"), "{name}: {err}");
            write(name, ca.issue(certs::LeafKind::Both, "x", None, &["localhost"], &[])?)?;
            assert_eq!(refused(name), None, "{name}");
        }
        Ok(())
    }

    #[test]
    fn expiries_are_the_earliest_per_file_and_warned_of_a_month_ahead() -> TestResult {
        let dir = tempfile::tempdir()?;
        let ca = ca(dir.path())?;
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let issue = |not_after: u64| {
            ca.issue_with(certs::LeafKind::Server, "x", None, &["localhost"], &[], |p| {
                p.not_before = at(1_000).into();
                p.not_after = at(not_after).into();
            })
        };
        let pem = format!("{}{}", issue(5_000_000)?.cert_pem, issue(4_000_000)?.cert_pem);
        std::fs::write(dir.path().join("two.crt"), pem)?;
        let certs = load_certs(&dir.path().join("two.crt"))?;
        let e = Expiry::of("listener", &dir.path().join("two.crt"), &certs).ok_or("no expiry")?;
        assert_eq!(e.not_after, 4_000_000);
        assert_eq!(e.warning(4_000_000 - 31 * 86_400), None);
        let soon = e.warning(4_000_000 - 29 * 86_400).unwrap_or_default();
        assert!(soon.contains("two.crt (listener)") && soon.contains("expires in 29 days"), "{soon}");
        let gone = e.warning(4_000_000 + 2 * 86_400).unwrap_or_default();
        assert!(gone.contains("expired 2 days ago"), "{gone}");
        // The files of the listener and upstream legs report theirs.
        let listener = config::ListenerTls { crl_files: Vec::new(), ..listener(dir.path(), "", false) };
        let names: Vec<&str> = server_config(&listener)?.expiries.iter().map(|e| e.certificate).collect();
        assert_eq!(names, ["listener", "client_ca"]);
        let names: Vec<&str> = upstream_channel_check(&upstream(dir.path()))?.iter().map(|e| e.certificate).collect();
        assert_eq!(names, ["upstream_ca", "upstream_client"]);
        Ok(())
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
