//! pg-tls-proxy: a protocol-aware TLS-terminating proxy for PostgreSQL.
//!
//! # Layout
//! Dependencies point one way, from the command line down to the
//! foundations (`tests/it/architecture.rs` fails on an upward import):
//!
//! ```text
//! cli ─► app ─► conn ─► runtime ─► {backend, fleet} ─► {policy, tls} ─► {wire, config} ─► {error, metrics, sys}
//! ```
//!
//! - [`cli`]: the command line (run, `check`, `explain`, `dev-certs`).
//! - [`app`]: the running proxy: start, accept loop, admin listener,
//!   reload, signals, logging, graceful shutdown.
//! - [`conn`]: one client connection's pipeline: negotiation, TLS
//!   handshake, access decision, backend login or relayed authentication,
//!   byte relay, and the session record.
//! - [`runtime`]: the reloadable state built from a config in one go.
//! - [`backend`]: links to PostgreSQL (TCP, TLS per sslmode), the proxy's
//!   own login, cancel forwarding, backend health.
//! - [`fleet`]: the other replicas: the directory of their ids and
//!   addresses, and sending them the cancels their keys name.
//! - [`policy`]: certificate identities, role rules, cancel keys (pure).
//! - [`tls`]: PEM loading, the client-facing rustls config, client
//!   certificate verification.
//! - [`wire`]: packets and messages as PostgreSQL frames them; the stream
//!   type.
//! - [`config`]: defaults → TOML file → `PGTLS_` environment; validation.
//! - [`error`]: the allow-list of what a client may see (SQLSTATE + text).
//! - [`metrics`]: Prometheus metrics on a registry passed down.
//! - [`sys`]: descriptor limits, memory trimming, listening sockets.

// One exception, with its SAFETY comment: `sys::memtrim` calls glibc's
// malloc_trim, for which no safe wrapper crate exists.
#![deny(unsafe_code)]
#![deny(clippy::unwrap_used)]

// The public API: the command line, the running proxy, its configuration.
pub mod app;
pub mod cli;
pub mod config;

// Internals: public only with the `testing` feature, for the benches, the
// fuzz targets and tests that drive one layer directly (the dev-dependency
// on this crate turns it on for `cargo test` and `cargo bench`).
macro_rules! internal {
    ($($module:ident),* $(,)?) => {$(
        #[cfg(feature = "testing")]
        pub mod $module;
        #[cfg(not(feature = "testing"))]
        mod $module;
    )*};
}

internal!(backend, conn, error, fleet, metrics, policy, runtime, sys, tls, wire);
