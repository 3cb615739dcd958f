//! Client (and backend) certificates: `identity::Identity::from_der` and
//! `tls::end_point` on arbitrary DER. Certificates
//! reach these only after rustls verified them, but a CA may sign odd
//! subjects, and `explain` parses a certificate file as given.
//!
//! Input: the DER bytes, nothing in front.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::policy::identity::{Identity, IdentityKind};

fuzz_target!(|der: &[u8]| {
    if let Some(hash) = pg_tls_proxy::tls::end_point(der) {
        assert!(
            matches!(hash.len(), 32 | 48 | 64),
            "hash of {} bytes",
            hash.len()
        );
    }
    let Ok(id) = Identity::from_der(der) else {
        return;
    };
    assert!(id.cn.len() <= 1, "only the first CN counts");
    for kind in IdentityKind::ALL {
        for value in id.values(kind) {
            let _ = value.len();
        }
    }
    assert_eq!(id.values(IdentityKind::Dn), std::slice::from_ref(&id.dn));
    let name = id.display_name();
    assert!(id.cn.first().map_or(name == id.dn, |cn| name == cn));
    for ip in &id.ips {
        ip.parse::<std::net::IpAddr>()
            .expect("SAN IPs are 4 or 16 bytes");
    }
    let shown = id.to_string();
    assert!(shown.lines().count() >= 1);
});
