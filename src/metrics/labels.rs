//! Closed label sets, documented in README: label values come from
//! these lists and fixed strings in the code, never from peers.

pub const CLOSE_REASONS: &[&str] = &["client_eof", "backend_eof", "error", "shutdown", "limit"];
pub const NEGOTIATION_PATHS: &[&str] = &[
    "sslrequest",
    "direct_tls",
    "gssenc_declined",
    "plaintext_rejected",
    "plaintext_allowed",
    "cancel",
    "protocol_violation",
    "early_data",
];
pub const TLS_FAILURES: &[&str] = &[
    "timeout",
    "unrecognized_name",
    "no_client_cert",
    "unknown_ca",
    "expired",
    "revoked",
    "bad_certificate",
    "alpn_mismatch",
    "protocol_version",
    "no_ems",
    "other",
];
