//! Development certificates: a CA, a server certificate for the proxy, an upstream client certificate, an etcd
//! server certificate and named client certificates. Used by `etcd-guard certs init`, the demo and the tests.
//!
//! These are for development and tests only: the CA key is written next to the certificates.

use std::fs;

use sha2::Digest;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Errors while generating or writing development certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("client spec {0:?}: expected NAME or NAME:ORG, NAME made of letters, digits, '.', '-', '_'")]
    ClientSpec(String),
}

/// A client certificate to issue: its common name and optional organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    pub common_name: String,
    pub organization: Option<String>,
    pub uri_sans: Vec<String>,
}

/// A certificate authority held in memory, able to issue leaf certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate with its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number (big-endian bytes), e.g. to revoke it in a CRL.
    pub serial: Vec<u8>,
}

/// What kind of leaf to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    Server,
    Client,
    /// Both server and client auth (etcd peers).
    Both,
}

// === impl ClientSpec ===

impl std::str::FromStr for ClientSpec {
    type Err = CertsError;

    /// `NAME` or `NAME:ORG`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, org) = match s.split_once(':') {
            Some((n, o)) => (n, Some(o.to_string()).filter(|o| !o.is_empty())),
            None => (s, None),
        };
        // The name becomes a file name: keep it to a safe alphabet.
        let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || name.starts_with('.') || !name.chars().all(safe) {
            return Err(CertsError::ClientSpec(s.to_string()));
        }
        Ok(ClientSpec { common_name: name.to_string(), organization: org, uri_sans: Vec::new() })
    }
}

// === impl DevCa ===

impl DevCa {
    /// A new self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(DevCa { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issue a leaf certificate. `sans` are DNS names or IP addresses; `uri_sans` are URIs (e.g. SPIFFE IDs).
    pub fn issue(
        &self,
        kind: LeafKind,
        common_name: &str,
        organization: Option<&str>,
        sans: &[&str],
        uri_sans: &[&str],
    ) -> Result<Issued, CertsError> {
        self.issue_with(kind, common_name, organization, sans, uri_sans, |_| {})
    }

    /// Like [`DevCa::issue`], with a hook to adjust the parameters (validity, extra fields) before signing.
    pub fn issue_with(
        &self,
        kind: LeafKind,
        common_name: &str,
        organization: Option<&str>,
        sans: &[&str],
        uri_sans: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Result<Issued, CertsError> {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        for uri in uri_sans {
            params.subject_alt_names.push(SanType::URI((*uri).try_into()?));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        if let Some(org) = organization {
            dn.push(DnType::OrganizationName, org);
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match kind {
            LeafKind::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            LeafKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            LeafKind::Both => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        };
        let key = KeyPair::generate()?;
        // A serial derived from the fresh key: unique per leaf, positive, 16 bytes.
        let digest = sha2::Sha256::digest(key.public_key_raw());
        let mut serial = digest[..16].to_vec();
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        adjust(&mut params);
        let serial = params.serial_number.as_ref().map(|s| s.as_ref().to_vec()).unwrap_or(serial);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), serial })
    }

    /// A CRL (PEM) revoking the certificates with these serials, valid from an hour ago for `valid_for`.
    pub fn crl(&self, revoked: &[Vec<u8>], number: u64, valid_for: std::time::Duration) -> Result<String, CertsError> {
        let now = time::OffsetDateTime::now_utc();
        let this_update = now - time::Duration::hours(1);
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update: now + valid_for,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: this_update,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Files written by [`init_dir`].
#[derive(Debug)]
pub struct InitReport {
    pub files: Vec<PathBuf>,
}

/// Write a complete development PKI into `dir`:
/// `ca.crt`/`ca.key`, `server.crt`/`server.key` (the proxy's listener, localhost and 127.0.0.1),
/// `etcd-server.crt`/`etcd-server.key` (for a local etcd), `upstream-client.crt`/`upstream-client.key`
/// (the proxy's identity towards etcd, CN `etcd-guard` — give it root or run etcd without auth),
/// and `<name>.crt`/`<name>.key` for each client.
pub fn init_dir(dir: &Path, clients: &[ClientSpec]) -> Result<InitReport, CertsError> {
    fs::create_dir_all(dir).map_err(|source| CertsError::Write { path: dir.to_path_buf(), source })?;
    let ca = DevCa::new("etcd-guard development CA")?;
    let mut files = Vec::new();
    let mut write = |name: &str, contents: &str| -> Result<(), CertsError> {
        let path = dir.join(name);
        fs::write(&path, contents).map_err(|source| CertsError::Write { path: path.clone(), source })?;
        files.push(path);
        Ok(())
    };
    write("ca.crt", ca.cert_pem())?;
    write("ca.key", &ca.issuer.key().serialize_pem())?;
    let local = ["localhost", "127.0.0.1", "::1"];
    let server = ca.issue(LeafKind::Server, "etcd-guard", None, &local, &[])?;
    write("server.crt", &server.cert_pem)?;
    write("server.key", &server.key_pem)?;
    let etcd = ca.issue(LeafKind::Both, "etcd", None, &local, &[])?;
    write("etcd-server.crt", &etcd.cert_pem)?;
    write("etcd-server.key", &etcd.key_pem)?;
    let upstream = ca.issue(LeafKind::Client, "etcd-guard", None, &[], &[])?;
    write("upstream-client.crt", &upstream.cert_pem)?;
    write("upstream-client.key", &upstream.key_pem)?;
    for client in clients {
        let uris: Vec<&str> = client.uri_sans.iter().map(String::as_str).collect();
        let issued = ca.issue(LeafKind::Client, &client.common_name, client.organization.as_deref(), &[], &uris)?;
        write(&format!("{}.crt", client.common_name), &issued.cert_pem)?;
        write(&format!("{}.key", client.common_name), &issued.key_pem)?;
    }
    Ok(InitReport { files })
}
