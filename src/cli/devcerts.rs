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

pub fn write(
    out: &Path,
    hosts: &[String],
    clients: &[String],
    peers: &[String],
) -> anyhow::Result<Written> {
    fs::create_dir_all(out)?;
    let mut files = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    let issuer = ca(out, "ca", &format!("{LABEL} CA"), &mut files)?;

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
        let params = leaf(name, &[], &[ExtendedKeyUsagePurpose::ClientAuth])?;
        files.extend(issue(
            out,
            &format!("client-{}", sanitize(name)),
            params,
            &issuer,
        )?);
    }
    // The fleet gets its own CA: any certificate it signs may send cancels.
    if !peers.is_empty() {
        let fleet = ca(out, "fleet-ca", &format!("{LABEL} fleet CA"), &mut files)?;
        for name in peers {
            // Presented in both directions of the peer link.
            let usages = [
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let params = leaf(name, &[san(name)?], &usages)?;
            files.extend(issue(
                out,
                &format!("peer-{}", sanitize(name)),
                params,
                &fleet,
            )?);
        }
    }
    Ok(Written { files })
}

/// A leaf's parameters: CN `name` (O the development label), SANs, usages.
fn leaf(
    name: &str,
    sans: &[SanType],
    usages: &[ExtendedKeyUsagePurpose],
) -> anyhow::Result<CertificateParams> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, LABEL);
    params.subject_alt_names = sans.to_vec();
    params.extended_key_usages = usages.to_vec();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
    Ok(params)
}

/// Signs a leaf with a fresh key; writes `<stem>.crt` and `<stem>.key`.
fn issue(
    out: &Path,
    stem: &str,
    params: CertificateParams,
    issuer: &Issuer<'static, KeyPair>,
) -> anyhow::Result<[PathBuf; 2]> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok([
        save(out, &format!("{stem}.crt"), &cert.pem(), false)?,
        save(out, &format!("{stem}.key"), &key.serialize_pem(), true)?,
    ])
}

/// A self-signed CA, written as `<stem>.crt` and `<stem>.key`.
fn ca(
    out: &Path,
    stem: &str,
    name: &str,
    files: &mut Vec<PathBuf>,
) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
    let cert = params.self_signed(&key)?;
    files.push(save(out, &format!("{stem}.crt"), &cert.pem(), false)?);
    files.push(save(
        out,
        &format!("{stem}.key"),
        &key.serialize_pem(),
        true,
    )?);
    Ok(Issuer::new(params, key))
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
pub fn command(
    out: PathBuf,
    mut hosts: Vec<String>,
    clients: Vec<String>,
    peers: Vec<String>,
) -> ExitCode {
    if hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into()];
    }
    match write(&out, &hosts, &clients, &peers) {
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
