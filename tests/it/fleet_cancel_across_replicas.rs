//! Cancels across a fleet of replicas (`[fleet]`), against a real
//! PostgreSQL: a CancelRequest that reaches a replica other than the one
//! holding the session is sent on to it over the mTLS peer link and
//! cancels the right query, for protocol 3.0 keys (tokio-postgres's
//! plaintext cancel) and 3.2 keys (a raw 3.2 session); a forged 3.2 key is
//! dropped by the first replica, a forged 3.0 key is sent on and cancels
//! nothing; a replica whose id is taken refuses to start, and one that
//! met the earlier holder only later turns unready; the peer listener
//! refuses certificates the fleet's CA did not sign.

use std::time::Duration;

use pg_tls_proxy::app;
use pg_tls_proxy::config::{Config, Fleet, ReplicaId, SecretSource};
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::client::{
    error_fields, http, query_message, read_until_ready, startup_message_version, tls_client,
    tls_session, tokio_pg,
};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use crate::common::{free_port, write_file};

struct FleetFiles {
    pki: Pki,
    cert: crate::common::pki::CertFiles,
    key_file: std::path::PathBuf,
}

fn fleet_config(base: &Config, f: &FleetFiles, id: u8, listen: u16, peers: &[u16]) -> Config {
    let mut c = base.clone();
    c.fleet = Some(Fleet {
        replica_id: ReplicaId::Fixed(id),
        listen: format!("127.0.0.1:{listen}"),
        peers: peers.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        cert: f.cert.chain.clone(),
        key: f.cert.key.clone(),
        ca: vec![f.pki.root_cert.clone()],
        server_name: Some("replica.fleet.test".into()),
        cancel_key: Some(SecretSource::File(f.key_file.clone())),
        // Generous on a busy machine: the start-up probes must answer in
        // time, and no periodic refresh may meet a replica the test starts
        // later before the test looks.
        timeout: Duration::from_secs(10),
        refresh_interval: Duration::from_secs(3600),
        ..Fleet::default()
    });
    c
}

/// The CancelRequest for a key (pid + secret as BackendKeyData carries them).
fn cancel_packet(key: &[u8]) -> Vec<u8> {
    let mut p = ((12 + key.len() - 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&80877102i32.to_be_bytes());
    p.extend_from_slice(key);
    p
}

/// Sends a plaintext CancelRequest and waits until the replica closes.
async fn send_cancel(addr: std::net::SocketAddr, packet: &[u8]) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(packet).await.expect("cancel");
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "a CancelRequest gets no reply");
}

async fn wait_for(proxy: &TestProxy, series: &str, value: f64) {
    for _ in 0..200 {
        if proxy.metric(series) >= value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{series} never reached {value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_the_replica_that_issued_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let fleet_dir = dir.path().join("fleet");
    std::fs::create_dir_all(&fleet_dir).expect("dir");
    let fleet_pki = Pki::generate_named(&fleet_dir, "fleet");
    let files = FleetFiles {
        cert: fleet_pki.issue_peer("replica", &["replica.fleet.test"]),
        pki: fleet_pki,
        key_file: write_file(
            &dir.path().join("cancel-key"),
            "0123456789abcdef0123456789abcdef-shared\n",
            0o600,
            false,
        ),
    };
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let base = config(&pki, &pg.address());
    let (pa, pb, pe) = (free_port(), free_port(), free_port());
    // A starts alone (B is not up yet) and learns B when a key names it.
    let a = TestProxy::start(fleet_config(&base, &files, 1, pa, &[pa, pb, pe])).await;
    let b = TestProxy::start(fleet_config(&base, &files, 2, pb, &[pa, pb, pe])).await;
    assert_eq!(b.metric("pgtls_fleet_peers"), 1.0, "B found A at start");
    assert_eq!(b.metric(r#"pgtls_fleet_probes_total{result="self"}"#), 1.0);
    assert_eq!(b.metric(r#"pgtls_fleet_info{replica_id="2"}"#), 1.0);

    // Protocol 3.0: tokio-postgres on B (over TLS: `prefer`), its cancel
    // to A in plaintext, as libpq's PQcancel sends it.
    let conn = format!(
        "host=localhost port={} user=bob dbname=postgres sslmode=prefer",
        b.port()
    );
    let client = tokio_pg(&conn, &pki.root_cert)
        .await
        .expect("connect through B");
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    pg.wait_active("SELECT pg_sleep(30)").await;
    let tcp = TcpStream::connect(a.addr).await.expect("connect A");
    token
        .cancel_query_raw(tcp, tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled in time")
        .expect("join")
        .expect_err("cancelled");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    assert_eq!(
        a.metric_when(r#"pgtls_cancel_requests_total{result="peer"}"#, 1.0)
            .await,
        1.0
    );
    assert_eq!(
        a.metric_when(
            r#"pgtls_cancel_peer_total{direction="sent",result="delivered"}"#,
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(a.metric("pgtls_fleet_peers"), 1.0, "A learned B on demand");
    wait_for(
        &b,
        r#"pgtls_cancel_peer_total{direction="received",result="forwarded"}"#,
        1.0,
    )
    .await;

    // Protocol 3.2: a raw session on A with a 32-byte key, cancelled through B.
    let mut tls = tls_session(a.addr, &pki.root_cert).await;
    tls.write_all(&startup_message_version(
        196610,
        &[("user", "bob"), ("database", "postgres")],
    ))
    .await
    .expect("startup");
    let msgs = read_until_ready(&mut tls).await.expect("ready");
    assert!(
        msgs.iter().all(|(t, _)| *t != b'v'),
        "3.2 is accepted as it is"
    );
    let key = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData")
        .1
        .clone();
    assert_eq!(key.len(), 36);
    let packet = cancel_packet(&key);

    // A forged 3.2 key (one MAC bit) is dropped by B, never sent on.
    tls.write_all(&query_message("SELECT pg_sleep(1.5)"))
        .await
        .expect("query");
    pg.wait_active("SELECT pg_sleep(1.5)").await;
    let mut forged = packet.clone();
    forged[43] ^= 1;
    send_cancel(b.addr, &forged).await;
    assert_eq!(
        b.metric_when(r#"pgtls_cancel_requests_total{result="forged"}"#, 1.0)
            .await,
        1.0
    );
    assert_eq!(
        b.metric(r#"pgtls_cancel_peer_total{direction="sent",result="delivered"}"#),
        0.0
    );
    // A forged 3.0 key for A's pid is sent on and cancels nothing there.
    let mut forged30 = key[..8].to_vec();
    forged30[4] = (1 << 2) | (forged30[4] & 3);
    forged30[7] ^= 0x5a;
    send_cancel(b.addr, &cancel_packet(&forged30)).await;
    wait_for(
        &a,
        r#"pgtls_cancel_peer_total{direction="received",result="unknown"}"#,
        1.0,
    )
    .await;
    let done = read_until_ready(&mut tls).await.expect("query ends");
    assert!(
        done.iter().all(|(t, _)| *t != b'E'),
        "forged keys cancelled nothing: {:?}",
        done.iter()
            .find(|(t, _)| *t == b'E')
            .map(|(_, b)| error_fields(b))
    );

    // The real key, sent to B, cancels A's query.
    tls.write_all(&query_message("SELECT pg_sleep(30)"))
        .await
        .expect("query");
    pg.wait_active("SELECT pg_sleep(30)").await;
    send_cancel(b.addr, &packet).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), read_until_ready(&mut tls))
        .await
        .expect("cancelled in time")
        .expect("answer");
    let (_, body) = answer
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("ErrorResponse");
    assert_eq!(error_fields(body)[&'C'], "57014");
    assert_eq!(
        b.metric_when(r#"pgtls_cancel_requests_total{result="peer"}"#, 2.0)
            .await,
        2.0
    );
    wait_for(
        &a,
        r#"pgtls_cancel_peer_total{direction="received",result="forwarded"}"#,
        1.0,
    )
    .await;

    // A replica with a taken id refuses to start.
    let pc = free_port();
    let registry = Registry::new();
    let err = match app::start(fleet_config(&base, &files, 1, pc, &[pa, pc]), &registry).await {
        Ok(_) => panic!("a duplicate replica id must refuse the start"),
        Err(e) => e,
    };
    assert_eq!(err.exit_code(), 64);
    assert!(
        err.to_string().contains("replica id 1 is already taken"),
        "{err}"
    );
    wait_for(&a, r#"pgtls_fleet_probes_total{result="duplicate"}"#, 1.0).await;

    // A later replica with a taken id that met nobody at start (its list
    // has only itself) turns unready once the earlier one finds it: a key
    // naming an unknown replica makes A look again.
    let e = TestProxy::start(fleet_config(&base, &files, 1, pe, &[pe])).await;
    let (status, _) = http("GET", &format!("{}/ready", e.admin_url())).await;
    assert_eq!(status, 200, "E met nobody yet");
    let mut unknown = key[..8].to_vec();
    unknown[4] = 9 << 2;
    send_cancel(a.addr, &cancel_packet(&unknown)).await;
    wait_for(&a, r#"pgtls_fleet_probes_total{result="duplicate"}"#, 2.0).await;
    // E learns it when it reads A's hello, on its own peer connection.
    let mut answer = (0, String::new());
    for _ in 0..100 {
        answer = http("GET", &format!("{}/ready", e.admin_url())).await;
        if answer.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = answer;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("replica id 1 belongs to an earlier replica"),
        "{body}"
    );
    let (status, _) = http("GET", &format!("{}/ready", a.admin_url())).await;
    assert_eq!(status, 200, "the earlier replica keeps serving");

    // A replica on another cancel key says so (its 3.2 keys would be
    // dropped as forged by the others), and still joins for 3.0 keys.
    let other_key = write_file(
        &dir.path().join("other-key"),
        "another key, 32 characters at least",
        0o600,
        false,
    );
    let pf = free_port();
    let mut c = fleet_config(&base, &files, 4, pf, &[pa, pf]);
    if let Some(f) = c.fleet.as_mut() {
        f.cancel_key = Some(SecretSource::File(other_key));
    }
    let f = TestProxy::start(c).await;
    assert_eq!(
        f.metric_when(r#"pgtls_fleet_probes_total{result="key_mismatch"}"#, 1.0)
            .await,
        1.0
    );
    assert_eq!(f.metric("pgtls_fleet_peers"), 1.0);

    // A replica certificate the peers could not verify is a start-up
    // error, not cancels lost in silence.
    let mut c = fleet_config(&base, &files, 5, free_port(), &[pa]);
    if let Some(f) = c.fleet.as_mut() {
        f.server_name = Some("not-the-certificates-name.test".into());
    }
    let err = match app::start(c, &Registry::new()).await {
        Ok(_) => panic!("a certificate without the fleet's name must refuse the start"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("fleet.cert") && err.contains("fleet.server_name"),
        "{err}"
    );

    // The peer listener wants a certificate from the fleet's CA: none, or
    // one from another CA, is refused at the handshake.
    let before = a.metric(r#"pgtls_cancel_peer_total{direction="received",result="refused"}"#);
    let stranger = pki.issue_client("replica.fleet.test");
    for cert in [None, Some(&stranger)] {
        let config = match cert {
            None => tls_client(&files.pki.root_cert, &[b"pgtls-peer/1"]),
            Some(c) => crate::common::client::mtls_client(&files.pki.root_cert, c),
        };
        let tcp = TcpStream::connect(("127.0.0.1", pa))
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("replica.fleet.test").expect("name");
        if let Ok(mut link) = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
        {
            let mut buf = [0u8; 64];
            let read = link.read(&mut buf).await;
            assert!(!matches!(read, Ok(n) if n > 0), "no hello for a stranger");
        }
    }
    wait_for(
        &a,
        r#"pgtls_cancel_peer_total{direction="received",result="refused"}"#,
        before + 2.0,
    )
    .await;
    drop((a, b, e, f));
}
