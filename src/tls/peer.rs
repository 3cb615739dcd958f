//! TLS between the replicas of a fleet (`[fleet]`): each side presents its
//! replica certificate and requires the other's, both signed by the
//! fleet's CA. TLS 1.3 only (both ends are this program), no session
//! resumption (a CA change must apply to the next link), and an ALPN of
//! its own so that neither a PostgreSQL client nor a peer can reach the
//! other's listener by mistake.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::pem::{self, CertSummary, FileError};
use super::provider;
use crate::config::Fleet;

/// The ALPN protocol of the peer link.
pub const ALPN_PEER: &[u8] = b"pgtls-peer/1";

/// Both directions of the peer link.
pub struct PeerTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// The replica certificate's subject and expiry.
    pub chain: Vec<CertSummary>,
}

pub fn build(f: &Fleet) -> Result<PeerTls, FileError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for path in &f.ca {
        for cert in pem::certs("fleet.ca", path)? {
            roots
                .add(cert)
                .map_err(|e| FileError::new("fleet.ca", path, format!("unusable CA: {e}")))?;
        }
    }
    let roots = Arc::new(roots);
    let chain = pem::certs("fleet.cert", &f.cert)?;
    let key = pem::private_key("fleet.key", &f.key)?;
    let summaries = chain
        .iter()
        .map(|c| CertSummary::parse(c).map_err(|r| FileError::new("fleet.cert", &f.cert, r)))
        .collect::<Result<Vec<_>, _>>()?;
    let ca_path = f.ca.first().map(|p| p.as_path()).unwrap_or(Path::new("-"));
    let bad = |key: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::Error| FileError::new(key, &path, e.to_string())
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| FileError::new("fleet.ca", ca_path, e.to_string()))?;
    self_check(f, &chain, &roots, &verifier)?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad("fleet.cert", &f.cert))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(bad("fleet.key", &f.key))?;
    server.alpn_protocols = vec![ALPN_PEER.to_vec()];
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad("fleet.cert", &f.cert))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(bad("fleet.key", &f.key))?;
    client.alpn_protocols = vec![ALPN_PEER.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    Ok(PeerTls {
        server: Arc::new(server),
        client: Arc::new(client),
        chain: summaries,
    })
}

/// Every replica verifies the others with what this one is configured
/// with, so this replica's own certificate must pass the same checks: a
/// client and a server certificate under `fleet.ca`, valid for
/// `server_name` (or for one of the `peers` hosts, its own among them).
/// Caught here, a mismatch is a start-up error instead of cancels lost in
/// silence.
fn self_check(
    f: &Fleet,
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    client: &Arc<dyn ClientCertVerifier>,
) -> Result<(), FileError> {
    let bad = |reason: String| FileError::new("fleet.cert", &f.cert, reason);
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| bad("no certificate".into()))?;
    let now = UnixTime::now();
    client
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| bad(format!("not a client certificate under fleet.ca: {e}")))?;
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let names: Vec<String> = match &f.server_name {
        Some(name) => vec![name.clone()],
        None => f
            .peers
            .iter()
            .map(|p| crate::config::host_of(p).to_string())
            .collect(),
    };
    if names.is_empty() {
        return Ok(());
    }
    let mut why = String::new();
    for name in &names {
        let Ok(server_name) = ServerName::try_from(name.clone()) else {
            continue;
        };
        match server.verify_server_cert(leaf, intermediates, &server_name, &[], now) {
            Ok(_) => return Ok(()),
            Err(e) => why = e.to_string(),
        }
    }
    let which = if f.server_name.is_some() {
        "fleet.server_name"
    } else {
        "any fleet.peers host (set fleet.server_name to one name every replica's certificate carries)"
    };
    Err(bad(format!(
        "the peers could not verify it: not valid for {which} ({}): {why}",
        names.join(", ")
    )))
}
