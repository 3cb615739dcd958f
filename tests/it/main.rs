//! The integration tests, as one binary: the harness (`tests/common`) and
//! the proxy library are compiled and linked once, not once per file.
//! Each module is one behaviour, named for it, against real PostgreSQL
//! clusters (see README "Tests"). Run one with `cargo test --test it NAME`.

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod backend_down_08006;
mod backend_mtls;
mod backend_verify_full;
mod cancel_request_forwarded;
mod cancel_with_proxy_keys;
mod concurrent_200_sessions;
mod config_errors_exit_64;
mod copy_100mb_byte_identical;
mod explain_tool;
mod fleet_cancel_across_replicas;
mod hardening_backend_and_admin;
mod hardening_fds_and_backlog;
mod hardening_replication;
mod limits_connections_handshakes_idle;
mod mtls_backend_auth_proxy;
mod mtls_client_certificate_verification;
mod mtls_denied_role_never_reaches_backend;
mod mtls_identity_kinds_and_rules;
mod negotiate_bytes_after_sslrequest_never_processed;
mod negotiate_direct_tls_requires_alpn;
mod negotiate_oversized_startup_and_versions;
mod negotiate_plaintext_refused;
mod observability_json_logs_and_drain;
mod observability_metrics;
mod proxy_protocol_v2;
mod psql_verify_full_through_intermediate;
mod reload_certificate_rotation;
mod reload_revocation_defeats_resumption;
mod reload_under_pgbench;
mod routes_backend_tls_client_auth_reload;
mod routes_by_server_name;
mod scram_auth_query;
mod scram_channel_binding_table;
mod scram_termination;
mod shutdown_drain_terminates_with_57p01;
mod sigterm_drain;
mod systemd_notify;
mod tokio_postgres_over_rustls;
