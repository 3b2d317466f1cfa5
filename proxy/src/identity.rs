//! Client identity: what a verified client certificate says about who is calling.
//!
//! The TLS layer has already verified the chain; this module only reads the leaf.

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Who a client is, read from its verified TLS certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub common_name: Option<String>,
    pub organizations: Vec<String>,
    pub organizational_units: Vec<String>,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    /// Certificate serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex without separators.
    pub fingerprint_sha256: String,
    /// The names (`tls.issuers`) of the CAs the certificate chains to; set by the listener after the handshake.
    pub issuers: Vec<String>,
}

/// Why a certificate could not be turned into an identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the client presented no certificate")]
    NoCertificate,
    #[error("the client certificate does not parse: {0}")]
    Parse(String),
    #[error("the client certificate has {0} common names; exactly one or none is accepted")]
    AmbiguousCommonName(usize),
    #[error(
        "the client certificate has a CN, O or OU that is not text (UTF8String, PrintableString, NumericString, \
         IA5String or BMPString)"
    )]
    NotText,
    #[error("the client certificate's URI SAN {0:?} is not a valid SPIFFE ID")]
    BadSpiffeId(String),
    #[error("the client certificate has {0} spiffe:// URI SANs; an X.509-SVID has exactly one")]
    SeveralSpiffeIds(usize),
}

// === impl Identity ===

impl Identity {
    /// Read the identity from a DER leaf certificate that the TLS layer has verified.
    pub fn from_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        let subject = cert.subject();
        let text = |attr: &x509_parser::x509::AttributeTypeAndValue<'_>| {
            if !in_alphabet(attr) {
                return Err(IdentityError::NotText);
            }
            match attr.as_str() {
                Ok(s) => Ok(s.to_string()),
                Err(_) => bmp_string(attr).ok_or(IdentityError::NotText),
            }
        };
        let cns = subject.iter_common_name().map(text).collect::<Result<Vec<_>, _>>()?;
        if cns.len() > 1 {
            return Err(IdentityError::AmbiguousCommonName(cns.len()));
        }
        let organizations = subject.iter_organization().map(text).collect::<Result<Vec<_>, _>>()?;
        let organizational_units = subject.iter_organizational_unit().map(text).collect::<Result<Vec<_>, _>>()?;
        let mut dns_sans = Vec::new();
        let mut uri_sans = Vec::new();
        let san = cert.subject_alternative_name().map_err(|e| IdentityError::Parse(e.to_string()))?;
        if let Some(san) = san {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_sans.push((*d).to_string()),
                    GeneralName::URI(u) => uri_sans.push((*u).to_string()),
                    _ => {}
                }
            }
        }
        // Bindings match URI SANs as strings: a SPIFFE ID that is not in the spec's one spelling (`..`, `%2F`, a
        // query, upper case in the trust domain, …) could match a pattern it does not name. Refused, not dropped:
        // the handshake failure says why.
        let spiffe: Vec<&String> = uri_sans.iter().filter(|u| has_spiffe_scheme(u)).collect();
        if spiffe.len() > 1 {
            return Err(IdentityError::SeveralSpiffeIds(spiffe.len()));
        }
        if let Some(bad) = spiffe.into_iter().find(|u| !is_spiffe_id(u)) {
            return Err(IdentityError::BadSpiffeId(bad.clone()));
        }
        Ok(Identity {
            common_name: cns.into_iter().next(),
            organizations,
            organizational_units,
            dns_sans,
            uri_sans,
            serial: hex::encode(cert.raw_serial()),
            fingerprint_sha256: hex::encode(Sha256::digest(der)),
            issuers: Vec::new(),
        })
    }

    /// A short human name for logs: the CN, else the first URI SAN, else the first DNS SAN, else the fingerprint.
    pub fn display_name(&self) -> &str {
        self.common_name
            .as_deref()
            .or_else(|| self.uri_sans.first().map(String::as_str))
            .or_else(|| self.dns_sans.first().map(String::as_str))
            .unwrap_or(&self.fingerprint_sha256)
    }
}

/// Whether a string attribute holds only what its ASN.1 type allows, as Go's x509 (etcd's) reads them: digits and
/// spaces in a NumericString; letters, digits, space and `'()+,-./:=?` in a PrintableString (and `*` and `&`, which
/// Go accepts there too); 7-bit characters in an IA5String. x509-parser takes any UTF-8 for all three.
fn in_alphabet(attr: &x509_parser::x509::AttributeTypeAndValue<'_>) -> bool {
    use x509_parser::der_parser::asn1_rs::Tag;
    let value = attr.attr_value();
    let data = value.data;
    match value.tag() {
        Tag::NumericString => data.iter().all(|b| b.is_ascii_digit() || *b == b' '),
        Tag::PrintableString => data.iter().all(|b| b.is_ascii_alphanumeric() || b" '()+,-./:=?*&".contains(b)),
        Tag::Ia5String => data.is_ascii(),
        _ => true,
    }
}

/// A BMPString attribute (UTF-16 big-endian, as older CAs write names) as text; `None`
/// for another type, an odd length or a lone surrogate.
fn bmp_string(attr: &x509_parser::x509::AttributeTypeAndValue<'_>) -> Option<String> {
    let value = attr.attr_value();
    if value.tag() != x509_parser::der_parser::asn1_rs::Tag::BmpString || value.data.len() % 2 != 0 {
        return None;
    }
    let units = value.data.chunks_exact(2).map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
    char::decode_utf16(units).collect::<Result<String, _>>().ok()
}

fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..9).is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
}

/// A SPIFFE ID as the SPIFFE ID specification (section 2) allows it: `spiffe://` in lower case, a trust domain of
/// lower-case letters, digits, `.`, `-` and `_`, then a path of segments of letters, digits, `.`, `-` and `_`,
/// none empty, `.` or `..`, and no trailing `/`; no port, user info, query, fragment or percent-encoding.
pub fn is_spiffe_id(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("spiffe://") else {
        return false;
    };
    let (domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    domain_ok && (path.is_empty() || path[1..].split('/').all(segment_ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{DevCa, LeafKind};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).map(|c| c.to_vec()).unwrap_or_default()
    }

    #[test]
    fn reads_subject_and_sans() -> Result<(), Box<dyn std::error::Error>> {
        let ca = DevCa::new("test ca")?;
        let spiffe = "spiffe://cluster.local/ns/kube-system/sa/cilium";
        let issued = ca.issue(LeafKind::Client, "cilium", Some("kube-system"), &["cilium.local"], &[spiffe])?;
        let d = der(&issued.cert_pem);
        let id = Identity::from_der(&d)?;
        assert_eq!(id.common_name.as_deref(), Some("cilium"));
        assert_eq!(id.organizations, vec!["kube-system".to_string()]);
        assert_eq!(id.dns_sans, vec!["cilium.local".to_string()]);
        assert_eq!(id.uri_sans, vec![spiffe.to_string()]);
        assert_eq!(id.fingerprint_sha256, hex::encode(Sha256::digest(&d)));
        assert_eq!(id.fingerprint_sha256.len(), 64);
        assert!(!id.serial.is_empty());
        Ok(())
    }

    /// Names written as BMPString (UTF-16, as older CAs write them) are read as text.
    #[test]
    fn bmp_string_names_are_text() -> Result<(), Box<dyn std::error::Error>> {
        use rcgen::string::BmpString;
        use rcgen::{DnType, DnValue};
        let ca = DevCa::new("test ca")?;
        let team = BmpString::try_from("t\u{e9}am")?;
        let issued = ca.issue_with(LeafKind::Client, "app-a", None, &[], &[], |p| {
            p.distinguished_name.push(DnType::OrganizationName, DnValue::BmpString(team));
        })?;
        let id = Identity::from_der(&der(&issued.cert_pem))?;
        assert_eq!(id.common_name.as_deref(), Some("app-a"));
        assert_eq!(id.organizations, vec!["t\u{e9}am".to_string()]);
        Ok(())
    }

    /// A name whose bytes are outside its string type's alphabet is not text (Go's x509, etcd's, refuses it):
    /// letters in a NumericString, `_` in a PrintableString, 8-bit characters in an IA5String. (The signature is
    /// not looked at here, so the type byte can be changed in place.)
    #[test]
    fn names_outside_their_string_types_alphabet_are_not_text() -> Result<(), Box<dyn std::error::Error>> {
        let ca = DevCa::new("test ca")?;
        let with_cn = |cn: &str, tag: u8| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let mut d = der(&ca.issue(LeafKind::Client, cn, None, &[], &[])?.cert_pem);
            let utf8 = [&[0x0c, cn.len() as u8][..], cn.as_bytes()].concat();
            // The leaf's CN (the issuer's comes first in the DER, and is not `cn`).
            let at = d.windows(utf8.len()).rposition(|w| w == utf8.as_slice()).ok_or("CN not found")?;
            d[at] = tag;
            Ok(d)
        };
        const NUMERIC: u8 = 0x12;
        const PRINTABLE: u8 = 0x13;
        const IA5: u8 = 0x16;
        for (cn, tag) in [("app-a", NUMERIC), ("app_a", PRINTABLE), ("\u{e4}pp", IA5)] {
            assert_eq!(Identity::from_der(&with_cn(cn, tag)?), Err(IdentityError::NotText), "{cn:?} as {tag:#x}");
        }
        for (cn, tag) in [("0123 45", NUMERIC), ("app-a *&", PRINTABLE), ("app_a", IA5)] {
            let id = Identity::from_der(&with_cn(cn, tag)?)?;
            assert_eq!(id.common_name.as_deref(), Some(cn), "{cn:?} as {tag:#x}");
        }
        Ok(())
    }

    #[test]
    fn spiffe_ids_are_in_their_one_spelling_and_one_per_certificate() -> Result<(), Box<dyn std::error::Error>> {
        for good in
            ["spiffe://cluster.local/ns/kube-system/sa/cilium", "spiffe://example.org", "spiffe://a_b-c.d/x.y/Z-9_"]
        {
            assert!(is_spiffe_id(good), "{good}");
        }
        for bad in [
            "spiffe://cluster.local/ns/x/../kube-system/sa/cilium",
            "spiffe://cluster.local/ns/./kube-system",
            "spiffe://cluster.local/ns/kube-system/sa/cilium/",
            "spiffe://cluster.local//ns",
            "spiffe://cluster.local/ns/kube-system/sa/cilium?a",
            "spiffe://cluster.local/ns/kube-system/sa/cilium#b",
            "spiffe://cluster.local/ns%2Fkube-system",
            "spiffe://Cluster.local/ns",
            "spiffe://cluster.local:443/ns",
            "spiffe://user@cluster.local/ns",
            "SPIFFE://cluster.local/ns",
            "spiffe:///ns",
            "spiffe://",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
        let ca = DevCa::new("test ca")?;
        let bad = "spiffe://cluster.local/ns/x/../kube-system/sa/cilium";
        let issued = ca.issue(LeafKind::Client, "c", None, &[], &[bad])?;
        assert_eq!(Identity::from_der(&der(&issued.cert_pem)), Err(IdentityError::BadSpiffeId(bad.into())));
        let two = ["spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d"];
        let issued = ca.issue(LeafKind::Client, "c", None, &[], &two)?;
        assert_eq!(Identity::from_der(&der(&issued.cert_pem)), Err(IdentityError::SeveralSpiffeIds(2)));
        // Other URIs are read as they are.
        let issued = ca.issue(LeafKind::Client, "c", None, &[], &["https://example.org/a/../b", two[0]])?;
        assert_eq!(Identity::from_der(&der(&issued.cert_pem))?.uri_sans.len(), 2);
        Ok(())
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(Identity::from_der(b"not a certificate"), Err(IdentityError::Parse(_))));
    }
}
