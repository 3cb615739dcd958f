//! TLS configuration: PEM loading, the server-side `ServerConfig`, and the
//! one crypto provider the whole process uses.
//!
//! Everything here runs at start-up (and, later, at reload), never per
//! connection: a `ServerConfig` is built once and shared by `Arc`.

pub mod client_auth;
pub mod peer;
pub mod pem;
pub mod server;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The ALPN protocol PostgreSQL 17 and libpq 17+ use.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The crypto provider, passed explicitly everywhere: relying on a
/// process default panics when two providers are compiled in.
///
/// ring's suites are all ECDHE + AEAD (AES-GCM, ChaCha20-Poly1305), so no
/// filtering is needed for forward secrecy.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The tls-server-end-point channel binding of a certificate (RFC 5929
/// 4.1): its DER hashed with SHA-256 when it is signed with MD5 or SHA-1,
/// else with its signature's own hash. `None` where RFC 5929 defines none
/// (Ed25519, Ed448, or a signature algorithm not known here): SCRAM-PLUS
/// is then not offered, as PostgreSQL cannot offer it either.
pub fn end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let algorithm = match oid.as_str() {
        // md5/sha1/sha256 with RSA, ecdsa-with-SHA1/SHA256, DSA-SHA1/256.
        "1.2.840.113549.1.1.4" | "1.2.840.113549.1.1.5" | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1" | "1.2.840.10045.4.3.2" | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2" => &ring::digest::SHA256,
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
        // RSASSA-PSS names its hash in the parameters.
        "1.2.840.113549.1.1.10" => {
            let params = cert.signature_algorithm.parameters.as_ref()?;
            pss_hash(params.as_bytes())?
        }
        _ => return None,
    };
    Some(ring::digest::digest(algorithm, cert_der).as_ref().to_vec())
}

/// The hash of RSASSA-PSS parameters (DER of RSASSA-PSS-params): SHA-256
/// when absent (SHA-1 default, upgraded by RFC 5929), else the one named.
fn pss_hash(params: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    // OIDs of id-sha384 / id-sha512 as they appear inside the parameters.
    const SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
    const SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
    let has = |oid: &[u8]| params.windows(oid.len()).any(|w| w == oid);
    Some(if has(SHA512) {
        &ring::digest::SHA512
    } else if has(SHA384) {
        &ring::digest::SHA384
    } else {
        &ring::digest::SHA256
    })
}
