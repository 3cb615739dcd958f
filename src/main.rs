//! The `pg-tls-proxy` binary: everything lives in the library's
//! [`pg_tls_proxy::cli`], so tests and the binary run the same code.

fn main() -> std::process::ExitCode {
    pg_tls_proxy::cli::main()
}
