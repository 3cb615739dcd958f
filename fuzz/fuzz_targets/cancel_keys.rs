//! Cancel keys and the fleet's peer link: `CancelRegistry::lookup` and
//! `lookup_from_peer` on arbitrary CancelRequest packets (any client may
//! send one, no TLS needed), and the peer link's `Hello` and `Request`
//! parsers on arbitrary bytes.
//!
//! Input: the bytes, used three ways. Invariants: nothing panics; only
//! the exact issued key finds its session; a packet of 3.2 length that is
//! not an issued key is never sent on to a peer (its MAC cannot verify);
//! a parsed request re-encodes to the bytes it came from.
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

fuzz_target!(|data: &[u8]| {
    let reg: CancelRegistry<u8> = CancelRegistry::with_scheme(KeyScheme::fleet(3, b"fuzz"));
    let (short, _a) = reg.register(42, 1, false);
    let (long, _b) = reg.register(42, 2, true);
    let issued = [
        packet(42, short.secret.as_bytes()),
        packet(42, long.secret.as_bytes()),
    ];
    let ip: IpAddr = [127, 0, 0, 1].into();
    let now = Instant::now();
    let found = reg.lookup(ip, data, now);
    let from_peer = reg.lookup_from_peer(data);
    let is_issued = issued.iter().any(|p| p.as_slice() == data);
    match (&found, is_issued) {
        (Lookup::Found(_), false) => panic!("a key we did not issue found a session"),
        (Lookup::Found(_), true) | (Lookup::RateLimited, _) => {}
        (_, true) => panic!("an issued key was not found: {found:?}"),
        _ => {}
    }
    if data.len() == 44 && !is_issued {
        assert!(!matches!(found, Lookup::Peer(_)), "an unauthenticated 3.2 key was sent on");
    }
    assert!(!matches!(from_peer, Lookup::Peer(_) | Lookup::RateLimited));

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
