//! A throwaway test PKI: root CA -> intermediate CA -> leaf certificates.
//!
//! Everything is generated with rcgen (ECDSA P-256) and written as PEM into a
//! caller-chosen directory, because the proxy, PostgreSQL and libpq all read
//! certificates from files. The CA keys stay in memory so tests can issue
//! more leaves (expired, other SANs, chosen serials, ...) and sign CRLs.
//!
//! Serial numbers: root 1, intermediate 2, leaves from a counter starting at
//! 100 (reported in [`CertFiles::serial`]) so revocation tests know what to
//! put in a CRL. Certificates and CRLs are mode 0644, keys 0600.

use std::net::IpAddr;
use std::ops::{Add, Sub};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

use super::write_file;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// `SystemTime` -> rcgen's timestamp type. A macro because that type lives
/// in the `time` crate, which rcgen does not re-export and we don't depend
/// on; [`offset_from`] lets the compiler infer it from `date_time_ymd`.
macro_rules! asn1_time {
    ($t:expr) => {
        offset_from(rcgen::date_time_ymd(1970, 1, 1), $t)
    };
}

/// Files of one issued leaf certificate.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The leaf certificate alone (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
    /// Leaf followed by the intermediate CA: what a peer should present.
    pub chain: PathBuf,
    /// The certificate's serial number, for building CRLs.
    pub serial: u64,
}

/// Options for [`Pki::issue_client_with`]; use `..Default::default()` for the rest.
#[derive(Debug, Clone, Default)]
pub struct ClientCertOpts {
    /// Subject CN (PostgreSQL's `cert` auth maps it to the user name).
    pub cn: String,
    pub dns: Vec<String>,
    /// rfc822Name SANs.
    pub emails: Vec<String>,
    pub uris: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Subject O.
    pub org: Option<String>,
    /// Subject OU.
    pub ou: Option<String>,
    /// Default: one day ago. Put it in the future for a not-yet-valid cert.
    pub not_before: Option<SystemTime>,
    /// Default: a year from now. Put it in the past for an expired cert.
    pub not_after: Option<SystemTime>,
    /// Default: the next value of the PKI's serial counter.
    pub serial: Option<u64>,
}

/// A root CA, an intermediate CA signed by it, and a `localhost` server leaf.
pub struct Pki {
    /// Directory all files of this PKI are written to.
    pub dir: PathBuf,
    /// Prefix of the CA names, e.g. "pg-tls-proxy test".
    pub name: String,
    /// Root CA certificate: the trust anchor.
    pub root_cert: PathBuf,
    /// Intermediate CA certificate, issuer of every leaf.
    pub intermediate_cert: PathBuf,
    /// Server leaf + intermediate; SANs `localhost` and IP `127.0.0.1`.
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
    pub server_leaf: PathBuf,
    pub server_serial: u64,
    root: Issuer<'static, KeyPair>,
    intermediate: Issuer<'static, KeyPair>,
    intermediate_pem: String,
    next_serial: AtomicU64,
    next_crl_number: AtomicU64,
}

impl Pki {
    /// The standard test PKI; its root CA is "pg-tls-proxy test root CA".
    pub fn generate(dir: &Path) -> Pki {
        Pki::generate_named(dir, "pg-tls-proxy test")
    }

    /// A PKI whose CAs are "`name` root CA" and "`name` intermediate CA".
    /// A second PKI with another `name` is an unrelated ("wrong") CA.
    pub fn generate_named(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create PKI dir {dir:?}: {e}"));

        let mut params = ca_params(&format!("{name} root CA"), 1);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = new_key();
        let root_pem = params.self_signed(&key).expect("self-sign root CA").pem();
        let root = Issuer::new(params, key);

        let mut params = ca_params(&format!("{name} intermediate CA"), 2);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let key = new_key();
        let intermediate_pem = params
            .signed_by(&key, &root)
            .expect("sign intermediate CA")
            .pem();
        let intermediate = Issuer::new(params, key);

        let mut pki = Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            root_cert: write_file(&dir.join("root-ca.crt"), &root_pem, 0o644, false),
            intermediate_cert: write_file(
                &dir.join("intermediate-ca.crt"),
                &intermediate_pem,
                0o644,
                false,
            ),
            server_chain: PathBuf::new(),
            server_key: PathBuf::new(),
            server_leaf: PathBuf::new(),
            server_serial: 0,
            root,
            intermediate,
            intermediate_pem,
            next_serial: AtomicU64::new(100),
            next_crl_number: AtomicU64::new(1),
        };
        let server = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
        (pki.server_chain, pki.server_key) = (server.chain, server.key);
        (pki.server_leaf, pki.server_serial) = (server.cert, server.serial);
        pki
    }

    /// A server leaf signed by the intermediate: CN `name`, serverAuth EKU,
    /// and each of `sans` as an IP SAN if it parses as an IP, else DNS.
    pub fn issue_server(&self, name: &str, sans: &[&str]) -> CertFiles {
        let params = self.named_leaf(name, sans, vec![ExtendedKeyUsagePurpose::ServerAuth]);
        self.issue_leaf(&format!("server-{name}"), params, None)
    }

    /// A fleet replica's leaf: presented in both directions of the peer
    /// link, so serverAuth and clientAuth, with `sans` as for a server.
    pub fn issue_peer(&self, name: &str, sans: &[&str]) -> CertFiles {
        let usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let params = self.named_leaf(name, sans, usages);
        self.issue_leaf(&format!("peer-{name}"), params, None)
    }

    /// Each of `sans` as an IP SAN if it parses as an IP, else DNS.
    fn named_leaf(
        &self,
        name: &str,
        sans: &[&str],
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> CertificateParams {
        let now = SystemTime::now();
        let mut params = leaf_params(name, now - DAY, now + 365 * DAY);
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(ia5(san)),
            })
            .collect();
        params.extended_key_usages = usages;
        params
    }

    /// A client leaf signed by the intermediate: CN `cn`, clientAuth EKU.
    pub fn issue_client(&self, cn: &str) -> CertFiles {
        let cn = cn.to_string();
        self.issue_client_with(ClientCertOpts {
            cn,
            ..Default::default()
        })
    }

    /// A client leaf with full control over names, validity and serial.
    pub fn issue_client_with(&self, opts: ClientCertOpts) -> CertFiles {
        let now = SystemTime::now();
        let not_before = opts.not_before.unwrap_or(now - DAY);
        let not_after = opts.not_after.unwrap_or(now + 365 * DAY);
        let mut params = leaf_params(&opts.cn, not_before, not_after);
        // Most general first (O, OU, CN), as real CAs issue them, so the
        // RFC 4514 form reads CN=...,OU=...,O=...
        let mut dn = DistinguishedName::new();
        if let Some(org) = &opts.org {
            dn.push(DnType::OrganizationName, org.as_str());
        }
        if let Some(ou) = &opts.ou {
            dn.push(DnType::OrganizationalUnitName, ou.as_str());
        }
        dn.push(DnType::CommonName, opts.cn.as_str());
        params.distinguished_name = dn;
        let sans = &mut params.subject_alt_names;
        sans.extend(opts.dns.iter().map(|d| SanType::DnsName(ia5(d))));
        sans.extend(opts.emails.iter().map(|e| SanType::Rfc822Name(ia5(e))));
        sans.extend(opts.uris.iter().map(|u| SanType::URI(ia5(u))));
        sans.extend(opts.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_leaf(&format!("client-{}", opts.cn), params, opts.serial)
    }

    /// A CRL signed by the intermediate, revoking `revoked_serials` (leaves).
    /// A negative `next_update_in_days` gives an already-stale CRL.
    pub fn crl(&self, revoked_serials: &[u64], next_update_in_days: i64) -> PathBuf {
        self.write_crl(
            &self.intermediate,
            "intermediate",
            revoked_serials,
            next_update_in_days,
        )
    }

    /// A CRL signed by the root (revoking serial 2 revokes the intermediate).
    /// Whole-chain revocation checking needs a CRL per issuer, i.e. both.
    pub fn root_crl(&self, revoked_serials: &[u64], next_update_in_days: i64) -> PathBuf {
        self.write_crl(&self.root, "root", revoked_serials, next_update_in_days)
    }

    fn issue_leaf(
        &self,
        stem: &str,
        mut params: CertificateParams,
        serial: Option<u64>,
    ) -> CertFiles {
        let serial = serial.unwrap_or_else(|| self.next_serial.fetch_add(1, Ordering::Relaxed));
        params.serial_number = Some(SerialNumber::from(serial));
        let key = new_key();
        let pem = params
            .signed_by(&key, &self.intermediate)
            .unwrap_or_else(|e| panic!("sign leaf certificate {stem}: {e}"))
            .pem();
        // The serial keeps names unique when the same CN is issued twice.
        let stem: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = |suffix: &str| self.dir.join(format!("{stem}-{serial}{suffix}"));
        let chain = format!("{pem}{}", self.intermediate_pem);
        CertFiles {
            cert: write_file(&path(".crt"), &pem, 0o644, false),
            key: write_file(&path(".key"), &key.serialize_pem(), 0o600, false),
            chain: write_file(&path("-chain.crt"), &chain, 0o644, false),
            serial,
        }
    }

    fn write_crl(
        &self,
        issuer: &Issuer<'_, KeyPair>,
        which: &str,
        serials: &[u64],
        days: i64,
    ) -> PathBuf {
        let now = SystemTime::now();
        let next_update = match u32::try_from(days) {
            Ok(days) => now + DAY * days,
            Err(_) => {
                now - DAY * u32::try_from(days.unsigned_abs()).expect("CRL days out of range")
            }
        };
        // rcgen requires this_update < next_update, stale CRLs included.
        let this_update = (now - Duration::from_secs(3600)).min(next_update - DAY);
        let number = self.next_crl_number.fetch_add(1, Ordering::Relaxed);
        let revoked = |serial: &u64| RevokedCertParams {
            serial_number: SerialNumber::from(*serial),
            revocation_time: asn1_time!(this_update),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        };
        let params = CertificateRevocationListParams {
            this_update: asn1_time!(this_update),
            next_update: asn1_time!(next_update),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials.iter().map(revoked).collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let pem = params
            .signed_by(issuer)
            .and_then(|crl| crl.pem())
            .unwrap_or_else(|e| panic!("sign {which} CRL: {e}"));
        write_file(
            &self.dir.join(format!("crl-{which}-{number}.pem")),
            &pem,
            0o644,
            false,
        )
    }
}

/// `epoch + (t - UNIX_EPOCH)`, generic so rcgen's timestamp type is inferred.
fn offset_from<T>(epoch: T, t: SystemTime) -> T
where
    T: Add<Duration, Output = T> + Sub<Duration, Output = T>,
{
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => epoch + after,
        Err(before) => epoch - before.duration(),
    }
}

fn new_key() -> KeyPair {
    KeyPair::generate().expect("generate ECDSA P-256 key pair")
}

fn base_params(cn: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = asn1_time!(not_before);
    params.not_after = asn1_time!(not_after);
    // AKI lets OpenSSL and webpki pick the right issuer quickly.
    params.use_authority_key_identifier_extension = true;
    params
}

/// CA with a ten-year validity that may sign certificates and CRLs.
fn ca_params(cn: &str, serial: u64) -> CertificateParams {
    let now = SystemTime::now();
    let mut params = base_params(cn, now - DAY, now + 3650 * DAY);
    params.serial_number = Some(SerialNumber::from(serial));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// End-entity (basicConstraints CA:FALSE), digitalSignature as ECDSA needs.
fn leaf_params(cn: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut params = base_params(cn, not_before, not_after);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

fn ia5(s: &str) -> rcgen::string::Ia5String {
    s.try_into()
        .unwrap_or_else(|e| panic!("{s:?} is not a valid IA5 string: {e}"))
}
