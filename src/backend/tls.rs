//! Backend TLS modes, named as libpq's `sslmode`:
//! - `require`: encrypt; check the chain only if `sslrootcert` is given
//!   (libpq does the same when a root certificate file exists).
//! - `verify-ca`: the chain must lead to `sslrootcert`; the name is not checked.
//! - `verify-full`: chain and name (`server_name`, else the host of `address`).
//!
//! Handshake signatures are always verified; only the certificate checks
//! differ between modes.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::{self, CertKey, SslMode};
use crate::tls::pem::{self, FileError};
use crate::tls::{provider, ALPN_POSTGRESQL};

/// The backend `ClientConfig`s for a TLS sslmode: without a client
/// certificate, and (when `backend.sslcert` is set) with the proxy's.
pub struct ClientConfigs {
    pub anonymous: Arc<ClientConfig>,
    pub with_cert: Option<Arc<ClientConfig>>,
}

/// Builds the backend `ClientConfig`s for a TLS sslmode.
pub fn client_configs(b: &config::Backend) -> Result<ClientConfigs, FileError> {
    let provider = provider();
    let origin = b
        .sslrootcert
        .as_deref()
        .unwrap_or(std::path::Path::new("-"));
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| FileError::new("backend.sslmode", origin, e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (&b.sslrootcert, b.sslmode) {
        (Some(path), mode) => {
            let mut roots = RootCertStore::empty();
            for cert in pem::certs("backend.sslrootcert", path)? {
                roots.add(cert).map_err(|e| {
                    FileError::new("backend.sslrootcert", path, format!("unusable CA: {e}"))
                })?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| FileError::new("backend.sslrootcert", path, e.to_string()))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        (None, _) => Arc::new(AnyCertificate(provider)),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let with_cert = match &b.client_cert {
        Some(CertKey { cert, key }) => {
            let chain = pem::certs("backend.sslcert", cert)?;
            let key_der = pem::private_key("backend.sslkey", key)?;
            let mut config = builder
                .clone()
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| FileError::new("backend.sslkey", key, e.to_string()))?;
            config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
            Some(Arc::new(config))
        }
        None => None,
    };
    let mut anonymous = builder.with_no_client_auth();
    anonymous.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(ClientConfigs {
        anonymous: Arc::new(anonymous),
        with_cert,
    })
}

/// The name to verify and send as SNI: `server_name`, else the host part
/// of `address` (an IP address is verified against IP SANs, without SNI).
pub fn server_name(b: &config::Backend) -> Result<ServerName<'static>, String> {
    let host = match &b.server_name {
        Some(name) => name.clone(),
        None => config::host_of(&b.address).to_string(),
    };
    ServerName::try_from(host.clone()).map_err(|_| format!("\"{host}\" is not a valid server name"))
}

/// verify-ca: the full webpki check, minus the name.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// require without a root certificate: encryption without authentication
/// of the server, as libpq's `sslmode=require`.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parsing() {
        assert_eq!(config::host_of("db.example:5432"), "db.example");
        assert_eq!(config::host_of("[::1]:5432"), "::1");
        assert_eq!(config::host_of("127.0.0.1:5432"), "127.0.0.1");
    }
}
