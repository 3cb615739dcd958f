//! The backend's leg of a terminated SCRAM login: the proxy answers the
//! backend's SCRAM with the ClientKey its client proved
//! ([`crate::policy::scram::client`]); no password is involved. `-PLUS`
//! bound to the backend's certificate when the backend offers it over TLS;
//! `y` when the proxy could bind but was not offered `-PLUS`; `n` on a
//! plaintext link. A backend that asks for MD5 or a cleartext password
//! cannot be answered (the proxy holds no password).

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::login::{LoginError, Method};
use crate::policy::scram::client::{BackendScramError, Binding, ClientExchange};
use crate::policy::scram::{ClientKey, Verifier, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use crate::wire::{Frame, MessageReader};

/// Logs in with `key` up to AuthenticationOk, which it consumes.
/// `end_point` is the backend certificate's tls-server-end-point on a TLS
/// link (when defined).
pub async fn login_with_key<B>(
    reader: &mut MessageReader,
    backend: &mut B,
    key: &ClientKey,
    verifier: &Verifier,
    end_point: Option<Vec<u8>>,
) -> Result<Method, LoginError>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut method = Method::Trust;
    let mut exchange: Option<ClientExchange<'_>> = None;
    let mut end_point = end_point;
    loop {
        let frame = reader.next(backend).await?;
        if frame.tag() == b'E' {
            return Err(LoginError::Refused(frame.bytes));
        }
        let Some(code) = frame.auth_code() else {
            return Err(LoginError::Malformed);
        };
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(method),
            10 => {
                let mechanisms = mechanisms(&frame)?;
                let offered = |m: &str| mechanisms.iter().any(|x| x == m);
                let binding = match end_point.take() {
                    Some(hash) if offered(SCRAM_SHA_256_PLUS) => Binding::Plus(hash),
                    Some(_) => Binding::NotOffered,
                    None => Binding::None,
                };
                let (ex, mechanism, first) = ClientExchange::start(key, verifier, binding);
                if !offered(mechanism) {
                    return Err(LoginError::Unsupported(code));
                }
                method = if mechanism == SCRAM_SHA_256 {
                    Method::Scram
                } else {
                    Method::ScramPlus
                };
                frontend::sasl_initial_response(mechanism, first.as_bytes(), &mut out)
                    .map_err(LoginError::Io)?;
                exchange = Some(ex);
            }
            11 => {
                let ex = exchange.as_mut().ok_or(LoginError::Malformed)?;
                let reply = ex.respond(&frame.body()[4..]).map_err(LoginError::ScramKey)?;
                frontend::sasl_response(reply.as_bytes(), &mut out).map_err(LoginError::Io)?;
            }
            12 => {
                let ex = exchange.as_ref().ok_or(LoginError::Malformed)?;
                ex.verify(&frame.body()[4..]).map_err(LoginError::ScramKey)?;
                continue;
            }
            // MD5, cleartext, GSS...: nothing the proxy could answer.
            other => return Err(LoginError::Unsupported(other)),
        }
        backend.write_all(&out).await.map_err(LoginError::Io)?;
    }
}

fn mechanisms(frame: &Frame) -> Result<Vec<String>, LoginError> {
    let body = frame.body().get(4..).ok_or(LoginError::Malformed)?;
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let end = rest.iter().position(|&b| b == 0).ok_or(LoginError::Malformed)?;
        if end == 0 {
            return Ok(out);
        }
        out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[end + 1..];
    }
}

impl From<BackendScramError> for LoginError {
    fn from(e: BackendScramError) -> Self {
        LoginError::ScramKey(e)
    }
}
