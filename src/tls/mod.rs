//! TLS configuration: PEM loading, the server-side `ServerConfig`, and the
//! one crypto provider the whole process uses.
//!
//! Everything here runs at start-up (and, later, at reload), never per
//! connection: a `ServerConfig` is built once and shared by `Arc`.

pub mod client_auth;
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
