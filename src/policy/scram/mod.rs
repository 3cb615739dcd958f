//! SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677, RFC 5929) as
//! PostgreSQL speaks them, for terminating the exchange at the proxy: the
//! client's leg against a stored verifier ([`server`]) and the backend's
//! leg from the ClientKey that verification recovers ([`client`]).
//!
//! Pure: messages in, messages out; no sockets, no async runtime. The
//! verifier (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`) is
//! enough to check a client without PBKDF2: ClientKey = ClientProof XOR
//! HMAC(StoredKey, AuthMessage), accepted iff SHA-256(ClientKey) equals
//! StoredKey. That ClientKey does not depend on the connection, so the
//! proxy can log in to the backend with it, with its own nonce and channel
//! binding, as long as the backend's salt and iterations are the
//! verifier's. It is a password equivalent for that verifier: it lives in
//! a [`ClientKey`], zeroized on drop, never logged.

pub mod client;
pub mod server;
pub mod userlist;

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, hmac};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{sqlstate, ClientError, UserFacing};

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL supports.
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";
/// Random bytes in a server nonce (`SCRAM_RAW_NONCE_LEN`), as PostgreSQL.
const NONCE_BYTES: usize = 18;
/// PostgreSQL's default `scram_iterations`, used for mock verifiers.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length of PostgreSQL's verifiers and mock verifiers.
const SALT_BYTES: usize = 16;

type Key = [u8; 32];

/// ClientKey: recovered from a client's proof, used once for the backend
/// login, zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ClientKey(Key);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

/// A stored SCRAM-SHA-256 verifier. Its Debug form hides the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    stored_key: Key,
    server_key: Key,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier(i={}, ..)", self.iterations)
    }
}

/// Why a verifier string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifierError {
    #[error("an MD5 hash, not a SCRAM-SHA-256 verifier (PostgreSQL's md5 passwords cannot be terminated safely; set password_encryption = scram-sha-256 and reset the password)")]
    Md5,
    #[error("not a SCRAM-SHA-256 verifier (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>; plain passwords are not accepted)")]
    NotScram,
    #[error("malformed SCRAM-SHA-256 verifier: {0}")]
    Malformed(&'static str),
}

impl FromStr for Verifier {
    type Err = VerifierError;

    fn from_str(s: &str) -> Result<Verifier, VerifierError> {
        if s.len() == 35 && s.starts_with("md5") {
            return Err(VerifierError::Md5);
        }
        let Some(rest) = s.strip_prefix("SCRAM-SHA-256$") else {
            return Err(VerifierError::NotScram);
        };
        let (params, keys) = rest
            .split_once('$')
            .ok_or(VerifierError::Malformed("no '$' before the keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(VerifierError::Malformed("no ':' between iterations and salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(VerifierError::Malformed("no ':' between StoredKey and ServerKey"))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(VerifierError::Malformed("iterations is not a positive number"))?;
        let salt = B64
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(VerifierError::Malformed("salt is not base64"))?;
        let key = |v: &str, what| {
            B64.decode(v)
                .ok()
                .and_then(|k| Key::try_from(k.as_slice()).ok())
                .ok_or(VerifierError::Malformed(what))
        };
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key(stored, "StoredKey is not 32 bytes of base64")?,
            server_key: key(server, "ServerKey is not 32 bytes of base64")?,
        })
    }
}

impl Verifier {
    /// A verifier for a user the proxy has none for: the salt is derived
    /// from the user name and `secret` (so it is stable, and looks like any
    /// other), the iterations are PostgreSQL's default, and no proof can
    /// match it (the exchange is doomed from the start, as PostgreSQL's
    /// mock authentication).
    pub fn mock(user: &str, secret: &[u8]) -> Verifier {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive = |label: &str| {
            let mut ctx = hmac::Context::with_key(&key);
            ctx.update(label.as_bytes());
            ctx.update(user.as_bytes());
            let tag = ctx.sign();
            let mut out = [0u8; 32];
            out.copy_from_slice(tag.as_ref());
            out
        };
        Verifier {
            iterations: DEFAULT_ITERATIONS,
            salt: derive("salt")[..SALT_BYTES].to_vec(),
            stored_key: derive("stored"),
            server_key: derive("server"),
        }
    }

    /// The verifier a password gives (tests and tools).
    pub fn from_password(password: &[u8], salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN),
            salt,
            password,
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        let v = Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, b"Server Key"),
        };
        salted.zeroize();
        v
    }
}

impl fmt::Display for Verifier {
    /// The stored form, `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Key {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn sha256(data: &[u8]) -> Key {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// HMAC-SHA-256 over `AuthMessage` = client-first-bare "," server-first ","
/// client-final-without-proof, without building it.
fn auth_hmac(key: &Key, client_first_bare: &str, server_first: &str, final_without_proof: &str) -> Key {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(client_first_bare.as_bytes());
    ctx.update(b",");
    ctx.update(server_first.as_bytes());
    ctx.update(b",");
    ctx.update(final_without_proof.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A fresh printable nonce: 18 random bytes in base64, as PostgreSQL.
fn nonce() -> String {
    let raw: [u8; NONCE_BYTES] = rand::random();
    B64.encode(raw)
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (no comma).
fn is_printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// What a client did wrong in its SCRAM messages, in PostgreSQL's words
/// and SQLSTATEs (src/backend/libpq/auth-scram.c).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(String),
    #[error("client selected an invalid SASL authentication mechanism")]
    InvalidMechanism,
    #[error("SCRAM channel binding negotiation error")]
    Downgrade,
    #[error("unsupported SCRAM channel-binding type {0:?}")]
    BindingType(String),
    #[error("SCRAM channel binding check failed")]
    BindingCheck,
    #[error("unexpected SCRAM channel-binding attribute in client-final-message")]
    BindingAttribute,
    #[error("client uses authorization identity, but it is not supported")]
    AuthzId,
    #[error("client requires an unsupported SCRAM extension")]
    Extension,
    #[error("non-printable characters in SCRAM nonce")]
    NonPrintableNonce,
}

impl ScramError {
    fn malformed(detail: impl Into<String>) -> ScramError {
        ScramError::Malformed(detail.into())
    }

    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ScramError::Downgrade => "downgrade",
            ScramError::BindingCheck => "channel_binding",
            _ => "protocol",
        }
    }
}

impl UserFacing for ScramError {
    fn client_error(&self) -> ClientError {
        use sqlstate::*;
        match self {
            ScramError::Malformed(detail) => {
                ClientError::fatal(PROTOCOL_VIOLATION, "malformed SCRAM message").with_detail(detail.clone())
            }
            ScramError::Downgrade => ClientError::fatal(INVALID_AUTHORIZATION, self.to_string()).with_detail(
                "The client supports SCRAM channel binding but thinks the server does not.  However, this server does support channel binding.",
            ),
            ScramError::BindingType(t) => ClientError::fatal(
                PROTOCOL_VIOLATION,
                format!("unsupported SCRAM channel-binding type \"{}\"", sanitize(t)),
            ),
            ScramError::BindingCheck => ClientError::fatal(INVALID_AUTHORIZATION, self.to_string()),
            ScramError::AuthzId | ScramError::Extension => {
                ClientError::fatal(FEATURE_NOT_SUPPORTED, self.to_string())
            }
            ScramError::InvalidMechanism
            | ScramError::BindingAttribute
            | ScramError::NonPrintableNonce => ClientError::fatal(PROTOCOL_VIOLATION, self.to_string()),
        }
    }
}

/// Client text echoed in an error: printable ASCII only, short.
fn sanitize(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect()
}

/// Splits `attr=value` at the front of `s` (up to the next comma).
fn attr(s: &str, want: char) -> Result<(&str, &str), ScramError> {
    let (field, rest) = s.split_once(',').unwrap_or((s, ""));
    let mut chars = field.chars();
    match (chars.next(), chars.next()) {
        (Some(c), Some('=')) if c == want => Ok((&field[2..], rest)),
        (Some(c), Some('=')) => Err(ScramError::malformed(format!(
            "Expected attribute \"{want}\" but found \"{}\".",
            sanitize(&c.to_string())
        ))),
        (Some(_), _) => Err(ScramError::malformed(format!(
            "Expected character \"=\" for attribute \"{want}\"."
        ))),
        (None, _) => Err(ScramError::malformed(format!(
            "Expected attribute \"{want}\" but found \"\"."
        ))),
    }
}

#[cfg(test)]
mod tests;
