//! The client-facing `ServerConfig`: built once from `[tls]`, validated
//! (key matches certificate, leaf inside its validity period) before any
//! port is bound.

use std::sync::Arc;

use rustls::ServerConfig;

use super::client_auth::ClientAuthSetup;
use super::pem::{self, CertSummary, FileError};
use super::{provider, ALPN_POSTGRESQL};
use crate::config::{self, TlsVersion};

/// Sessions kept for stateful resumption (TLS 1.2 ids and TLS 1.3 tickets
/// when no ticketer is set); a few hundred bytes each.
pub const SESSION_CACHE_SIZE: usize = 4096;

/// The server certificate as loaded, for summaries and metrics.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// tls-server-end-point of the leaf served (SCRAM-PLUS), when defined.
    pub end_point: Option<Vec<u8>>,
    /// Every certificate served (leaf first), for expiry metrics.
    pub chain: Vec<CertSummary>,
}

/// The server config from `[tls]` and `[client_auth]` alone (tests,
/// benches, fuzz targets); `None` without a certificate.
#[cfg(any(test, feature = "testing"))]
pub fn build(
    tls: &config::Tls,
    client: &config::ClientAuth,
) -> Result<Option<ServerTls>, FileError> {
    let client_auth = super::client_auth::build(client)?;
    tls.server
        .as_ref()
        .map(|pair| build_for(pair, Keys::TOP, tls, client_auth, SESSION_CACHE_SIZE))
        .transpose()
}

/// The config keys errors name: `[tls]`'s, or a route's.
#[derive(Clone, Copy)]
pub struct Keys {
    pub cert: &'static str,
    pub key: &'static str,
}

impl Keys {
    pub const TOP: Keys = Keys {
        cert: "tls.cert",
        key: "tls.key",
    };
    pub const ROUTE: Keys = Keys {
        cert: "routes.cert",
        key: "routes.key",
    };
}

/// The server config for one certificate, with `[tls]`'s versions and
/// rules and a built client-certificate verifier (shared by routes that
/// use the top level's); `session_cache` entries of stateful resumption
/// (0: tickets only). Each config has its own ticket key, so a session
/// never resumes under another config's certificate rules.
pub fn build_for(
    pair: &config::CertKey,
    keys: Keys,
    tls: &config::Tls,
    client_auth: Option<ClientAuthSetup>,
    session_cache: usize,
) -> Result<ServerTls, FileError> {
    let config::CertKey {
        cert: cert_path,
        key: key_path,
    } = pair;
    let chain = pem::certs(keys.cert, cert_path)?;
    let end_point = chain.first().and_then(|leaf| super::end_point(leaf));
    let key = pem::private_key(keys.key, key_path)?;
    let leaf =
        CertSummary::parse(&chain[0]).map_err(|r| FileError::new(keys.cert, cert_path, r))?;
    let now = pem::unix_now();
    if leaf.not_after < now {
        return Err(FileError::new(
            keys.cert,
            cert_path,
            format!("certificate {} has expired", leaf.subject),
        ));
    }
    if leaf.not_before > now {
        return Err(FileError::new(
            keys.cert,
            cert_path,
            format!("certificate {} is not valid yet", leaf.subject),
        ));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let summaries = chain
        .iter()
        .map(|c| CertSummary::parse(c).map_err(|r| FileError::new(keys.cert, cert_path, r)))
        .collect::<Result<Vec<_>, _>>()?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| FileError::new("tls.min_version", cert_path, e.to_string()))?;
    let builder = match &client_auth {
        Some(setup) => builder.with_client_cert_verifier(setup.verifier.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        let reason = match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("the private key does not match the certificate in {}", keys.cert)
            }
            other => other.to_string(),
        };
        FileError::new(keys.key, key_path, reason)
    })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.session_storage = match session_cache {
        0 => Arc::new(rustls::server::NoServerSessionStorage {}),
        n => rustls::server::ServerSessionMemoryCache::new(n),
    };
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| FileError::new(keys.cert, cert_path, e.to_string()))?;
    // 0-RTT data is replayable: never accept it.
    config.max_early_data_size = 0;
    // TLS 1.2 without extended master secret is open to triple-handshake
    // attacks (RFC 7627, RFC 9325 section 3.5); current OpenSSL, NSS,
    // rustls, Go and Java clients send it. Older ones (OpenSSL 1.0.2,
    // LibreSSL 2.x, Java before 8u161) need `tls.require_ems = false`.
    config.require_ems = tls.require_ems;
    // Our suite order (AES-GCM, then ChaCha20), not the client's.
    config.ignore_client_order = true;
    Ok(ServerTls {
        config: Arc::new(config),
        end_point,
        chain: summaries,
    })
}
