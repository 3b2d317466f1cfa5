//! Development certificates: a CA, a server certificate for the proxy, an upstream client certificate, an etcd
//! server certificate and named client certificates. Used by `etcd-guard certs init`, the demo and the tests.
//!
//! These are for development and tests only: the CA key is written next to the certificates. Private keys are
//! written with mode 0600 and certificates with mode 0644 (on unix).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use sha2::Digest;
use x509_parser::prelude::{GeneralName, X509Certificate};

/// The names every server certificate of [`init_dir`] carries, besides `--san`.
pub const LOCAL_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// File stems [`init_dir`] uses itself; a client may not be named like one of them.
const RESERVED_STEMS: [&str; 4] = ["ca", "server", "etcd-server", "upstream-client"];

/// Common names of [`init_dir`]'s own certificates: a client named `etcd-guard` would carry the proxy's upstream
/// identity (root on etcd, which trusts the same CA), one named `etcd` etcd's.
const RESERVED_NAMES: [&str; 2] = ["etcd-guard", "etcd"];

/// How long the development CA is valid, from an hour ago.
pub const CA_VALIDITY: time::Duration = time::Duration::days(10 * 365);

/// How long a leaf certificate of the development CA is valid, from an hour ago (`etcd-guard` warns 30 days ahead,
/// and `certs init --keep-existing` notes a kept pair that expires within 30 days).
pub const LEAF_VALIDITY: time::Duration = time::Duration::days(365);

/// Errors while generating, reading or writing development certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// rcgen could not build or sign a certificate, or could not read a key.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file or folder could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// An existing file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A `--client` argument that is not `NAME` or `NAME:ORG`.
    #[error("client spec {0:?}: expected NAME or NAME:ORG, NAME made of letters, digits, '.', '-', '_'")]
    ClientSpec(String),
    /// A `--client` name used twice, or one that `certs init` uses for its own files.
    #[error("client {0:?}: {1}")]
    ClientName(String, &'static str),
    /// A `--client-uri` argument that is not `NAME=URI`.
    #[error("client URI {0:?}: expected NAME=URI with an ASCII URI such as spiffe://cluster.local/ns/NS/sa/NAME")]
    ClientUriSpec(String),
    /// A `--client-uri` for a name no `--client` issues.
    #[error("client URI {spec:?}: there is no client {name:?} (add --client {name})")]
    ClientUriUnknown {
        /// The whole argument.
        spec: String,
        /// The client name it names.
        name: String,
    },
    /// A `--san` that is neither a DNS name nor an IP address.
    #[error(
        "SAN {0:?}: expected an IP address or a DNS name (dot-separated labels of letters, digits, '-' and '_', \
         not starting or ending with '-'; optionally \"*.\" first)"
    )]
    San(String),
    /// A CA certificate and key that cannot issue certificates.
    #[error("not a usable CA: {0}")]
    NotCa(String),
    /// A file `--keep-existing` would keep but cannot: incomplete pair, unreadable, or not from the CA.
    #[error("{path}: {message}")]
    Existing {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

/// A client certificate to issue: its common name (also the file name), optional organization and URI SANs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// The certificate's CN; the files are `<common_name>.crt` and `<common_name>.key`.
    pub common_name: String,
    /// The certificate's O, if any.
    pub organization: Option<String>,
    /// URI SANs, e.g. SPIFFE IDs.
    pub uri_sans: Vec<String>,
}

/// What [`init_dir`] issues (the arguments of `etcd-guard certs init`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitOptions {
    /// Client certificates to issue.
    pub clients: Vec<ClientSpec>,
    /// Extra DNS names or IP addresses for the proxy's and etcd's server certificates, after [`LOCAL_SANS`].
    pub sans: Vec<String>,
    /// Reuse `ca.crt` and `ca.key` if both exist, and keep every certificate and key already in the folder.
    pub keep_existing: bool,
    /// Replace files already in the folder. Without it (or `keep_existing`) a file in the way is an error: a
    /// folder of real keys (a CA's) is never overwritten by mistake.
    pub force: bool,
}

/// A certificate authority held in memory, able to issue leaf certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate with its private key, both PEM.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate's serial number (big-endian bytes), e.g. to revoke it in a CRL.
    pub serial: Vec<u8>,
}

/// What kind of leaf to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    /// Server auth only.
    Server,
    /// Client auth only.
    Client,
    /// Both server and client auth (etcd peers).
    Both,
}

/// What [`init_dir`] did with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOutcome {
    /// The file was (re)written.
    Wrote(PathBuf),
    /// The file existed and was kept (`--keep-existing`).
    Kept(PathBuf),
}

/// What [`init_dir`] did.
#[derive(Debug, Default)]
pub struct InitReport {
    /// Every file of the PKI, in order, written or kept.
    pub files: Vec<FileOutcome>,
    /// Warnings about kept certificates that lack names asked for (delete them to re-issue).
    pub notes: Vec<String>,
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
        if !is_safe_name(name) {
            return Err(CertsError::ClientSpec(s.to_string()));
        }
        Ok(ClientSpec { common_name: name.to_string(), organization: org, uri_sans: Vec::new() })
    }
}

/// Whether `name` can be a file stem: letters, digits, `-`, `_`, `.`, not empty, not starting with a dot.
fn is_safe_name(name: &str) -> bool {
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    !name.is_empty() && !name.starts_with('.') && name.chars().all(safe)
}

// === impl InitOptions ===

impl InitOptions {
    /// Options from command-line words: `clients` as `NAME[:ORG]`, `client_uris` as `NAME=URI` (each NAME one of
    /// the clients). `sans` are taken as they are; [`init_dir`] checks them and the client names.
    pub fn from_args(
        clients: &[String],
        client_uris: &[String],
        sans: &[String],
        keep_existing: bool,
        force: bool,
    ) -> Result<Self, CertsError> {
        let mut specs = clients.iter().map(|c| c.parse::<ClientSpec>()).collect::<Result<Vec<_>, _>>()?;
        for text in client_uris {
            let (name, uri) = parse_client_uri(text)?;
            let spec = specs
                .iter_mut()
                .find(|s| s.common_name == name)
                .ok_or_else(|| CertsError::ClientUriUnknown { spec: text.clone(), name: name.to_string() })?;
            if !spec.uri_sans.iter().any(|u| u == uri) {
                spec.uri_sans.push(uri.to_string());
            }
        }
        if keep_existing && force {
            return Err(CertsError::Existing {
                path: PathBuf::new(),
                message: "--keep-existing and --force contradict each other: choose one".into(),
            });
        }
        Ok(InitOptions { clients: specs, sans: sans.to_vec(), keep_existing, force })
    }
}

/// `NAME=URI`: the client name and a URI with a scheme (`spiffe://…`), printable ASCII without spaces.
fn parse_client_uri(text: &str) -> Result<(&str, &str), CertsError> {
    let bad = || CertsError::ClientUriSpec(text.to_string());
    let (name, uri) = text.split_once('=').ok_or_else(bad)?;
    let (scheme, rest) = uri.split_once(':').ok_or_else(bad)?;
    let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !is_safe_name(name) || !scheme_ok || rest.is_empty() || !uri.chars().all(|c| c.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok((name, uri))
}

/// A SAN for a server certificate: an IP address (written canonically) or a DNS name.
fn parse_san(text: &str) -> Result<String, CertsError> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let name = text.strip_prefix("*.").unwrap_or(text);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    };
    if text.len() > 253 || !name.split('.').all(label_ok) {
        return Err(CertsError::San(text.to_string()));
    }
    Ok(text.to_ascii_lowercase())
}

// === impl DevCa ===

impl DevCa {
    /// A new self-signed CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        // Signs leaves only: no intermediate CA can be made under it.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(DevCa { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// An existing CA from its certificate and its private key (PEM, the key PKCS#8), such as the `ca.crt` and
    /// `ca.key` an earlier `certs init` wrote. The certificate must be a CA and the key must be its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertsError::NotCa(format!("the key: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| CertsError::NotCa(format!("the certificate is not PEM: {e}")))?;
        let cert = pem.parse_x509().map_err(|e| CertsError::NotCa(format!("the certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(CertsError::NotCa("the certificate is not a CA (basicConstraints cA is not set)".into()));
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CertsError::NotCa("the key does not match the certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&pem.contents.as_slice().into(), key)?;
        Ok(DevCa { issuer, cert_pem: cert_pem.to_string() })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
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
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
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
        self.crl_between(revoked, number, now - time::Duration::hours(1), now + valid_for)
    }

    /// A CRL (PEM) with explicit thisUpdate and nextUpdate (e.g. an expired one, for tests).
    pub fn crl_between(
        &self,
        revoked: &[Vec<u8>],
        number: u64,
        this_update: time::OffsetDateTime,
        next_update: time::OffsetDateTime,
    ) -> Result<String, CertsError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update,
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

    /// Checks that a certificate and key (PEM) are a leaf of this CA: the certificate is signed by this CA's key
    /// and the key is the certificate's. The error says what is wrong.
    fn check_leaf(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        let (_, cert_pem) =
            x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
        let cert = cert_pem.parse_x509().map_err(|e| format!("not a certificate: {e}"))?;
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes())
            .map_err(|e| format!("the CA certificate is not PEM: {e}"))?;
        let ca = ca_pem.parse_x509().map_err(|e| format!("the CA certificate: {e}"))?;
        cert.verify_signature(Some(ca.public_key())).map_err(|_| "it was not issued by ca.crt".to_string())?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("its key file: {e}"))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err("its key file holds a different key".into());
        }
        Ok(())
    }
}

// === impl FileOutcome ===

impl std::fmt::Display for FileOutcome {
    /// `wrote <path>` or `kept <path>`, as `certs init` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileOutcome::Wrote(path) => write!(f, "wrote {}", path.display()),
            FileOutcome::Kept(path) => write!(f, "kept {}", path.display()),
        }
    }
}

// === init_dir ===

/// One certificate of the PKI with its key: `<stem>.crt` and `<stem>.key`.
struct Leaf<'a> {
    stem: &'a str,
    kind: LeafKind,
    common_name: &'a str,
    organization: Option<&'a str>,
    sans: Vec<&'a str>,
    uri_sans: Vec<&'a str>,
}

/// Whether a file holds a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrecy {
    /// A certificate: mode 0644.
    Public,
    /// A private key: mode 0600.
    Secret,
}

/// Write a complete development PKI into `dir`:
/// `ca.crt`/`ca.key`, `server.crt`/`server.key` (the proxy's listener: localhost, 127.0.0.1, ::1 and
/// `options.sans`), `etcd-server.crt`/`etcd-server.key` (for a local etcd, server and client auth, the same names),
/// `upstream-client.crt`/`upstream-client.key` (the proxy's identity towards etcd, CN `etcd-guard` — give it root
/// or run etcd without auth), and `<name>.crt`/`<name>.key` for each client (with its URI SANs).
///
/// Keys get mode 0600, certificates 0644 (unix). With `options.keep_existing`, an existing `ca.crt` + `ca.key` is
/// reused and every existing certificate/key pair is kept if it was issued by that CA (a pair with one file missing,
/// or from another CA, is an error: nothing is overwritten); only missing pairs are issued.
pub fn init_dir(dir: &Path, options: &InitOptions) -> Result<InitReport, CertsError> {
    for (i, client) in options.clients.iter().enumerate() {
        let name = client.common_name.as_str();
        if !is_safe_name(name) {
            return Err(CertsError::ClientSpec(name.to_string()));
        }
        if RESERVED_STEMS.contains(&name) {
            return Err(CertsError::ClientName(name.to_string(), "certs init writes a file of that name itself"));
        }
        if RESERVED_NAMES.contains(&name) {
            return Err(CertsError::ClientName(
                name.to_string(),
                "the common name of certs init's own certificates (the proxy's root identity towards etcd, or etcd's)",
            ));
        }
        if options.clients[..i].iter().any(|c| c.common_name == name) {
            return Err(CertsError::ClientName(name.to_string(), "named twice"));
        }
    }
    let extra_sans = options.sans.iter().map(|s| parse_san(s)).collect::<Result<Vec<_>, _>>()?;
    let mut server_sans: Vec<&str> = LOCAL_SANS.to_vec();
    for san in &extra_sans {
        if !server_sans.contains(&san.as_str()) {
            server_sans.push(san);
        }
    }

    if let Some(path) = in_the_way(dir, options)? {
        return Err(CertsError::Existing {
            path,
            message: "exists; --keep-existing keeps what is there and issues only what is missing, --force replaces it"
                .into(),
        });
    }
    create_private_dir(dir)?;
    let mut report = InitReport::default();
    let ca = init_ca(dir, options.keep_existing, &mut report)?;
    let mut leaves = vec![
        Leaf {
            stem: "server",
            kind: LeafKind::Server,
            common_name: "etcd-guard",
            organization: None,
            sans: server_sans.clone(),
            uri_sans: Vec::new(),
        },
        Leaf {
            stem: "etcd-server",
            kind: LeafKind::Both,
            common_name: "etcd",
            organization: None,
            sans: server_sans,
            uri_sans: Vec::new(),
        },
        Leaf {
            stem: "upstream-client",
            kind: LeafKind::Client,
            common_name: "etcd-guard",
            organization: None,
            sans: Vec::new(),
            uri_sans: Vec::new(),
        },
    ];
    for client in &options.clients {
        leaves.push(Leaf {
            stem: &client.common_name,
            kind: LeafKind::Client,
            common_name: &client.common_name,
            organization: client.organization.as_deref(),
            sans: Vec::new(),
            uri_sans: client.uri_sans.iter().map(String::as_str).collect(),
        });
    }
    for leaf in &leaves {
        init_leaf(dir, &ca, leaf, options.keep_existing, &mut report)?;
    }
    Ok(report)
}

/// Create `dir` (and its parents) if missing; a folder it creates is its owner's alone (0700: it holds private
/// keys), whatever the umask. An existing folder is left as it is.
fn create_private_dir(dir: &Path) -> Result<(), CertsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| CertsError::Write { path: dir.to_path_buf(), source })
}

/// Without `--keep-existing` or `--force`: the first of the files `certs init` would write that is already there.
fn in_the_way(dir: &Path, options: &InitOptions) -> Result<Option<PathBuf>, CertsError> {
    if options.keep_existing || options.force {
        return Ok(None);
    }
    let fixed = ["ca", "server", "etcd-server", "upstream-client"];
    let stems = fixed.iter().copied().chain(options.clients.iter().map(|c| c.common_name.as_str()));
    for stem in stems {
        for ext in ["crt", "key"] {
            let path = dir.join(format!("{stem}.{ext}"));
            if exists(&path)? {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

/// Reuse the CA in `dir` (with `keep`, if both files exist) or write a new one.
fn init_ca(dir: &Path, keep: bool, report: &mut InitReport) -> Result<DevCa, CertsError> {
    let crt = dir.join("ca.crt");
    let key = dir.join("ca.key");
    if keep {
        match (exists(&crt)?, exists(&key)?) {
            (true, true) => {
                let ca = DevCa::from_pem(&read(&crt)?, &read(&key)?).map_err(|e| CertsError::Existing {
                    path: crt.clone(),
                    message: format!("cannot reuse it with ca.key: {e}"),
                })?;
                report.files.push(FileOutcome::Kept(crt));
                report.files.push(FileOutcome::Kept(key));
                return Ok(ca);
            }
            (true, false) => return Err(incomplete(&crt, &key)),
            (false, true) => return Err(incomplete(&key, &crt)),
            (false, false) => {}
        }
    }
    let ca = DevCa::new("etcd-guard development CA")?;
    write_file(&crt, ca.cert_pem(), Secrecy::Public)?;
    report.files.push(FileOutcome::Wrote(crt));
    write_file(&key, &ca.key_pem(), Secrecy::Secret)?;
    report.files.push(FileOutcome::Wrote(key));
    Ok(ca)
}

/// Keep (with `keep`, if it exists and is the CA's) or issue and write one certificate and key.
fn init_leaf(dir: &Path, ca: &DevCa, leaf: &Leaf<'_>, keep: bool, report: &mut InitReport) -> Result<(), CertsError> {
    let crt = dir.join(format!("{}.crt", leaf.stem));
    let key = dir.join(format!("{}.key", leaf.stem));
    if keep {
        match (exists(&crt)?, exists(&key)?) {
            (true, true) => {
                ca.check_leaf(&read(&crt)?, &read(&key)?).map_err(|problem| CertsError::Existing {
                    path: crt.clone(),
                    message: format!("cannot keep it: {problem}; delete it and {} to re-issue both", key.display()),
                })?;
                let missing = missing_names(&read(&crt)?, &leaf.sans, &leaf.uri_sans);
                if !missing.is_empty() {
                    report.notes.push(format!(
                        "kept {} lacks {}: delete it and {} to re-issue both",
                        crt.display(),
                        missing.join(", "),
                        key.display()
                    ));
                }
                if let Some(warning) = expiry_warning(&crt, &read(&crt)?) {
                    report.notes.push(format!("{warning}: delete it and {} to re-issue both", key.display()));
                }
                report.files.push(FileOutcome::Kept(crt));
                report.files.push(FileOutcome::Kept(key));
                return Ok(());
            }
            (true, false) => return Err(incomplete(&crt, &key)),
            (false, true) => return Err(incomplete(&key, &crt)),
            (false, false) => {}
        }
    }
    let issued = ca.issue(leaf.kind, leaf.common_name, leaf.organization, &leaf.sans, &leaf.uri_sans)?;
    write_file(&crt, &issued.cert_pem, Secrecy::Public)?;
    report.files.push(FileOutcome::Wrote(crt));
    write_file(&key, &issued.key_pem, Secrecy::Secret)?;
    report.files.push(FileOutcome::Wrote(key));
    Ok(())
}

/// The error for half a pair under `--keep-existing`.
fn incomplete(present: &Path, missing: &Path) -> CertsError {
    CertsError::Existing {
        path: present.to_path_buf(),
        message: format!(
            "exists without {}; --keep-existing keeps only complete pairs: restore that file or delete this one",
            missing.display()
        ),
    }
}

/// The requested SANs (`sans`: DNS names or IP addresses, `uri_sans`: URIs) that the certificate lacks, as
/// written. A certificate that cannot be read lacks them all.
/// Whether a kept certificate expires within 30 days (or has expired).
fn expiry_warning(path: &Path, cert_pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let expiry = crate::tls::Expiry::of("kept", path, std::slice::from_ref(&der))?;
    expiry.warning_now()
}

fn missing_names(cert_pem: &str, sans: &[&str], uri_sans: &[&str]) -> Vec<String> {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    let mut uris = Vec::new();
    if let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        && let Ok(cert) = pem.parse_x509()
    {
        collect_sans(&cert, &mut dns, &mut ips, &mut uris);
    }
    let mut missing = Vec::new();
    for san in sans {
        let present = match san.parse::<IpAddr>() {
            Ok(ip) => ips.contains(&ip),
            Err(_) => dns.iter().any(|d: &String| d.eq_ignore_ascii_case(san)),
        };
        if !present {
            missing.push((*san).to_string());
        }
    }
    for uri in uri_sans {
        if !uris.iter().any(|u: &String| u == uri) {
            missing.push((*uri).to_string());
        }
    }
    missing
}

/// The DNS, IP and URI SANs of a certificate.
fn collect_sans(cert: &X509Certificate<'_>, dns: &mut Vec<String>, ips: &mut Vec<IpAddr>, uris: &mut Vec<String>) {
    let Ok(Some(san)) = cert.subject_alternative_name() else { return };
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(d) => dns.push((*d).to_string()),
            GeneralName::URI(u) => uris.push((*u).to_string()),
            GeneralName::IPAddress(bytes) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                    ips.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                    ips.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
}

/// Whether `path` exists (a broken symlink does not).
fn exists(path: &Path) -> Result<bool, CertsError> {
    path.try_exists().map_err(|source| CertsError::Read { path: path.to_path_buf(), source })
}

/// A file's text.
fn read(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Read { path: path.to_path_buf(), source })
}

/// Create or replace `path` with `contents`. On unix the mode is 0600 for secrets and 0644 otherwise, set before
/// anything is written, also when the file existed with another mode.
fn write_file(path: &Path, contents: &str, secrecy: Secrecy) -> Result<(), CertsError> {
    let err = |source| CertsError::Write { path: path.to_path_buf(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    let mode = match secrecy {
        Secrecy::Public => 0o644,
        Secrecy::Secret => 0o600,
    };
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = secrecy;
    let mut file = options.open(path).map_err(err)?;
    // The mode given at creation is reduced by the umask and does not apply to an existing file: set it exactly.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// DNS, IP and URI SANs.
    type Sans = (Vec<String>, Vec<IpAddr>, Vec<String>);

    /// The DNS, IP and URI SANs of the certificate in `path`.
    fn sans_of(path: &Path) -> Result<Sans, Box<dyn std::error::Error>> {
        let text = fs::read_to_string(path)?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())?;
        let cert = pem.parse_x509()?;
        let (mut dns, mut ips, mut uris) = (Vec::new(), Vec::new(), Vec::new());
        collect_sans(&cert, &mut dns, &mut ips, &mut uris);
        Ok((dns, ips, uris))
    }

    /// Every file in `dir` with its contents.
    fn snapshot(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, Box<dyn std::error::Error>> {
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            files.insert(entry.file_name().to_string_lossy().into_owned(), fs::read(entry.path())?);
        }
        Ok(files)
    }

    fn options(clients: &[&str], uris: &[&str], sans: &[&str], keep: bool) -> Result<InitOptions, CertsError> {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        InitOptions::from_args(&owned(clients), &owned(uris), &owned(sans), keep, false)
    }

    #[test]
    fn server_certificates_carry_the_local_names_and_every_san() -> TestResult {
        let dir = tempfile::tempdir()?;
        init_dir(dir.path(), &options(&[], &[], &["etcd-guard", "etcd", "10.1.2.3", "fd00::1"], false)?)?;
        for file in ["server.crt", "etcd-server.crt"] {
            let (dns, ips, uris) = sans_of(&dir.path().join(file))?;
            for name in ["localhost", "etcd-guard", "etcd"] {
                assert!(dns.iter().any(|d| d == name), "{file}: DNS SAN {name} in {dns:?}");
            }
            for ip in ["127.0.0.1", "::1", "10.1.2.3", "fd00::1"] {
                assert!(ips.contains(&ip.parse()?), "{file}: IP SAN {ip} in {ips:?}");
            }
            assert!(uris.is_empty(), "{file}: {uris:?}");
        }
        let (dns, ips, _) = sans_of(&dir.path().join("upstream-client.crt"))?;
        assert!(dns.is_empty() && ips.is_empty(), "the upstream client certificate has no names: {dns:?} {ips:?}");
        Ok(())
    }

    #[test]
    fn bad_sans_and_client_names_are_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        for san in ["", "two words", "a..b", "ünïcode.example", "-"] {
            let err = init_dir(dir.path(), &options(&[], &[], &[san], false)?);
            assert!(matches!(err, Err(CertsError::San(_))), "{san:?}: {err:?}");
        }
        for clients in [&["server"][..], &["ca"], &["a", "a:org"], &["etcd-guard"], &["etcd"]] {
            let err = init_dir(dir.path(), &options(clients, &[], &[], false)?);
            assert!(matches!(err, Err(CertsError::ClientName(..))), "{clients:?}: {err:?}");
        }
        assert_eq!(fs::read_dir(dir.path())?.count(), 0, "nothing is written when the arguments are wrong");
        Ok(())
    }

    #[test]
    fn the_ca_signs_leaves_only_and_everything_expires() -> TestResult {
        let dir = tempfile::tempdir()?;
        init_dir(dir.path(), &options(&["admin"], &[], &[], false)?)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let read = |name: &str| -> Result<(Option<u32>, i64), Box<dyn std::error::Error>> {
            let text = fs::read_to_string(dir.path().join(name))?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())?;
            let cert = pem.parse_x509()?;
            let path_len = cert.basic_constraints()?.and_then(|b| b.value.path_len_constraint);
            Ok((path_len, cert.validity().not_after.timestamp() - now))
        };
        let (path_len, ca_left) = read("ca.crt")?;
        assert_eq!(path_len, Some(0));
        assert!((CA_VALIDITY.whole_seconds() - 60..=CA_VALIDITY.whole_seconds()).contains(&ca_left), "{ca_left}");
        for leaf in ["server.crt", "upstream-client.crt", "admin.crt"] {
            let (_, left) = read(leaf)?;
            assert!(
                (LEAF_VALIDITY.whole_seconds() - 60..=LEAF_VALIDITY.whole_seconds()).contains(&left),
                "{leaf}: {left}"
            );
        }
        // A kept pair that expires soon is noted.
        let ca = DevCa::from_pem(
            &fs::read_to_string(dir.path().join("ca.crt"))?,
            &fs::read_to_string(dir.path().join("ca.key"))?,
        )?;
        let soon = ca.issue_with(LeafKind::Client, "admin", None, &[], &[], |p| {
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        })?;
        fs::write(dir.path().join("admin.crt"), soon.cert_pem)?;
        fs::write(dir.path().join("admin.key"), soon.key_pem)?;
        let report = init_dir(dir.path(), &options(&["admin"], &[], &[], true)?)?;
        assert!(report.notes.iter().any(|n| n.contains("admin.crt") && n.contains("expires in")), "{:?}", report.notes);
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn a_folder_it_creates_is_its_owners_alone() -> TestResult {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let made = dir.path().join("new/certs");
        init_dir(&made, &options(&[], &[], &[], false)?)?;
        assert_eq!(fs::metadata(&made)?.permissions().mode() & 0o777, 0o700);
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_mode_0600_and_certificates_0644() -> TestResult {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        // A key left from before with a loose mode is tightened when it is replaced (`--force`).
        fs::write(dir.path().join("server.key"), "old")?;
        fs::set_permissions(dir.path().join("server.key"), fs::Permissions::from_mode(0o666))?;
        let force = InitOptions { force: true, ..options(&["admin", "prometheus:monitoring"], &[], &[], false)? };
        let report = init_dir(dir.path(), &force)?;
        assert_eq!(report.files.len(), 12, "CA, server, etcd, upstream and two clients");
        for entry in fs::read_dir(dir.path())? {
            let path = entry?.path();
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            let want = if path.extension().is_some_and(|e| e == "key") { 0o600 } else { 0o644 };
            assert_eq!(mode, want, "{}: mode {mode:o}", path.display());
        }
        Ok(())
    }

    #[test]
    fn keep_existing_reuses_the_ca_and_keeps_every_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        init_dir(dir.path(), &options(&["admin"], &[], &["etcd"], true)?)?;
        let before = snapshot(dir.path())?;

        let report = init_dir(dir.path(), &options(&["admin", "cilium-agent"], &[], &["etcd"], true)?)?;
        let after = snapshot(dir.path())?;
        for (name, contents) in &before {
            assert_eq!(after.get(name), Some(contents), "{name} is unchanged");
            assert!(report.files.contains(&FileOutcome::Kept(dir.path().join(name))), "{name} reported as kept");
        }
        for name in ["cilium-agent.crt", "cilium-agent.key"] {
            assert!(report.files.contains(&FileOutcome::Wrote(dir.path().join(name))), "{name} written");
        }
        assert!(report.notes.is_empty(), "{:?}", report.notes);

        // The new client certificate comes from the kept CA.
        let ca = DevCa::from_pem(&read(&dir.path().join("ca.crt"))?, &read(&dir.path().join("ca.key"))?)?;
        ca.check_leaf(&read(&dir.path().join("cilium-agent.crt"))?, &read(&dir.path().join("cilium-agent.key"))?)?;

        // A kept server certificate without a newly asked name is kept, with a note.
        let report = init_dir(dir.path(), &options(&["admin"], &[], &["etcd", "etcd-guard"], true)?)?;
        assert_eq!(report.notes.len(), 2, "server.crt and etcd-server.crt: {:?}", report.notes);
        assert!(report.notes.iter().all(|n| n.contains("etcd-guard")), "{:?}", report.notes);

        // Without --keep-existing nothing is overwritten unless --force says so; then everything is issued anew.
        let there = snapshot(dir.path())?;
        let refused = init_dir(dir.path(), &options(&["admin"], &[], &[], false)?);
        assert!(matches!(refused, Err(CertsError::Existing { .. })), "{:?}", refused.err());
        assert_eq!(snapshot(dir.path())?, there, "nothing touched");
        let force = InitOptions { force: true, ..options(&["admin"], &[], &[], false)? };
        init_dir(dir.path(), &force)?;
        let fresh = snapshot(dir.path())?;
        assert_ne!(fresh.get("ca.crt"), before.get("ca.crt"), "a new CA");
        assert_ne!(fresh.get("admin.key"), before.get("admin.key"), "a new key");
        Ok(())
    }

    #[test]
    fn keep_existing_refuses_half_pairs_and_foreign_certificates() -> TestResult {
        let dir = tempfile::tempdir()?;
        let keep = options(&["admin"], &[], &[], true)?;
        init_dir(dir.path(), &keep)?;

        fs::remove_file(dir.path().join("admin.key"))?;
        let before = snapshot(dir.path())?;
        let err = init_dir(dir.path(), &keep);
        assert!(
            matches!(&err, Err(CertsError::Existing { path, .. }) if path.ends_with("admin.crt")),
            "half a pair: {err:?}"
        );
        assert_eq!(snapshot(dir.path())?, before, "nothing overwritten");

        // A certificate from another CA.
        let other = DevCa::new("other")?.issue(LeafKind::Client, "admin", None, &[], &[])?;
        fs::write(dir.path().join("admin.crt"), &other.cert_pem)?;
        fs::write(dir.path().join("admin.key"), &other.key_pem)?;
        let err = init_dir(dir.path(), &keep);
        assert!(
            matches!(&err, Err(CertsError::Existing { message, .. }) if message.contains("not issued by ca.crt")),
            "foreign certificate: {err:?}"
        );

        // A CA certificate without its key.
        fs::remove_file(dir.path().join("ca.key"))?;
        let err = init_dir(dir.path(), &keep);
        assert!(matches!(&err, Err(CertsError::Existing { path, .. }) if path.ends_with("ca.crt")), "{err:?}");
        Ok(())
    }

    #[test]
    fn client_uri_gives_a_named_client_a_uri_san() -> TestResult {
        let dir = tempfile::tempdir()?;
        let spiffe = "spiffe://cluster.local/ns/kube-system/sa/cilium";
        let opts = options(&["cilium-agent", "admin"], &[&format!("cilium-agent={spiffe}")], &[], false)?;
        assert_eq!(opts.clients[0].uri_sans, [spiffe]);
        init_dir(dir.path(), &opts)?;
        let (dns, _, uris) = sans_of(&dir.path().join("cilium-agent.crt"))?;
        assert_eq!(uris, [spiffe]);
        assert!(dns.is_empty());
        let (_, _, uris) = sans_of(&dir.path().join("admin.crt"))?;
        assert!(uris.is_empty(), "only the named client: {uris:?}");

        for bad in ["cilium-agent", "cilium-agent=", "cilium-agent=no-scheme", "cilium-agent=spiffe://a b", "=x:y"] {
            let err = options(&["cilium-agent"], &[bad], &[], false);
            assert!(matches!(err, Err(CertsError::ClientUriSpec(_))), "{bad:?}: {err:?}");
        }
        let err = options(&["admin"], &[&format!("cilium-agent={spiffe}")], &[], false);
        assert!(matches!(err, Err(CertsError::ClientUriUnknown { .. })), "{err:?}");
        Ok(())
    }

    #[test]
    fn a_ca_loads_back_from_pem_only_with_its_key() -> TestResult {
        let ca = DevCa::new("test CA")?;
        let loaded = DevCa::from_pem(ca.cert_pem(), &ca.key_pem())?;
        let leaf = loaded.issue(LeafKind::Server, "x", None, &["localhost"], &[])?;
        ca.check_leaf(&leaf.cert_pem, &leaf.key_pem)?;

        let other = DevCa::new("other")?;
        let err = DevCa::from_pem(ca.cert_pem(), &other.key_pem());
        assert!(matches!(err, Err(CertsError::NotCa(_))), "someone else's key: {:?}", err.err());
        let err = DevCa::from_pem(&leaf.cert_pem, &leaf.key_pem);
        assert!(matches!(err, Err(CertsError::NotCa(_))), "a leaf: {:?}", err.err());
        Ok(())
    }
}
