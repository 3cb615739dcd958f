//! pg-tls-proxy: a protocol-aware TLS-terminating proxy for PostgreSQL.
//!
//! # Layout
//! Modules follow one connection's path:
//! - [`config`]: defaults → TOML file → `PGTLS_` environment; validation.
//! - [`app`]: composition root; builds shared state, binds, returns a handle.
//! - [`session`]: one connection through its phases, under deadlines.
//! - [`negotiate`]: the pre-TLS state machine (SSLRequest, GSSENCRequest,
//!   direct TLS, CancelRequest, plaintext startup).
//! - [`protocol`]: length-capped framing of startup packets and messages.
//! - [`tls`]: PEM loading and the client-facing rustls `ServerConfig`.
//! - [`backend`]: backend links and their TLS modes (libpq's sslmode).
//! - [`identity`]: verified client certificate → identities (pure).
//! - [`rolemap`]: (identities, user, database) → allow/deny (pure).
//! - [`authorize`]: the per-startup access decision, logged and counted.
//! - [`startup`]: the relayed authentication exchange and its one guard
//!   (SCRAM channel binding through a TLS backend link).
//! - [`cancel`]: proxy-issued cancel keys, the registry, rate limits.
//! - [`runtime`]: the reloadable state, built and validated in one go.
//! - [`reload`]: SIGHUP / POST /reload / file polling → atomic swap.
//! - [`relay`]: the byte copy after authentication.
//! - [`context`]: what every connection shares (runtime, metrics, limits).
//! - [`session_error`]: why a connection failed, and what its client is told.
//! - [`error`]: the allow-list of what a client may see (SQLSTATE + text).
//! - [`audit`]: the per-connection record, metrics settlement and audit event.
//! - [`admin`]: the admin HTTP listener (/metrics, /live, /ready).
//! - [`metrics`]: Prometheus metrics on a registry passed down.
//! - [`memtrim`]: hands glibc's freed heap back after many sessions closed.
//! - [`explain`]: the offline "why was I refused?" report.
//! - [`listener`]: binding listeners with an explicit backlog.
//! - [`replication`]: the `replication` startup parameter, as PostgreSQL reads it.
//! - [`fdlimit`]: RLIMIT_NOFILE, the descriptor budget and its reserve.
//! - [`devcerts`]: throwaway development certificates.
// One exception, with its SAFETY comment: `memtrim` calls glibc's
// malloc_trim, for which no safe wrapper crate exists.
#![deny(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod authorize;
pub mod backend;
pub mod cancel;
pub mod config;
pub mod context;
pub mod devcerts;
pub mod error;
pub mod explain;
pub mod fdlimit;
pub mod identity;
pub mod listener;
pub mod memtrim;
pub mod metrics;
pub mod negotiate;
pub mod protocol;
pub mod relay;
pub mod reload;
pub mod replication;
pub mod rolemap;
pub mod runtime;
pub mod session;
pub mod session_error;
pub mod startup;
pub mod stream;
pub mod tls;
