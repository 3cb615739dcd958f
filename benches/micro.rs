//! Micro-benchmarks (criterion): the per-connection and per-message work of
//! the proxy, in memory, without sockets or PostgreSQL.
//! `cargo bench --bench micro`; see benches/README.md for the comparison
//! against PostgreSQL and PgBouncer.

use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pg_tls_proxy::config::{BackendAuth, CertKey, ClientAuth, RuleConfig, Tls, TlsVersion};
use pg_tls_proxy::conn::relay::{relay, Framer, Options};
use pg_tls_proxy::policy::identity::{Identity, IdentityKind};
use pg_tls_proxy::policy::rolemap::RoleMap;
use pg_tls_proxy::wire::parse_packet;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn startup_packet() -> BytesMut {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "app_user"),
        ("database", "app"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = BytesMut::from(&((body.len() + 4) as i32).to_be_bytes()[..]);
    out.extend_from_slice(&body);
    out
}

fn data_rows(n: usize, width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * (width + 11));
    for _ in 0..n {
        out.push(b'D');
        out.extend_from_slice(&((width + 10) as i32).to_be_bytes());
        out.extend_from_slice(&1i16.to_be_bytes());
        out.extend_from_slice(&(width as i32).to_be_bytes());
        out.extend(std::iter::repeat_n(b'x', width));
    }
    out
}

fn rules(n: usize) -> Vec<RuleConfig> {
    (0..n)
        .map(|i| {
            let (identity, pattern, exact, roles) = if i % 2 == 0 {
                (
                    IdentityKind::Cn,
                    None,
                    Some(format!("user{i}")),
                    vec![format!("role{i}")],
                )
            } else {
                (
                    IdentityKind::Uri,
                    Some(format!(
                        r"spiffe://prod\.example\.org/ns/team{i}/sa/([a-z0-9-]+)"
                    )),
                    None,
                    vec![r"\1".to_string(), "readonly".to_string()],
                )
            };
            RuleConfig {
                identity,
                pattern,
                exact,
                roles,
                databases: None,
                backend_auth: BackendAuth::Passthrough,
                replication: Default::default(),
            }
        })
        .collect()
}

fn bench_parsing(c: &mut Criterion) {
    let packet = startup_packet();
    c.bench_function("startup_packet_parse", |b| {
        b.iter_batched(
            || packet.clone(),
            |p| parse_packet(p).expect("valid"),
            BatchSize::SmallInput,
        )
    });
    let rows = data_rows(1000, 100);
    let mut g = c.benchmark_group("relay_header_scan");
    g.throughput(Throughput::Bytes(rows.len() as u64));
    g.bench_function("1000_datarows_of_100_bytes", |b| {
        b.iter(|| {
            let mut f = Framer::default();
            for chunk in rows.chunks(16 * 1024) {
                f.step(chunk, false);
            }
            f.at_boundary()
        })
    });
    g.finish();
}

fn bench_rules(c: &mut Criterion) {
    let id = Identity {
        cn: vec!["workload".into()],
        dn: "CN=workload,O=Acme".into(),
        uris: vec!["spiffe://prod.example.org/ns/team9/sa/web".into()],
        dns: vec!["web.team9.svc".into()],
        ..Identity::default()
    };
    let mut g = c.benchmark_group("role_rules_decide");
    for n in [10, 1000] {
        let map = RoleMap::compile(&rules(n)).expect("rules");
        g.bench_function(format!("{n}_rules_allow"), |b| {
            b.iter(|| map.decide(&id, "web", "app", pg_tls_proxy::wire::Replication::None))
        });
        g.bench_function(format!("{n}_rules_deny"), |b| {
            b.iter(|| map.decide(&id, "admin", "app", pg_tls_proxy::wire::Replication::None))
        });
    }
    g.bench_function("compile_1000_rules", |b| {
        b.iter(|| RoleMap::compile(&rules(1000)).expect("rules"))
    });
    g.finish();
}

/// Drives a client and a server connection to the end of the handshake
/// through memory buffers; returns the time spent in the server's calls.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> std::time::Duration {
    let mut server_time = std::time::Duration::ZERO;
    let mut buf = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("client write");
        }
        let t = std::time::Instant::now();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("server read");
        }
        server.process_new_packets().expect("server");
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).expect("server write");
        }
        server_time += t.elapsed();
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read");
        }
        client.process_new_packets().expect("client");
    }
    // Deliver the session tickets sent after the handshake.
    buf.clear();
    while server.wants_write() {
        server.write_tls(&mut buf).expect("server write");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        client.read_tls(&mut rd).expect("client read");
    }
    client.process_new_packets().expect("client");
    server_time
}

/// The proxy's own server config for `cert` and `key`.
fn server_config(cert: std::path::PathBuf, key: std::path::PathBuf) -> Arc<rustls::ServerConfig> {
    let tls = Tls {
        server: Some(CertKey { cert, key }),
        min_version: TlsVersion::V1_2,
        ..Tls::default()
    };
    pg_tls_proxy::tls::server::build(&tls, &ClientAuth::default())
        .expect("server config")
        .expect("tls on")
        .config
}

/// A client trusting `root`, with or without session resumption.
fn client_config(root: &std::path::Path, resume: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in pg_tls_proxy::tls::pem::certs("root", root).expect("root") {
        roots.add(cert).expect("root");
    }
    let mut cfg = ClientConfig::builder_with_provider(pg_tls_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(cfg)
}

fn bench_tls(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    pg_tls_proxy::cli::devcerts::write(dir.path(), &["localhost".into()], &[], &[])
        .expect("dev certs");
    let server = server_config(dir.path().join("server.crt"), dir.path().join("server.key"));
    let ca = dir.path().join("ca.crt");
    let client = |resume: bool| client_config(&ca, resume);
    let name = || "localhost".try_into().expect("name");
    let mut g = c.benchmark_group("tls_handshake_in_memory");
    let full = client(false);
    g.bench_function("full", |b| {
        b.iter(|| {
            let mut cc = ClientConnection::new(full.clone(), name()).expect("client");
            let mut sc = ServerConnection::new(server.clone()).expect("server");
            handshake(&mut cc, &mut sc);
        })
    });
    let resumed = client(true);
    let mut cc = ClientConnection::new(resumed.clone(), name()).expect("client");
    let mut sc = ServerConnection::new(server.clone()).expect("server");
    handshake(&mut cc, &mut sc);
    g.bench_function("resumed", |b| {
        b.iter(|| {
            let mut cc = ClientConnection::new(resumed.clone(), name()).expect("client");
            let mut sc = ServerConnection::new(server.clone()).expect("server");
            handshake(&mut cc, &mut sc);
            assert_eq!(cc.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        })
    });
    g.finish();
}

/// The server's share of one full TLS 1.3 handshake (X25519, the
/// proxy's rustls config), by server key type: only the time spent in the
/// server's calls is counted, so the client's signature check does not
/// blur it. 1 / this is the full handshakes per second one core can do.
/// Certificates come from `openssl req` (ring cannot generate RSA keys);
/// skipped when openssl is missing.
fn bench_tls_server_key(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kinds: [(&str, &[&str]); 2] = [
        (
            "ecdsa_p256",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        ),
        ("rsa_2048", &["-newkey", "rsa:2048"]),
    ];
    let mut g = c.benchmark_group("tls_full_handshake_server_cpu");
    for (label, key_args) in kinds {
        let (cert, key) = (
            dir.path().join(format!("{label}.crt")),
            dir.path().join(format!("{label}.key")),
        );
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
            ])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(key_args)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("tls_full_handshake_server_cpu/{label}: skipped (openssl req failed)");
            continue;
        }
        let server = server_config(cert.clone(), key);
        let client = client_config(&cert, false);
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut server_time = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let mut cc = ClientConnection::new(
                        client.clone(),
                        "localhost".try_into().expect("name"),
                    )
                    .expect("client");
                    let t = std::time::Instant::now();
                    let mut sc = ServerConnection::new(server.clone()).expect("server");
                    server_time += t.elapsed();
                    server_time += handshake(&mut cc, &mut sc);
                }
                server_time
            })
        });
    }
    g.finish();
}

fn bench_relay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    const TOTAL: usize = 64 * 1024 * 1024;
    let rows = data_rows(TOTAL / 111, 100);
    let mut g = c.benchmark_group("relay_throughput_duplex");
    g.throughput(Throughput::Bytes(rows.len() as u64));
    g.sample_size(10);
    g.bench_function("64MiB_backend_to_client", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
                let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
                let relay = tokio::spawn(async move {
                    relay(&mut client, &mut backend, Options::default()).await
                });
                let data = rows.clone();
                let writer = tokio::spawn(async move {
                    backend_end.write_all(&data).await.expect("write");
                    backend_end.shutdown().await.expect("shutdown");
                    backend_end
                });
                let mut sink = vec![0u8; 64 * 1024];
                let mut got = 0;
                while got < rows.len() {
                    got += client_end.read(&mut sink).await.expect("read");
                }
                client_end.shutdown().await.expect("shutdown");
                drop(writer.await.expect("writer"));
                relay.await.expect("join").expect("relay")
            })
        })
    });
    g.finish();
}

/// The relay's per-message path: one small query in and one small answer
/// out through `relay`, over in-memory pipes on one current-thread runtime
/// (as a session thread runs it). No sockets and no TLS: what is measured
/// is the relay's own work per round trip (buffers, framing, polling).
fn bench_relay_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut query = vec![b'Q'];
    query.extend_from_slice(&13i32.to_be_bytes());
    query.extend_from_slice(b"SELECT 1;\0");
    let mut answer = data_rows(1, 40);
    answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    let mut g = c.benchmark_group("relay_round_trip_duplex");
    g.bench_function("query_and_answer", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
                let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
                let relay = tokio::spawn(async move {
                    relay(&mut client, &mut backend, Options::default()).await
                });
                let (mut q, mut a) = (vec![0u8; query.len()], vec![0u8; answer.len()]);
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    client_end.write_all(&query).await.expect("query");
                    backend_end.read_exact(&mut q).await.expect("relayed query");
                    backend_end.write_all(&answer).await.expect("answer");
                    client_end.read_exact(&mut a).await.expect("relayed answer");
                }
                let took = started.elapsed();
                drop((client_end, backend_end));
                let _ = relay.await;
                took
            })
        })
    });
    g.finish();
}

/// The SCRAM work of one terminated login: one exchange between the
/// proxy's server side (the client's leg: nonce, proof check, signature)
/// and the proxy's client side (the backend's leg: proof from the
/// ClientKey, signature check). No PBKDF2 on either side, as in the
/// proxy. Everything the proxy computes for a password login besides TLS
/// and I/O.
fn bench_scram(c: &mut Criterion) {
    use pg_tls_proxy::policy::scram::client::{Binding, ClientExchange};
    use pg_tls_proxy::policy::scram::server::{Finished, ServerExchange};
    use pg_tls_proxy::policy::scram::{Verifier, SCRAM_SHA_256_PLUS};
    let verifier = Verifier::from_password(b"secret", b"0123456789abcdef", 4096);
    let mock = Verifier::mock("alice", b"mock");
    let hash = vec![7u8; 32];
    // A ClientKey, recovered once the way the proxy recovers it.
    let key = {
        let mut s = ServerExchange::new(Some(verifier.clone()), mock.clone(), None);
        let mut client = postgres_protocol::authentication::sasl::ScramSha256::new(
            b"secret",
            postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
        );
        let first = s.first("SCRAM-SHA-256", client.message()).expect("first");
        client.update(first.as_bytes()).expect("update");
        match s.finish(client.message()).expect("finish") {
            Finished::Verified(v) => v.client_key,
            Finished::Failed => panic!("refused"),
        }
    };
    let mut g = c.benchmark_group("scram");
    g.bench_function("one terminated login (client leg + backend leg)", |b| {
        b.iter(|| {
            let mut server =
                ServerExchange::new(Some(verifier.clone()), mock.clone(), Some(hash.clone()));
            let (mut client, mechanism, first) =
                ClientExchange::start(&key, &verifier, Binding::Plus(hash.clone()));
            assert_eq!(mechanism, SCRAM_SHA_256_PLUS);
            let sf = server.first(mechanism, first.as_bytes()).expect("first");
            let cf = client.respond(sf.as_bytes()).expect("respond");
            match server.finish(cf.as_bytes()).expect("finish") {
                Finished::Verified(v) => client.verify(v.server_final.as_bytes()).expect("verify"),
                Finished::Failed => panic!("refused"),
            }
        })
    });
    g.finish();
}

/// Route selection with 10,000 routes (`[[routes]]`): 9,000 exact names
/// and 1,000 wildcards; an exact hit, a wildcard hit (one lowercase
/// allocation-free lookup each), a miss, and a mixed-case name.
fn bench_routes(c: &mut Criterion) {
    use pg_tls_proxy::runtime::Routes;
    let mut routes: Routes<u32> = Routes::default();
    for i in 0..10_000u32 {
        let name = if i < 9_000 {
            format!("db{i}.tenants.example.test")
        } else {
            format!("*.shard{i}.example.test")
        };
        routes.add(&format!("r{i}"), i, &[name], &[]);
    }
    let mut g = c.benchmark_group("route_select_10k");
    for (label, sni) in [
        ("exact", "db4321.tenants.example.test"),
        ("wildcard", "eu.shard9876.example.test"),
        ("miss", "nothing.example.test"),
        ("mixed_case", "DB4321.Tenants.example.test"),
    ] {
        g.bench_function(label, |b| {
            b.iter(|| std::hint::black_box(routes.for_server_name(std::hint::black_box(sni))))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_parsing,
    bench_rules,
    bench_tls,
    bench_tls_server_key,
    bench_relay,
    bench_relay_round_trip,
    bench_scram,
    bench_routes
);
criterion_main!(benches);
