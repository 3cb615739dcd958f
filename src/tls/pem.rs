//! PEM files to DER, with errors that name the config key and the file.
//! Uses `rustls-pki-types`' `PemObject` (rustls-pemfile is unmaintained).

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A certificate or key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key} ({}): {reason}", path.display())]
pub struct FileError {
    pub key: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl FileError {
    pub fn new(key: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        FileError {
            key,
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| FileError::new(key, path, format!("cannot read: {e}")))
}

/// All certificates in a PEM file, in order; at least one.
pub fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let data = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FileError::new(key, path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(FileError::new(key, path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    let data = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| FileError::new(key, path, format!("no usable private key: {e}")))
}

/// All CRLs in a PEM file.
pub fn crls(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, FileError> {
    let data = read(key, path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FileError::new(key, path, format!("invalid PEM: {e}")))?;
    if crls.is_empty() {
        return Err(FileError::new(key, path, "no X509 CRL block found"));
    }
    Ok(crls)
}

/// Facts about a certificate for `check` and expiry errors.
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
}

impl CertSummary {
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertSummary, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("cannot parse certificate: {e}"))?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                    GeneralName::IPAddress(ip) => sans.push(format!("IP:{}", ip_text(ip))),
                    GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                    GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                    _ => {}
                }
            }
        }
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            sans,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => format!("{bytes:02x?}"),
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
