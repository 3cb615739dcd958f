//! The relayed login: `startup::relay_authentication` between an in-memory
//! client and an in-memory backend, both scripted by the input. This is
//! where client bytes (password and SASL messages) and backend bytes
//! (authentication requests, BackendKeyData, errors) are framed and partly
//! parsed before the session is established.
//!
//! Input: `[flags, seed, n_hi, n_lo, backend (n bytes), client (rest)]`
//! (flags as in common/mod.rs, for both peers).
//! - `flags & 8`: the backend link is TLS (SCRAM-SHA-256-PLUS is refused);
//! - `flags & 16`: the backend takes turns, as a real one: it waits for an
//!   answer after each authentication request (else its whole script is
//!   there to read at once);
//! - `flags & 32`: the client closes once its script is done (else it
//!   waits, as a real client does).
//!
//! When neither side can move (a gated backend waiting for an answer the
//! client will never send; auth_timeout ends that in the proxy), the run
//! stops there and checks that this is all it is.
//!
//! Checked: what reaches the client is the backend's messages verbatim,
//! except BackendKeyData, whose body is always the proxy's key; what
//! reaches the backend is whole client messages, all of type `p`; the
//! surplus buffers returned at ReadyForQuery are exactly the unconsumed
//! rest of each stream.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::conn::error::SessionError;
use pg_tls_proxy::wire::{MessageReader, MAX_AUTH_PHASE_MESSAGE};
use pg_tls_proxy::conn::auth_relay::{relay_authentication, ExchangeError, Outcome};
use pg_tls_proxy::policy::cancel::ClientKey;

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use common::{split_messages, Header, Peer, MAX_POLLS};

/// Polls to completion; `None` when nothing moved for a few polls in a row
/// (both peers waiting on each other).
fn run_until_stalled<F: Future>(mut f: Pin<&mut F>, progress: &Cell<u64>) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    let (mut last, mut still) = (progress.get(), 0);
    for _ in 0..MAX_POLLS {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if progress.get() == last {
            still += 1;
            if still == 8 {
                return None;
            }
        } else {
            (last, still) = (progress.get(), 0);
        }
    }
    panic!("relay_authentication still pending after {MAX_POLLS} polls");
}

const PROXY_KEY: [u8; 8] = *b"PROXYKEY";

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = Header::split(data) else {
        return;
    };
    let [n_hi, n_lo, rest @ ..] = rest else {
        return;
    };
    let n = (usize::from(*n_hi) << 8 | usize::from(*n_lo)).min(rest.len());
    let (backend_script, client_script) = rest.split_at(n);
    let backend_tls = header.flags & 8 != 0;

    let gated = header.flags & 16 != 0;
    let mut backend = header.peer(backend_script);
    if gated {
        backend = backend.gated();
    }
    let mut client = Peer::new(
        client_script.to_vec(),
        header.seed ^ 0x5a,
        header.max_chunk(),
        header.pending(),
    );
    client.eof_at_end = header.flags & 32 != 0;
    client.progress = backend.progress.clone();
    let progress = backend.progress.clone();
    let mut keys_issued = 0usize;
    let mut issue_key = |_pid: i32, _secret: [u8; 4]| {
        keys_issued += 1;
        let (pid, secret) = PROXY_KEY.split_at(4);
        let pid = i32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]);
        ClientKey::new(pid, secret).expect("a 4-byte secret")
    };
    let result = {
        let exchange = std::pin::pin!(relay_authentication(
            &mut client,
            &mut backend,
            MessageReader::new(MAX_AUTH_PHASE_MESSAGE),
            backend_tls,
            &mut issue_key,
        ));
        run_until_stalled(exchange, &progress)
    };

    // To the client: the backend's stream, message by message, with only
    // BackendKeyData bodies replaced.
    let to_client = split_messages(&client.written).expect("whole messages to the client");
    let from_backend = split_messages(&backend_script[..client.written.len()])
        .expect("the client got a prefix of the backend's messages");
    assert_eq!(to_client.len(), from_backend.len());
    let mut keys_seen = 0;
    for ((tag, body), (btag, bbody)) in to_client.iter().zip(&from_backend) {
        assert_eq!(tag, btag);
        if *tag == b'K' {
            keys_seen += 1;
            assert_eq!(
                *body,
                &PROXY_KEY[..],
                "the backend's cancel key reached the client"
            );
        } else {
            assert_eq!(body, bbody);
        }
    }
    assert_eq!(keys_seen, keys_issued);

    // To the backend: whole password/SASL messages, as the client sent them.
    assert!(client_script.starts_with(&backend.written));
    let to_backend = split_messages(&backend.written).expect("whole messages to the backend");
    assert!(to_backend.iter().all(|(tag, _)| *tag == b'p'));

    let Some(result) = result else {
        // Stalled: legitimate only if the backend waits for an answer and
        // the proxy holds no whole client message it has not dealt with.
        assert!(
            backend.waiting_for_answer(),
            "stalled while the backend had bytes to send"
        );
        let authenticated = to_client
            .iter()
            .any(|(tag, body)| *tag == b'R' && body.get(..4) == Some(&[0, 0, 0, 0][..]));
        if !authenticated {
            assert_eq!(
                client.remaining().len(),
                0,
                "stalled without reading the client"
            );
            let unforwarded = &client_script[backend.written.len()..client.pos];
            assert!(
                common::split_one(unforwarded).is_none(),
                "stalled on a whole client message it neither forwarded nor refused"
            );
        }
        return;
    };
    match result {
        Ok(Outcome::Ready {
            client_surplus,
            backend_surplus,
        }) => {
            assert_eq!(to_client.last().map(|m| m.0), Some(b'Z'));
            let mut rest = backend_surplus.to_vec();
            rest.extend_from_slice(backend.remaining());
            assert_eq!(rest, &backend_script[client.written.len()..]);
            let mut rest = client_surplus.to_vec();
            rest.extend_from_slice(client.remaining());
            assert_eq!(rest, &client_script[backend.written.len()..]);
        }
        Ok(Outcome::BackendClosed) => {
            assert_eq!(
                to_client.last().map(|m| m.0),
                Some(b'E'),
                "closed without an ErrorResponse"
            );
        }
        Err(ExchangeError::BackendClosed) => {
            assert!(
                backend.remaining().is_empty(),
                "EOF before the backend's stream ended"
            );
        }
        Ok(Outcome::ClientClosed) => {}
        Err(ExchangeError::Session(SessionError::ChannelBindingThroughTls)) => {
            assert!(
                backend_tls,
                "SCRAM-PLUS refused on a plaintext backend link"
            );
        }
        Err(_) => {}
    }
});
