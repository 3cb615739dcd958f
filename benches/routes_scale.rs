//! `[[routes]]` at scale: generates N routes (default 10,000; `ROUTES=N`),
//! each with its own ECDSA P-256 certificate and backend, loads them as
//! the proxy does (`Runtime::build`: parse, check, build a rustls
//! `ServerConfig` per route) and reports the load time and the memory per
//! route (RSS before and after, from /proc/self/statm).
//!
//!     cargo bench --bench routes_scale            # release build
//!     ROUTES=1000 cargo bench --bench routes_scale

use std::time::Instant;

use pg_tls_proxy::config::Config;
use pg_tls_proxy::runtime::Runtime;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn main() {
    // `cargo bench` passes --bench; nothing else is read from the command line.
    let n: usize = std::env::var("ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut toml = format!(
        "[tls]\ncert = \"{d}/default.crt\"\nkey = \"{d}/default.key\"\n",
        d = dir.path().display()
    );
    let write = |name: &str, sans: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(sans)
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        std::fs::write(dir.path().join(format!("{name}.crt")), cert.pem() + &ca_pem).expect("crt");
        std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).expect("key");
    };
    write("default", vec!["localhost".into()]);
    for i in 0..n {
        let sni = format!("db{i}.tenants.example.test");
        write(&format!("r{i}"), vec![sni.clone()]);
        toml.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nserver_names = [\"{sni}\"]\ncert = \"{d}/r{i}.crt\"\nkey = \"{d}/r{i}.key\"\n[routes.backend]\naddress = \"10.0.{}.{}:5432\"\n",
            i / 250,
            i % 250,
            d = dir.path().display()
        ));
    }
    let generated = started.elapsed();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &toml).expect("config");

    let before = rss_kib();
    let t = Instant::now();
    let config = Config::load(Some(&path)).expect("config loads");
    let parsed = t.elapsed();
    let runtime = Runtime::build(&config).expect("routes build");
    let built = t.elapsed();
    let after = rss_kib();
    assert_eq!(runtime.routes.len(), n);
    println!(
        "routes: {n} (certificates generated in {:.1} s)",
        generated.as_secs_f64()
    );
    println!(
        "load: {:.2} s (TOML parse and checks {:.2} s, certificates, keys and rustls configs {:.2} s)",
        built.as_secs_f64(),
        parsed.as_secs_f64(),
        (built - parsed).as_secs_f64()
    );
    println!(
        "memory: {} KiB RSS for the routes, {:.1} KiB per route (config, certificate chain, key, ServerConfig, connector, indexes)",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / n as f64
    );
    drop(runtime);
}
