//! Client certificate verification (`[client_auth]`): chain to a configured
//! root, validity, clientAuth key usage and CRLs are checked by rustls'
//! webpki verifier. This wrapper adds the intermediates found in the CA
//! bundles to what the client sent, so a client that sends only its leaf
//! still verifies when the operator configured the intermediate.
//!
//! Revocation defaults to whole-chain checking (every issuer needs a CRL),
//! as PostgreSQL does with OpenSSL's CRL_CHECK_ALL. A CRL past its
//! next_update still applies and is reported (log at load, and its
//! next_update in `pgtls_certificate_not_after_timestamp_seconds`), unless
//! `crl_expired = "deny"`, which refuses every certificate it covers, as
//! PostgreSQL does.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::pem::{self, unix_now, CertSummary, FileError};
use super::provider;
use crate::config::{ClientAuth, ClientAuthMode, CrlCheck, CrlExpired};

/// A loaded CRL, for expiry reporting.
#[derive(Debug, Clone)]
pub struct CrlSummary {
    pub path: std::path::PathBuf,
    pub issuer: String,
    pub next_update: Option<i64>,
}

impl CrlSummary {
    pub fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|t| t < now)
    }
}

/// What `[client_auth]` built.
#[derive(Clone)]
pub struct ClientAuthSetup {
    pub verifier: Arc<dyn ClientCertVerifier>,
    pub cas: Vec<CertSummary>,
    pub crls: Vec<CrlSummary>,
}

#[derive(Debug)]
struct WithIntermediates {
    inner: Arc<dyn ClientCertVerifier>,
    intermediates: Vec<CertificateDer<'static>>,
}

/// Builds the verifier, or `None` for `mode = "none"`.
pub fn build(c: &ClientAuth) -> Result<Option<ClientAuthSetup>, FileError> {
    let mode = c.effective_mode();
    if mode == ClientAuthMode::None {
        return Ok(None);
    }
    let mut roots = RootCertStore::empty();
    let mut intermediates = Vec::new();
    let mut cas = Vec::new();
    for path in &c.ca {
        for cert in pem::certs("client_auth.ca", path)? {
            let summary =
                CertSummary::parse(&cert).map_err(|r| FileError::new("client_auth.ca", path, r))?;
            if summary.subject == summary.issuer {
                roots.add(cert).map_err(|e| {
                    FileError::new(
                        "client_auth.ca",
                        path,
                        format!("unusable CA certificate: {e}"),
                    )
                })?;
            } else {
                intermediates.push(cert);
            }
            cas.push(summary);
        }
    }
    if roots.is_empty() {
        let path =
            c.ca.first()
                .map(|p| p.as_path())
                .unwrap_or(std::path::Path::new("-"));
        return Err(FileError::new(
            "client_auth.ca",
            path,
            "no self-signed root CA: chains are verified to a configured root",
        ));
    }
    let mut crls = Vec::new();
    let mut crl_summaries = Vec::new();
    let now = unix_now();
    for path in &c.crl {
        for crl in pem::crls("client_auth.crl", path)? {
            let summary = crl_summary(path, &crl)?;
            if summary.is_stale(now) {
                tracing::warn!(
                    crl = %path.display(),
                    issuer = %summary.issuer,
                    "CRL is past its next_update: it still applies, but publish a fresh one"
                );
            }
            crl_summaries.push(summary);
            crls.push(crl);
        }
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).with_crls(crls);
    if c.crl_check == CrlCheck::Leaf {
        builder = builder.only_check_end_entity_revocation();
    }
    if c.crl_expired == CrlExpired::Deny {
        builder = builder.enforce_revocation_expiration();
    }
    if mode == ClientAuthMode::Optional {
        builder = builder.allow_unauthenticated();
    }
    let first =
        c.ca.first()
            .map(|p| p.as_path())
            .unwrap_or(std::path::Path::new("-"));
    let inner = builder
        .build()
        .map_err(|e| FileError::new("client_auth.ca", first, e.to_string()))?;
    Ok(Some(ClientAuthSetup {
        verifier: Arc::new(WithIntermediates {
            inner,
            intermediates,
        }),
        cas,
        crls: crl_summaries,
    }))
}

fn crl_summary(
    path: &std::path::Path,
    der: &rustls_pki_types::CertificateRevocationListDer<'_>,
) -> Result<CrlSummary, FileError> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
        .map_err(|e| FileError::new("client_auth.crl", path, format!("cannot parse CRL: {e}")))?;
    Ok(CrlSummary {
        path: path.to_path_buf(),
        issuer: crl.issuer().to_string(),
        next_update: crl.next_update().map(|t| t.timestamp()),
    })
}

use x509_parser::prelude::FromDer;

impl ClientCertVerifier for WithIntermediates {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.intermediates.is_empty() {
            return self
                .inner
                .verify_client_cert(end_entity, intermediates, now);
        }
        let mut all: Vec<CertificateDer<'_>> = intermediates.to_vec();
        all.extend(self.intermediates.iter().cloned());
        self.inner.verify_client_cert(end_entity, &all, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
