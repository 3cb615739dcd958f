//! Proxy-authenticated backend login (`backend_auth = "proxy"`): the
//! client's certificate was the authentication, so the proxy answers the
//! backend's authentication request itself, as role U.
//!
//! Either the backend trusts the proxy's client certificate (pg_hba `cert`
//! with a pg_ident map from the proxy's CN to the roles) and sends
//! AuthenticationOk at once, or it asks for a password and the proxy uses
//! the role's secret from `[backend.credentials]`: SCRAM-SHA-256 through
//! postgres-protocol, with channel binding (tls-server-end-point) to the
//! backend's certificate when the link is TLS. The client's own password is
//! never asked for or used.

use bytes::BytesMut;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{DecodeContext, Message};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::wire::{Frame, MessageReader, ReadError};

/// A backend password, loaded at start-up. Never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The backend refused; its ErrorResponse is forwarded to the client.
    #[error("backend refused the login")]
    Refused(BytesMut),
    #[error("the backend asks for a password for role \"{0}\" but backend.credentials has none")]
    NoCredential(String),
    #[error("the backend asked for an authentication method the proxy cannot answer (code {0})")]
    Unsupported(i32),
    #[error("the backend asked for a cleartext or MD5 password over a link whose certificate is not verified; the proxy answers those only with backend.sslmode verify-ca or verify-full")]
    InsecurePassword,
    #[error("SCRAM exchange with the backend failed: {0}")]
    Scram(std::io::Error),
    #[error("backend closed the connection during login")]
    Closed,
    #[error("the backend's SCRAM iteration count {0} exceeds the proxy's limit of {MAX_SCRAM_ITERATIONS} (PostgreSQL's default is 4096; lower scram_iterations and reset the role's password)")]
    TooManyIterations(u32),
    #[error("backend i/o during login: {0}")]
    Io(std::io::Error),
    #[error("malformed authentication message from the backend")]
    Malformed,
    /// The backend leg of a terminated SCRAM login.
    #[error(transparent)]
    ScramKey(crate::policy::scram::client::BackendScramError),
}

impl From<ReadError> for LoginError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Eof => LoginError::Closed,
            ReadError::Io(e) => LoginError::Io(e),
            ReadError::Protocol(_) => LoginError::Malformed,
        }
    }
}

/// Which SCRAM variant was used, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Trust,
    ScramPlus,
    Scram,
    Md5,
    Cleartext,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Trust => "trust_or_cert",
            Method::ScramPlus => "scram-sha-256-plus",
            Method::Scram => "scram-sha-256",
            Method::Md5 => "md5",
            Method::Cleartext => "password",
        }
    }
}

/// Answers the backend's authentication requests until AuthenticationOk,
/// which it consumes. `end_point` is the tls-server-end-point hash of the
/// backend certificate when the link is TLS.
pub async fn login<B>(
    reader: &mut MessageReader,
    backend: &mut B,
    user: &str,
    secret: Option<&Secret>,
    end_point: Option<Vec<u8>>,
    verified_link: bool,
) -> Result<Method, LoginError>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut method = Method::Trust;
    let mut scram: Option<ScramSha256> = None;
    let tls = end_point.is_some();
    let mut end_point = end_point;
    loop {
        let frame = reader.next(backend).await?;
        if frame.tag() == b'E' {
            return Err(LoginError::Refused(frame.bytes));
        }
        let Some(code) = frame.auth_code() else {
            return Err(LoginError::Malformed);
        };
        let need = || secret.ok_or_else(|| LoginError::NoCredential(user.to_string()));
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(method),
            // A cleartext password (or its replayable MD5 hash) goes only
            // to a server whose certificate was verified.
            3 | 5 if !verified_link => return Err(LoginError::InsecurePassword),
            3 => {
                method = Method::Cleartext;
                frontend::password_message(need()?.bytes(), &mut out).map_err(LoginError::Io)?;
            }
            5 => {
                let body = frame.body();
                let salt: [u8; 4] = body
                    .get(4..8)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(LoginError::Malformed)?;
                method = Method::Md5;
                let hash = md5_hash(user.as_bytes(), need()?.bytes(), salt);
                frontend::password_message(hash.as_bytes(), &mut out).map_err(LoginError::Io)?;
            }
            10 => {
                let mechanisms = sasl_mechanisms(&frame)?;
                let plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                let (mechanism, binding) = match (plus, end_point.take()) {
                    (true, Some(hash)) => (
                        SCRAM_SHA_256_PLUS,
                        ChannelBinding::tls_server_end_point(hash),
                    ),
                    // On TLS we could bind but the server did not offer it.
                    (false, Some(_)) if tls => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                    _ => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                };
                if !mechanisms.iter().any(|m| m == mechanism) {
                    return Err(LoginError::Unsupported(code));
                }
                method = if mechanism == SCRAM_SHA_256_PLUS {
                    Method::ScramPlus
                } else {
                    Method::Scram
                };
                let s = ScramSha256::new(need()?.bytes(), binding);
                frontend::sasl_initial_response(mechanism, s.message(), &mut out)
                    .map_err(LoginError::Io)?;
                scram = Some(s);
            }
            11 => {
                let mut s = scram.take().ok_or(LoginError::Malformed)?;
                let server_first = frame.body()[4..].to_vec();
                let iterations = scram_iterations(&server_first).ok_or(LoginError::Malformed)?;
                if iterations > MAX_SCRAM_ITERATIONS {
                    return Err(LoginError::TooManyIterations(iterations));
                }
                // PBKDF2 over the password: milliseconds to seconds of CPU,
                // so it runs on a blocking thread, never on an async worker
                // (where auth_timeout could not interrupt it either).
                let (s, result) = tokio::task::spawn_blocking(move || {
                    let result = s.update(&server_first);
                    (s, result)
                })
                .await
                .map_err(|e| LoginError::Io(std::io::Error::other(e.to_string())))?;
                result.map_err(LoginError::Scram)?;
                frontend::sasl_response(s.message(), &mut out).map_err(LoginError::Io)?;
                scram = Some(s);
            }
            12 => {
                let s = scram.as_mut().ok_or(LoginError::Malformed)?;
                // Verifies the server signature: the backend proved it knows
                // the verifier too.
                s.finish(&frame.body()[4..]).map_err(LoginError::Scram)?;
                continue;
            }
            other => return Err(LoginError::Unsupported(other)),
        }
        backend.write_all(&out).await.map_err(LoginError::Io)?;
    }
}

/// The most PBKDF2 iterations the proxy will compute for one login: 244
/// times PostgreSQL's default (4096), above OWASP's 600,000 for
/// PBKDF2-HMAC-SHA256, and about a second of CPU here. A backend (or a
/// man in the middle of a plaintext link) asking for more is refused
/// before any hashing.
pub const MAX_SCRAM_ITERATIONS: u32 = 1_000_000;

/// The `i=` attribute of a SCRAM server-first-message (RFC 5802:
/// `r=nonce,s=salt,i=count`).
fn scram_iterations(server_first: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(server_first).ok()?;
    text.split(',')
        .find_map(|attr| attr.strip_prefix("i="))
        .and_then(|n| n.parse().ok())
}

fn sasl_mechanisms(frame: &Frame) -> Result<Vec<String>, LoginError> {
    let mut buf = BytesMut::from(frame.body());
    match Authentication::decode_body(&mut buf, frame.bytes.len() - 1, &DecodeContext::default()) {
        Ok(Authentication::SASL(m)) => Ok(m),
        _ => Err(LoginError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iteration_count_is_read_before_hashing() {
        assert_eq!(scram_iterations(b"r=abc,s=c2FsdA==,i=4096"), Some(4096));
        assert_eq!(scram_iterations(b"r=abc,s=c2FsdA==,i=99999999999"), None);
        assert_eq!(scram_iterations(b"r=abc,s=c2FsdA=="), None);
        assert_eq!(scram_iterations(&[0xff, b'i', b'=']), None);
    }

    /// A server-first-message asking for more iterations than the limit
    /// is refused without computing anything.
    #[tokio::test]
    async fn huge_iteration_counts_are_refused() {
        let (mut proxy, mut server) = tokio::io::duplex(4096);
        let serve = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut sasl = vec![b'R'];
            let body = [&10i32.to_be_bytes()[..], b"SCRAM-SHA-256\0\0"].concat();
            sasl.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            sasl.extend_from_slice(&body);
            server.write_all(&sasl).await.expect("write");
            let mut buf = [0u8; 512];
            let n = server.read(&mut buf).await.expect("read");
            let first = std::str::from_utf8(&buf[..n])
                .unwrap_or_default()
                .to_string();
            let nonce = first
                .split("r=")
                .nth(1)
                .map(|r| r.trim_end_matches('\0').to_string())
                .unwrap_or_default();
            let msg = format!("r={nonce}srv,s=c2FsdA==,i=2000000000");
            let body = [&11i32.to_be_bytes()[..], msg.as_bytes()].concat();
            let mut cont = vec![b'R'];
            cont.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            cont.extend_from_slice(&body);
            server.write_all(&cont).await.expect("write");
            server
        };
        let secret = Secret::new("pw".into());
        let mut reader = MessageReader::new(crate::wire::MAX_AUTH_PHASE_MESSAGE);
        let login = login(&mut reader, &mut proxy, "u", Some(&secret), None, false);
        let (result, _server) = tokio::join!(login, serve);
        assert!(
            matches!(result, Err(LoginError::TooManyIterations(2_000_000_000))),
            "{result:?}"
        );
    }
}
