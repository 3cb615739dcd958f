//! SCRAM both ways against postgres-protocol's client (what
//! tokio-postgres runs), PostgreSQL's parser rules, and random input.

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::client::{BackendScramError, Binding, ClientExchange};
use super::server::{Finished, ServerExchange};
use super::*;

const SECRET: &[u8] = b"mock secret";

fn verifier(password: &str) -> Verifier {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
        .parse()
        .expect("postgres-protocol's verifier parses")
}

/// A full exchange with a real client implementation; the result and
/// the server-final-message the client accepted (if any).
fn exchange(v: Option<Verifier>, password: &str, end_point: Option<Vec<u8>>, client_cb: ChannelBinding, plus: bool) -> Result<Finished, ScramError> {
    let mut server = ServerExchange::new(v, Verifier::mock("alice", SECRET), end_point);
    let mut client = ScramSha256::new(password.as_bytes(), client_cb);
    let mechanism = if plus { SCRAM_SHA_256_PLUS } else { SCRAM_SHA_256 };
    let server_first = server.first(mechanism, client.message())?;
    client.update(server_first.as_bytes()).expect("client accepts server-first");
    let finished = server.finish(client.message())?;
    if let Finished::Verified(v) = &finished {
        client
            .finish(v.server_final.as_bytes())
            .expect("the client accepts our server signature");
    }
    Ok(finished)
}

#[test]
fn verifiers_parse_and_print() {
    let v = verifier("pw");
    assert_eq!(v.to_string().parse::<Verifier>().expect("round trip"), v);
    assert_eq!(v.iterations, 4096);
    assert!(!format!("{v:?}").contains(&B64.encode(v.stored_key)), "Debug hides keys");
    assert_eq!("md5".to_string() + &"0".repeat(32), "md5".to_string() + &"0".repeat(32));
    assert_eq!(("md5".to_string() + &"a".repeat(32)).parse::<Verifier>(), Err(VerifierError::Md5));
    assert_eq!("hunter2".parse::<Verifier>(), Err(VerifierError::NotScram));
    for bad in [
        "SCRAM-SHA-256$",
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
        "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
    ] {
        assert!(matches!(bad.parse::<Verifier>(), Err(VerifierError::Malformed(_))), "{bad}");
    }
    let p = Verifier::from_password(b"pw", &v.salt, 4096);
    assert_eq!(p, v, "the same keys as PostgreSQL's");
}

#[test]
fn right_password_verifies_with_and_without_binding() {
    let hash = vec![7u8; 32];
    for (end_point, cb, plus) in [
        (None, ChannelBinding::unsupported(), false),
        (None, ChannelBinding::unrequested(), false),
        (Some(hash.clone()), ChannelBinding::tls_server_end_point(hash.clone()), true),
        (Some(hash.clone()), ChannelBinding::unsupported(), false),
    ] {
        match exchange(Some(verifier("pw")), "pw", end_point, cb, plus).expect("exchange") {
            Finished::Verified(v) => assert_eq!(v.plus, plus),
            Finished::Failed => panic!("refused the right password"),
        }
    }
}

#[test]
fn wrong_password_and_unknown_user_fail_alike() {
    let wrong = exchange(Some(verifier("pw")), "nope", None, ChannelBinding::unsupported(), false).expect("exchange");
    assert!(matches!(wrong, Finished::Failed));
    let unknown = exchange(None, "pw", None, ChannelBinding::unsupported(), false).expect("exchange");
    assert!(matches!(unknown, Finished::Failed));
    // A mock verifier is stable per user and looks like a real one.
    let m = Verifier::mock("bob", SECRET);
    assert_eq!(m, Verifier::mock("bob", SECRET));
    assert_ne!(m.salt, Verifier::mock("carol", SECRET).salt);
    assert_ne!(m.salt, Verifier::mock("bob", b"other").salt);
    assert_eq!((m.salt.len(), m.iterations), (16, 4096));
}

#[test]
fn postgresql_parser_rules() {
    let hash = vec![1u8; 32];
    let first = |end_point: Option<Vec<u8>>, mech: &str, msg: &str| {
        ServerExchange::new(Some(verifier("pw")), Verifier::mock("a", SECRET), end_point).first(mech, msg.as_bytes())
    };
    let tls = || Some(hash.clone());
    assert_eq!(first(tls(), SCRAM_SHA_256, "y,,n=,r=abc"), Err(ScramError::Downgrade));
    assert!(first(None, SCRAM_SHA_256, "y,,n=,r=abc").is_ok(), "y is fine where -PLUS was not offered");
    assert_eq!(first(None, SCRAM_SHA_256_PLUS, "p=tls-server-end-point,,n=,r=abc"), Err(ScramError::InvalidMechanism));
    assert!(matches!(first(tls(), SCRAM_SHA_256, "p=tls-server-end-point,,n=,r=abc"), Err(ScramError::Malformed(_))));
    assert!(matches!(first(tls(), SCRAM_SHA_256_PLUS, "n,,n=,r=abc"), Err(ScramError::Malformed(_))));
    assert_eq!(first(tls(), SCRAM_SHA_256_PLUS, "p=tls-unique,,n=,r=abc"), Err(ScramError::BindingType("tls-unique".into())));
    assert_eq!(first(None, SCRAM_SHA_256, "n,a=bob,n=,r=abc"), Err(ScramError::AuthzId));
    assert_eq!(first(None, SCRAM_SHA_256, "n,,m=x,n=,r=abc"), Err(ScramError::Extension));
    assert_eq!(first(None, SCRAM_SHA_256, "n,,n=,r=a\u{7f}c"), Err(ScramError::NonPrintableNonce));
    assert_eq!(first(None, "PLAIN", "n,,n=,r=abc"), Err(ScramError::InvalidMechanism));
    assert!(matches!(first(None, SCRAM_SHA_256, "x,,n=,r=abc"), Err(ScramError::Malformed(_))));
    assert!(matches!(first(None, SCRAM_SHA_256, "n,,r=abc"), Err(ScramError::Malformed(_))));

    // A binding for another certificate, and a nonce not ours.
    let mut s = ServerExchange::new(Some(verifier("pw")), Verifier::mock("a", SECRET), tls());
    let mut c = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![2u8; 32]));
    let sf = s.first(SCRAM_SHA_256_PLUS, c.message()).expect("first");
    c.update(sf.as_bytes()).expect("update");
    assert_eq!(s.finish(c.message()).expect_err("wrong binding"), ScramError::BindingCheck);

    let mut s = ServerExchange::new(Some(verifier("pw")), Verifier::mock("a", SECRET), None);
    let sf = s.first(SCRAM_SHA_256, b"n,,n=,r=abc").expect("first");
    let nonce = &sf[2..sf.find(',').expect("comma")];
    let proof = B64.encode([0u8; 32]);
    let err = s.finish(format!("c=biws,r={nonce}x,p={proof}").as_bytes()).expect_err("bad nonce");
    assert_eq!(err, ScramError::Malformed("Nonce does not match.".into()));
    let err = s.finish(b"c=biws,r=x,p=AAAA").expect_err("not started");
    assert!(matches!(err, ScramError::Malformed(_)));

    // Each error maps to PostgreSQL's SQLSTATE.
    assert_eq!(ScramError::Downgrade.client_error().sqlstate, "28000");
    assert_eq!(ScramError::BindingCheck.client_error().sqlstate, "28000");
    assert_eq!(ScramError::AuthzId.client_error().sqlstate, "0A000");
    assert_eq!(ScramError::malformed("x").client_error().sqlstate, "08P01");
}

/// The backend leg proves the recovered ClientKey to a server that holds
/// the same verifier, and checks its signature.
#[test]
fn client_key_logs_in_to_a_server_with_the_verifier() {
    let v = verifier("pw");
    let key = match exchange(Some(v.clone()), "pw", None, ChannelBinding::unsupported(), false).expect("exchange") {
        Finished::Verified(verified) => verified.client_key,
        Finished::Failed => panic!("refused"),
    };
    let hash = vec![9u8; 32];
    for (binding, end_point, mech) in [
        (Binding::None, None, SCRAM_SHA_256),
        (Binding::Plus(hash.clone()), Some(hash.clone()), SCRAM_SHA_256_PLUS),
    ] {
        let mut backend = ServerExchange::new(Some(v.clone()), Verifier::mock("a", SECRET), end_point);
        let (mut c, mechanism, first) = ClientExchange::start(&key, &v, binding);
        assert_eq!(mechanism, mech);
        let sf = backend.first(mechanism, first.as_bytes()).expect("first");
        let cf = c.respond(sf.as_bytes()).expect("respond");
        let Finished::Verified(done) = backend.finish(cf.as_bytes()).expect("finish") else {
            panic!("backend refused the recovered key");
        };
        c.verify(done.server_final.as_bytes()).expect("server signature");
        assert_eq!(c.verify(b"v=AAAA"), Err(BackendScramError::BadServerSignature));
    }
    // Iteration counts are RFC 5802 posit-numbers: no sign, no leading zero.
    for bad in ["04096", "+4096", "4096x", ""] {
        let (mut c, _, first) = ClientExchange::start(&key, &v, Binding::None);
        let nonce = &first[first.find("r=").expect("r=") + 2..];
        let sf = format!("r={nonce}xyz,s={},i={bad}", B64.encode(&v.salt));
        assert_eq!(c.respond(sf.as_bytes()), Err(BackendScramError::Malformed("iteration count")), "{bad:?}");
    }
    // Another salt or iteration count: stop before any proof.
    let other = verifier("pw");
    let mut backend = ServerExchange::new(Some(other), Verifier::mock("a", SECRET), None);
    let (mut c, mechanism, first) = ClientExchange::start(&key, &v, Binding::None);
    let sf = backend.first(mechanism, first.as_bytes()).expect("first");
    assert!(matches!(c.respond(sf.as_bytes()), Err(BackendScramError::VerifierMismatch { .. })));
}

/// Random and mutated messages never panic, and never verify.
#[test]
fn random_input_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let good = "n,,n=,r=abcdefghijklmnop";
    for i in 0..20_000 {
        let mut s = ServerExchange::new(Some(verifier_cached()), Verifier::mock("a", SECRET), (i % 2 == 0).then(|| vec![3u8; 32]));
        let mut first = good.as_bytes().to_vec();
        for _ in 0..rng.random_range(0..4) {
            let at = rng.random_range(0..first.len());
            first[at] = rng.random();
        }
        let mech = if rng.random_bool(0.5) { SCRAM_SHA_256 } else { SCRAM_SHA_256_PLUS };
        if let Ok(sf) = s.first(mech, &first) {
            let nonce = sf[2..].split(',').next().unwrap_or_default().to_string();
            let mut fin = format!("c=biws,r={nonce},p={}", B64.encode([0u8; 32])).into_bytes();
            for _ in 0..rng.random_range(0..4) {
                let at = rng.random_range(0..fin.len());
                fin[at] = rng.random();
            }
            if let Ok(Finished::Verified(_)) = s.finish(&fin) {
                panic!("a random proof verified");
            }
        }
    }
}

fn verifier_cached() -> Verifier {
    static V: std::sync::OnceLock<Verifier> = std::sync::OnceLock::new();
    V.get_or_init(|| verifier("pw")).clone()
}

