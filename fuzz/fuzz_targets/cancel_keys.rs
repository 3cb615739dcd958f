//! Cancel keys and the fleet's peer link: `CancelRegistry::lookup` and
//! `lookup_from_peer` on arbitrary CancelRequest packets (any client may
//! send one, no TLS needed), and the peer link's `Hello` and `Request`
//! parsers on arbitrary bytes.
//!
//! Input: the first byte picks a mode. Mode 0: the rest is a packet.
//! Mode 1: the rest is an XOR mask over one of the issued keys (its pid
//! and secret), so that the fuzzer explores the keys' neighbourhood,
//! which random packets never reach. The rest is also read as a hello and
//! as a request. Invariants: nothing panics; a key finds its session iff
//! it is exactly an issued key; a 3.2-length key we did not issue is never
//! sent on to a peer (its MAC cannot verify); a peer's cancel is never
//! sent on again; a parsed hello or request re-encodes to its bytes.
#![no_main]

use std::net::IpAddr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::fleet::wire::{Hello, Request, HELLO_LEN};
use pg_tls_proxy::policy::cancel::{CancelRegistry, KeyScheme, Lookup};

fn packet(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut p = (12 + secret.len() as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&80877102i32.to_be_bytes());
    p.extend_from_slice(&pid.to_be_bytes());
    p.extend_from_slice(secret);
    p
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let reg: CancelRegistry<u8> =
        CancelRegistry::with_scheme(KeyScheme::fleet(3, b"fuzz", Some(b"accepted")));
    let (short, _a) = reg.register(42, 1, false);
    let (long, _b) = reg.register(42, 2, true);
    let issued = [
        packet(42, short.secret.as_bytes()),
        packet(42, long.secret.as_bytes()),
    ];
    let candidate = match mode & 1 {
        0 => data.to_vec(),
        _ => {
            let mut p = issued[usize::from(mode >> 1 & 1)].clone();
            for (b, m) in p[8..].iter_mut().zip(data) {
                *b ^= m;
            }
            p
        }
    };
    let ip: IpAddr = [127, 0, 0, 1].into();
    let now = Instant::now();
    let found = reg.lookup(ip, &candidate, now);
    let from_peer = reg.lookup_from_peer(ip, &candidate, now);
    // The length word and code are the reader's business; the key is
    // pid and secret.
    let is_issued = issued
        .iter()
        .any(|p| p.len() == candidate.len() && p[8..] == candidate[8.min(candidate.len())..]);
    match (&found, is_issued) {
        (Lookup::Found(_), false) => panic!("a key we did not issue found a session"),
        (Lookup::Found(_), true) | (Lookup::RateLimited, _) => {}
        (_, true) => panic!("an issued key was not found: {found:?}"),
        _ => {}
    }
    if candidate.len() == 44 && !is_issued {
        assert!(
            !matches!(found, Lookup::Peer(_)),
            "an unauthenticated 3.2 key was sent on"
        );
    }
    assert!(!matches!(from_peer, Lookup::Peer(_)), "sent on twice");

    if let Ok(head) = <&[u8; HELLO_LEN]>::try_from(data.get(..HELLO_LEN).unwrap_or_default()) {
        if let Ok(hello) = Hello::decode(head) {
            assert_eq!(&hello.encode(), head);
        }
    }
    let mut r = data;
    if let Ok(request) = runtime().block_on(Request::read(&mut r)) {
        let mut again = Vec::new();
        request.encode(&mut again);
        assert_eq!(again.as_slice(), &data[..again.len()]);
    }
});
