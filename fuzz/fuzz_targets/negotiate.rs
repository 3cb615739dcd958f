//! The pre-startup state machine, `conn::negotiate::negotiate`, over an
//! in-memory socket: whatever a client sends before its StartupMessage
//! (SSLRequest, GSSENCRequest, CancelRequest, a ClientHello, garbage).
//!
//! Input: `[flags, client bytes...]`
//! - `flags & 1`: TLS is configured (a throwaway certificate);
//! - `flags & 2`: `tls.allow_plaintext`.
//!
//! The client's bytes are all there before negotiation starts, then the
//! client closes its side, so every wait ends in EOF.
//!
//! Checked: a plaintext startup is accepted only when allowed; bytes sent
//! behind an SSLRequest are refused as early data and never read as a
//! startup (CVE-2021-23214); no fuzzed input completes a TLS handshake; a
//! failure that keeps the stream has something to tell the client.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::config::{CertKey, ClientAuth, Tls};
use pg_tls_proxy::conn::error::SessionError;
use pg_tls_proxy::conn::negotiate::{negotiate, Ctx, Negotiated, Path};
use pg_tls_proxy::metrics::Metrics;
use pg_tls_proxy::wire::stream::memory::pair;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

struct World {
    runtime: tokio::runtime::Runtime,
    metrics: Metrics,
    tls: Arc<ServerConfig>,
    slots: tokio::sync::Semaphore,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pgtls-fuzz-negotiate-{}", std::process::id()));
        pg_tls_proxy::cli::devcerts::write(&dir, &["localhost".into()], &[], &[]).expect("certs");
        let tls = Tls {
            server: Some(CertKey {
                cert: dir.join("server.crt"),
                key: dir.join("server.key"),
            }),
            ..Tls::default()
        };
        let tls = pg_tls_proxy::tls::server::build(&tls, &ClientAuth::default())
            .expect("server config")
            .expect("tls")
            .config;
        let _ = std::fs::remove_dir_all(&dir);
        World {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime"),
            metrics: Metrics::new(&prometheus::Registry::new()).expect("metrics"),
            tls,
            slots: tokio::sync::Semaphore::new(4),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    if input.len() > 64 * 1024 {
        return;
    }
    let w = world();
    let (tls, allow_plaintext) = (flags & 1 != 0, flags & 2 != 0);
    w.runtime.block_on(async {
        let (socket, mut client) = pair(128 * 1024);
        client.write_all(input).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let ctx = Ctx {
            tls: tls.then_some(&w.tls as &dyn pg_tls_proxy::conn::negotiate::Certificates),
            allow_plaintext,
            deadline: tokio::time::Instant::now() + Duration::from_secs(10),
            metrics: &w.metrics,
            handshake_slots: &w.slots,
        };
        let result = negotiate(socket, &ctx).await;
        drop(client);
        let early_data = tls && input.len() > 8 && input[..8] == SSL_REQUEST;
        match result {
            Ok(Negotiated::Startup { path, .. }) => {
                assert!(!early_data, "a startup read from behind an SSLRequest");
                assert_eq!(path, Path::Plaintext, "a fuzzed input completed a TLS handshake");
                assert!(allow_plaintext, "plaintext startup accepted while not allowed");
            }
            Ok(Negotiated::Cancel { path, .. }) => {
                assert!(!early_data, "a cancel read from behind an SSLRequest");
                assert_eq!(path, Path::Plaintext, "a fuzzed input completed a TLS handshake");
            }
            Err(failed) => {
                if early_data {
                    assert!(
                        matches!(failed.error, SessionError::EarlyData),
                        "bytes behind an SSLRequest: {}",
                        failed.error
                    );
                }
                if failed.stream.is_some() {
                    assert!(
                        failed.error.client_error().is_some(),
                        "a stream kept with nothing to say: {}",
                        failed.error
                    );
                }
            }
        }
    });
});
