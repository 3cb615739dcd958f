//! `pg-tls-proxy dev-certs`: a throwaway CA, a server certificate and client
//! certificates, for development and demos only. The CA key is written so
//! more certificates can be issued; nothing here is fit for production.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const LABEL: &str = "pg-tls-proxy DEVELOPMENT ONLY";
const VALID_DAYS: i64 = 365;

/// The files written, for the summary.
pub struct Written {
    pub files: Vec<PathBuf>,
}

pub fn write(out: &Path, hosts: &[String], clients: &[String]) -> anyhow::Result<Written> {
    fs::create_dir_all(out)?;
    let mut files = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, format!("{LABEL} CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(VALID_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    files.push(save(out, "ca.crt", &ca_cert.pem(), false)?);
    files.push(save(out, "ca.key", &ca_key.serialize_pem(), true)?);
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(Vec::<String>::new())?;
    let first = hosts.first().map(String::as_str).unwrap_or("localhost");
    // Most general first, so the RFC 4514 form reads CN=...,O=...
    server.distinguished_name = rcgen::DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::OrganizationName, LABEL);
    server.distinguished_name.push(DnType::CommonName, first);
    server.use_authority_key_identifier_extension = true;
    server.subject_alt_names = hosts.iter().map(|h| san(h)).collect::<Result<_, _>>()?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = now - time::Duration::days(1);
    server.not_after = now + time::Duration::days(VALID_DAYS);
    let server_cert = server.signed_by(&server_key, &issuer)?;
    files.push(save(out, "server.crt", &server_cert.pem(), false)?);
    files.push(save(out, "server.key", &server_key.serialize_pem(), true)?);

    for name in clients {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, LABEL);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(VALID_DAYS);
        let cert = params.signed_by(&key, &issuer)?;
        let stem = format!("client-{}", sanitize(name));
        files.push(save(out, &format!("{stem}.crt"), &cert.pem(), false)?);
        files.push(save(
            out,
            &format!("{stem}.key"),
            &key.serialize_pem(),
            true,
        )?);
    }
    Ok(Written { files })
}

fn san(host: &str) -> anyhow::Result<SanType> {
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(host.try_into()?),
    })
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn save(dir: &Path, name: &str, contents: &str, secret: bool) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)?;
    file.write_all(contents.as_bytes())?;
    Ok(path)
}

/// `pg-tls-proxy dev-certs`.
pub fn command(out: PathBuf, mut hosts: Vec<String>, clients: Vec<String>) -> ExitCode {
    if hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into()];
    }
    match write(&out, &hosts, &clients) {
        Ok(written) => {
            out!("DEVELOPMENT ONLY: throwaway certificates, never use them in production.");
            for f in written.files {
                out!("  wrote {}", f.display());
            }
            out!("server names: {}", hosts.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pg-tls-proxy dev-certs: {e}");
            ExitCode::FAILURE
        }
    }
}
