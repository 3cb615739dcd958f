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

use crate::protocol::{Frame, MessageReader, ReadError};

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
    #[error("backend i/o during login: {0}")]
    Io(std::io::Error),
    #[error("malformed authentication message from the backend")]
    Malformed,
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
                let s = scram.as_mut().ok_or(LoginError::Malformed)?;
                s.update(&frame.body()[4..]).map_err(LoginError::Scram)?;
                frontend::sasl_response(s.message(), &mut out).map_err(LoginError::Io)?;
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

fn sasl_mechanisms(frame: &Frame) -> Result<Vec<String>, LoginError> {
    let mut buf = BytesMut::from(frame.body());
    match Authentication::decode_body(&mut buf, frame.bytes.len() - 1, &DecodeContext::default()) {
        Ok(Authentication::SASL(m)) => Ok(m),
        _ => Err(LoginError::Malformed),
    }
}

/// RFC 5929 tls-server-end-point: the certificate hashed with its signature
/// algorithm's hash, SHA-256 for MD5/SHA-1 and anything unknown.
pub fn tls_server_end_point(cert_der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let algorithm = match X509Certificate::from_der(cert_der) {
        Ok((_, cert)) => match cert.signature_algorithm.algorithm.to_id_string().as_str() {
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
            _ => &ring::digest::SHA256,
        },
        Err(_) => &ring::digest::SHA256,
    };
    ring::digest::digest(algorithm, cert_der).as_ref().to_vec()
}
