//! What a verified client certificate says about its holder: subject CN,
//! the full subject DN (RFC 4514), SAN DNS names, emails, URIs (SPIFFE IDs)
//! and IP addresses.
//!
//! Pure code, no I/O. It never verifies anything: it must only be given a
//! certificate that rustls has already verified. Values are kept exactly as
//! written: comparison is exact and case-sensitive, and a CN of
//! `*.example.com` is a literal string, never a wildcard. The DN follows
//! the string PostgreSQL compares for `clientname=DN` (OpenSSL's RFC 2253
//! output: short names, non-ASCII bytes escaped as `\XX`), and `cn` is the
//! first CN only, as PostgreSQL uses.

use std::fmt;
use std::net::IpAddr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

pub use crate::config::IdentityKind;

/// Every identity one certificate carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub cn: Vec<String>,
    /// RFC 4514: most specific RDN first, e.g. `CN=alice,OU=DBA,O=Acme`,
    /// the form PostgreSQL's `clientname=DN` compares.
    pub dn: String,
    pub dns: Vec<String>,
    pub emails: Vec<String>,
    pub uris: Vec<String>,
    pub ips: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot parse the client certificate: {0}")]
pub struct IdentityError(String);

impl Identity {
    /// Extracts identities from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError(e.to_string()))?;
        let subject = cert.subject();
        // Only the first CN, as PostgreSQL (X509_NAME_get_text_by_NID) uses.
        let cn = subject
            .iter_common_name()
            .map(attribute_text)
            .take(1)
            .collect::<Vec<_>>();
        let mut id = Identity {
            cn,
            dn: rfc4514(subject),
            ..Identity::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => id.dns.push(d.to_string()),
                    GeneralName::RFC822Name(e) => id.emails.push(e.to_string()),
                    GeneralName::URI(u) => id.uris.push(u.to_string()),
                    GeneralName::IPAddress(ip) => {
                        if let Some(ip) = ip_from_bytes(ip) {
                            id.ips.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(id)
    }

    /// The values of one kind, in certificate order.
    pub fn values(&self, kind: IdentityKind) -> &[String] {
        match kind {
            IdentityKind::Cn => &self.cn,
            IdentityKind::Dn => std::slice::from_ref(&self.dn),
            IdentityKind::Dns => &self.dns,
            IdentityKind::Email => &self.emails,
            IdentityKind::Uri => &self.uris,
            IdentityKind::Ip => &self.ips,
        }
    }

    /// The name used in messages when no rule picked a better one: the CN,
    /// else the DN.
    pub fn display_name(&self) -> &str {
        self.cn.first().map(String::as_str).unwrap_or(&self.dn)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for kind in IdentityKind::ALL {
            for v in self.values(kind) {
                writeln!(f, "  {:<6}{}", kind.as_str(), v)?;
            }
        }
        Ok(())
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from([b[0], b[1], b[2], b[3]])),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Some(IpAddr::from(a))
        }
        _ => None,
    }
}

/// RFC 4514 string form: RDNs in reverse order, `+` inside multi-valued
/// RDNs, short names for the attribute types RFC 4514 lists, dotted OIDs
/// (with `#hex` values) for the rest, and the required escapes.
pub fn rfc4514(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| format!("{}={}", type_name(atv), attribute_value(atv)))
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn type_name(atv: &AttributeTypeAndValue<'_>) -> String {
    match atv.attr_type().to_id_string().as_str() {
        "2.5.4.3" => "CN".into(),
        "2.5.4.7" => "L".into(),
        "2.5.4.8" => "ST".into(),
        "2.5.4.10" => "O".into(),
        "2.5.4.11" => "OU".into(),
        "2.5.4.6" => "C".into(),
        "2.5.4.9" => "STREET".into(),
        "0.9.2342.19200300.100.1.25" => "DC".into(),
        "0.9.2342.19200300.100.1.1" => "UID".into(),
        // OpenSSL's short names, which PostgreSQL's RFC 2253 form uses.
        "1.2.840.113549.1.9.1" => "emailAddress".into(),
        "2.5.4.5" => "serialNumber".into(),
        "2.5.4.4" => "SN".into(),
        "2.5.4.42" => "GN".into(),
        "2.5.4.12" => "title".into(),
        other => other.to_string(),
    }
}

fn attribute_text(atv: &AttributeTypeAndValue<'_>) -> String {
    match atv.as_str() {
        Ok(s) => s.to_string(),
        Err(_) => String::from_utf8_lossy(atv.as_slice()).into_owned(),
    }
}

fn attribute_value(atv: &AttributeTypeAndValue<'_>) -> String {
    match atv.as_str() {
        Ok(s) => escape(s),
        Err(_) => {
            let mut out = String::from("#");
            for b in atv.as_slice() {
                out.push_str(&format!("{b:02x}"));
            }
            out
        }
    }
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            // OpenSSL's RFC 2253 output escapes every non-ASCII byte.
            c if !c.is_ascii() => {
                let mut utf8 = [0u8; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    out.push_str(&format!("\\{b:02X}"));
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn extracts_every_kind() {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Acme, Inc.");
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, "DBA");
        p.distinguished_name
            .push(DnType::CommonName, "*.example.com");
        p.subject_alt_names = vec![
            SanType::DnsName("db.example.com".try_into().expect("dns")),
            SanType::Rfc822Name("alice@example.com".try_into().expect("email")),
            SanType::URI(
                "spiffe://prod.example.org/ns/app/sa/web"
                    .try_into()
                    .expect("uri"),
            ),
            SanType::IpAddress("10.1.2.3".parse().expect("ip")),
        ];
        let id = Identity::from_der(&cert(p)).expect("identity");
        assert_eq!(id.cn, vec!["*.example.com"]);
        assert_eq!(id.dn, r"CN=*.example.com,OU=DBA,O=Acme\, Inc.");
        assert_eq!(id.dns, vec!["db.example.com"]);
        assert_eq!(id.emails, vec!["alice@example.com"]);
        assert_eq!(id.uris, vec!["spiffe://prod.example.org/ns/app/sa/web"]);
        assert_eq!(id.ips, vec!["10.1.2.3"]);
        assert_eq!(id.display_name(), "*.example.com");
    }

    #[test]
    fn escapes_rfc4514() {
        assert_eq!(escape(" a+b "), r"\ a\+b\ ");
        assert_eq!(escape("#x"), r"\#x");
        assert_eq!(escape("a\"b;c<d>e\\"), r#"a\"b\;c\<d\>e\\"#);
        assert_eq!(escape("José"), r"Jos\C3\A9");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Identity::from_der(b"not a certificate").is_err());
    }
}
