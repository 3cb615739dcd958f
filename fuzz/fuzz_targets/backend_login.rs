//! Proxy-authenticated backend logins: `backend::login::login` answering a
//! scripted backend (authentication requests: ok, cleartext, MD5, SASL,
//! SASLContinue, SASLFinal, errors, garbage).
//!
//! Input: `[flags, seed, backend stream...]` (see common/mod.rs).
//! - `flags & 8`: a password is configured for the role;
//! - `flags & 16`: the link is TLS (a tls-server-end-point hash is given);
//! - `flags & 32`: the link's certificate was verified.
//!
//! Runs on a current-thread Tokio runtime (login hashes under
//! `spawn_blocking`). Checked: never a cleartext or MD5 answer on an unverified link, the
//! password itself never written on one, only whole `p` messages written.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::backend::login::{login, LoginError, Method, Secret, MAX_SCRAM_ITERATIONS};
use pg_tls_proxy::wire::{MessageReader, MAX_AUTH_PHASE_MESSAGE};

use common::{runtime, split_messages, Header};

const PASSWORD: &str = "fuzz-secret-password-0123456789";

fuzz_target!(|data: &[u8]| {
    let Some((header, stream)) = Header::split(data) else {
        return;
    };
    let secret = (header.flags & 8 != 0).then(|| Secret::new(PASSWORD.to_string()));
    let end_point = (header.flags & 16 != 0).then(|| vec![0xab; 32]);
    let verified = header.flags & 32 != 0;

    let mut backend = header.peer(stream);
    let mut reader = MessageReader::new(MAX_AUTH_PHASE_MESSAGE);
    // login() runs PBKDF2 under spawn_blocking: it needs a runtime.
    let result = runtime().block_on(login(
        &mut reader,
        &mut backend,
        "fuzzuser",
        secret.as_ref(),
        end_point.clone(),
        verified,
    ));

    let written = split_messages(&backend.written).expect("whole messages to the backend");
    assert!(written.iter().all(|(tag, _)| *tag == b'p'));
    if !verified {
        assert!(
            !backend
                .written
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "the password went out over an unverified link"
        );
    }
    match result {
        Ok(Method::Cleartext | Method::Md5) => assert!(verified),
        Ok(Method::ScramPlus) => assert!(end_point.is_some()),
        Ok(Method::Trust | Method::Scram) => {}
        Err(LoginError::NoCredential(_)) => assert!(secret.is_none()),
        Err(LoginError::InsecurePassword) => assert!(!verified),
        Err(LoginError::TooManyIterations(n)) => assert!(n > MAX_SCRAM_ITERATIONS),
        Err(_) => {}
    }
});
