//! SCRAM at the proxy, both roles, on arbitrary messages: the server side
//! (`policy::scram::server`, the client's leg: SASLInitialResponse data,
//! then client-final-message) and the client side
//! (`policy::scram::client`, the backend's leg: server-first and
//! server-final messages).
//!
//! Input: `[flags, n, first (n bytes), second (rest)]`
//! - `flags & 1`: TLS with a channel binding (-PLUS offered);
//! - `flags & 2`: the client picked SCRAM-SHA-256-PLUS;
//! - `flags & 4`: the user has no verifier (mock exchange).
//! In `second`, the text `{NONCE}` is replaced with the exchange's nonce,
//! so inputs get past the nonce check to the proof and extensions.
//!
//! Checked: never a panic; a random proof never verifies; every error has
//! one of PostgreSQL's SQLSTATEs for it; the client side never answers a
//! server-first whose salt or iteration count differs from the verifier's.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::error::UserFacing;
use pg_tls_proxy::policy::scram::client::{BackendScramError, Binding, ClientExchange};
use pg_tls_proxy::policy::scram::server::{Finished, ServerExchange};
use pg_tls_proxy::policy::scram::{Verifier, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::from_password(b"pw", b"0123456789abcdef", 4096))
}

fuzz_target!(|data: &[u8]| {
    let [flags, n, rest @ ..] = data else {
        return;
    };
    let n = (*n as usize).min(rest.len());
    let (first, second) = rest.split_at(n);
    let v = verifier();
    let end_point = (flags & 1 != 0).then(|| vec![7u8; 32]);
    let mechanism = if flags & 2 != 0 { SCRAM_SHA_256_PLUS } else { SCRAM_SHA_256 };
    let known = (flags & 4 == 0).then(|| v.clone());
    let mut server = ServerExchange::new(known, Verifier::mock("u", b"s"), end_point.clone());
    match server.first(mechanism, first) {
        Ok(server_first) => {
            assert!(server_first.starts_with("r="), "{server_first}");
            assert!(server_first.ends_with(",i=4096"), "{server_first}");
            let nonce = server_first[2..].split(',').next().unwrap_or_default();
            let second = String::from_utf8_lossy(second).replace("{NONCE}", nonce);
            match server.finish(second.as_bytes()) {
                Ok(Finished::Verified(_)) => panic!("a fuzzed proof verified"),
                Ok(Finished::Failed) => {}
                Err(e) => check(&e.client_error().sqlstate),
            }
        }
        Err(e) => check(&e.client_error().sqlstate),
    }

    // The client side: a key for the verifier, fuzzed server messages.
    let key = &KEY.get_or_init(|| derive_key(v)).0;
    let binding = match end_point {
        Some(h) => Binding::Plus(h),
        None => Binding::None,
    };
    let (mut client, _, client_first) = ClientExchange::start(key, v, binding);
    let client_nonce = &client_first[client_first.find("r=").map_or(0, |i| i + 2)..];
    let server_first = String::from_utf8_lossy(first).replace("{NONCE}", client_nonce);
    match client.respond(server_first.as_bytes()) {
        Ok(_) => {
            assert!(
                server_first.contains(",s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096"),
                "answered another salt or iteration count: {server_first}"
            );
            let _ = client.verify(second);
        }
        Err(BackendScramError::VerifierMismatch { .. }) | Err(_) => {}
    }
});

struct Key(pg_tls_proxy::policy::scram::ClientKey);
static KEY: OnceLock<Key> = OnceLock::new();

/// The ClientKey for the verifier, recovered the way the proxy does.
fn derive_key(v: &Verifier) -> Key {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut s = ServerExchange::new(Some(v.clone()), Verifier::mock("u", b"s"), None);
    let mut c = ScramSha256::new(b"pw", ChannelBinding::unsupported());
    let sf = s.first(SCRAM_SHA_256, c.message()).expect("first");
    c.update(sf.as_bytes()).expect("update");
    match s.finish(c.message()).expect("finish") {
        Finished::Verified(done) => Key(done.client_key),
        Finished::Failed => panic!("the right password failed"),
    }
}

fn check(sqlstate: &str) {
    assert!(
        ["08P01", "28000", "0A000"].contains(&sqlstate),
        "unexpected SQLSTATE {sqlstate}"
    );
}
