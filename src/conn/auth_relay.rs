//! The authentication exchange, relayed message by message from the
//! StartupMessage until the backend's ReadyForQuery (or its error).
//!
//! The proxy does not authenticate anyone here: the backend does. It
//! frames each message (length-capped) so that it can refuse what cannot
//! work through a terminating proxy: SCRAM channel binding
//! (`SCRAM-SHA-256-PLUS`) when the backend link is TLS. The client binds
//! its exchange to *our* certificate; the backend checks it against its
//! own, so the exchange would fail with an opaque "channel binding check
//! failed". Stripping `-PLUS` does not help either (libpq then sends the
//! gs2 flag `y`, which a TLS backend refuses as a downgrade), so the client
//! gets an ErrorResponse that says why and what to do.

use bytes::{Buf, BytesMut};
use pgwire::messages::startup::{Authentication, SASLInitialResponse};
use pgwire::messages::{DecodeContext, Message};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::conn::error::SessionError;
use crate::policy::cancel::ClientKey;
use crate::wire::{Frame, MessageReader, ProtocolError, ReadError, MAX_AUTH_PHASE_MESSAGE};

const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Authentication request codes that carry no request for a client answer.
const AUTH_OK: i32 = 0;
const AUTH_SASL: i32 = 10;

/// How the exchange ended.
pub enum Outcome {
    /// ReadyForQuery was relayed: the session is established. The buffers
    /// hold bytes each side sent past the last framed message.
    Ready {
        client_surplus: BytesMut,
        backend_surplus: BytesMut,
    },
    /// The backend refused: its ErrorResponse was relayed.
    BackendClosed,
    /// The client went away during authentication.
    ClientClosed,
}

/// Errors on the backend side of the exchange.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("backend i/o during authentication: {0}")]
    BackendIo(std::io::Error),
    #[error("backend protocol error during authentication: {0}")]
    BackendProtocol(ProtocolError),
    #[error("backend closed the connection during authentication")]
    BackendClosed,
}

/// Issues the client's cancel key for the backend's (pid, secret).
pub type IssueKey<'a> = dyn FnMut(i32, [u8; 4]) -> ClientKey + Send + 'a;

/// Relays from the backend's first authentication message (or, after a
/// proxy login, from what follows AuthenticationOk) to ReadyForQuery.
/// `from_backend` carries whatever a previous reader had buffered.
/// `issue_key` replaces the backend's BackendKeyData (pid, secret) with the
/// proxy's own key; the backend's never reaches the client.
pub async fn relay_authentication<C, B>(
    client: &mut C,
    backend: &mut B,
    mut from_backend: MessageReader,
    backend_tls: bool,
    issue_key: &mut IssueKey<'_>,
) -> Result<Outcome, ExchangeError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut from_client = MessageReader::new(MAX_AUTH_PHASE_MESSAGE);
    let mut plus_offered = false;
    // The next client message is a SASLInitialResponse.
    let mut sasl_pending = false;
    // Until AuthenticationOk the client may only answer auth requests; it
    // is read whenever it speaks (a request may need no answer, as GSS's
    // last token), so neither side can wedge the other. Afterwards its
    // bytes wait for the relay.
    let mut authenticated = false;
    loop {
        tokio::select! {
            frame = from_backend.next(backend) => {
                let mut frame = match frame {
                    Ok(f) => f,
                    // Without an ErrorResponse first: the client is told.
                    Err(ReadError::Eof) => return Err(ExchangeError::BackendClosed),
                    Err(ReadError::Io(e)) => return Err(ExchangeError::BackendIo(e)),
                    Err(ReadError::Protocol(p)) => return Err(ExchangeError::BackendProtocol(p)),
                };
                let tag = frame.tag();
                let code = frame.auth_code();
                if tag == b'K' {
                    rewrite_key(&mut frame, issue_key)?;
                }
                if code == Some(AUTH_SASL) {
                    plus_offered = offers_scram_plus(&frame);
                    sasl_pending = true;
                }
                if code == Some(AUTH_OK) {
                    authenticated = true;
                }
                write_client(client, &frame.bytes).await?;
                match tag {
                    b'Z' => {
                        return Ok(Outcome::Ready {
                            client_surplus: from_client.into_buffer(),
                            backend_surplus: from_backend.into_buffer(),
                        })
                    }
                    b'E' => return Ok(Outcome::BackendClosed),
                    _ => {}
                }
            }
            answer = from_client.next(client), if !authenticated => {
                let answer = match answer {
                    Ok(f) => f,
                    Err(ReadError::Eof) => return Ok(Outcome::ClientClosed),
                    Err(e) => return Err(SessionError::from(e).into()),
                };
                match answer.tag() {
                    b'p' => {}
                    b'X' => return Ok(Outcome::ClientClosed),
                    _ => {
                        return Err(SessionError::Protocol(ProtocolError::Unexpected(
                            "expected a password or SASL response",
                        ))
                        .into())
                    }
                }
                if std::mem::take(&mut sasl_pending) && backend_tls && plus_offered && chose_scram_plus(&answer)? {
                    return Err(SessionError::ChannelBindingThroughTls.into());
                }
                backend
                    .write_all(&answer.bytes)
                    .await
                    .map_err(ExchangeError::BackendIo)?;
            }
        }
    }
}

/// Replaces the backend's BackendKeyData with the proxy's key. The backend
/// speaks protocol 3.0 (pid + 4-byte secret); the client's key is 3.0's or
/// 3.2's, whichever the client speaks.
fn rewrite_key(
    frame: &mut Frame,
    issue_key: &mut IssueKey<'_>,
) -> Result<(), ExchangeError> {
    let body = frame.body();
    if body.len() != 8 {
        return Err(ExchangeError::BackendProtocol(ProtocolError::Malformed(
            "BackendKeyData",
        )));
    }
    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let secret = [body[4], body[5], body[6], body[7]];
    let key = issue_key(pid, secret);
    frame.bytes.clear();
    frame.bytes.extend_from_slice(&key.message());
    Ok(())
}

async fn write_client<C: AsyncWrite + Unpin>(
    client: &mut C,
    bytes: &[u8],
) -> Result<(), ExchangeError> {
    client
        .write_all(bytes)
        .await
        .map_err(|e| ExchangeError::Session(SessionError::ClientIo(e)))
}

/// Whether an AuthenticationSASL lists `SCRAM-SHA-256-PLUS`.
fn offers_scram_plus(frame: &Frame) -> bool {
    let mut buf = BytesMut::from(frame.body());
    // `auth_code()` guaranteed four bytes of code.
    match Authentication::decode_body(&mut buf, frame.bytes.len() - 1, &DecodeContext::default()) {
        Ok(Authentication::SASL(mechanisms)) => mechanisms.iter().any(|m| m == SCRAM_PLUS),
        _ => false,
    }
}

/// Whether a SASLInitialResponse picks `SCRAM-SHA-256-PLUS`. Its layout is
/// checked first: pgwire's decoder assumes a well-formed body.
fn chose_scram_plus(frame: &Frame) -> Result<bool, SessionError> {
    let body = frame.body();
    let malformed = || SessionError::Protocol(ProtocolError::Malformed("SASLInitialResponse"));
    let name_end = body.iter().position(|&b| b == 0).ok_or_else(malformed)?;
    let rest = &body[name_end + 1..];
    if rest.len() < 4 {
        return Err(malformed());
    }
    let data_len = (&rest[..4]).get_i32();
    if data_len < -1 || (data_len >= 0 && data_len as usize != rest.len() - 4) {
        return Err(malformed());
    }
    let mut buf = BytesMut::from(body);
    let msg = SASLInitialResponse::decode_body(
        &mut buf,
        frame.bytes.len() - 1,
        &DecodeContext::default(),
    )
    .map_err(|_| malformed())?;
    Ok(msg.auth_method == SCRAM_PLUS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(&[tag]);
        bytes.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        bytes.extend_from_slice(body);
        Frame { bytes }
    }

    #[test]
    fn detects_plus_offer() {
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert!(offers_scram_plus(&frame(b'R', &body)));
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert!(!offers_scram_plus(&frame(b'R', &body)));
    }

    #[test]
    fn detects_plus_choice_and_rejects_malformed() {
        let data = b"p=tls-server-end-point,,n=,r=abc";
        let mut body = b"SCRAM-SHA-256-PLUS\0".to_vec();
        body.extend_from_slice(&(data.len() as i32).to_be_bytes());
        body.extend_from_slice(data);
        assert!(chose_scram_plus(&frame(b'p', &body)).expect("well-formed"));
        // Claimed data length past the end of the message.
        let mut bad = b"SCRAM-SHA-256\0".to_vec();
        bad.extend_from_slice(&1000i32.to_be_bytes());
        assert!(chose_scram_plus(&frame(b'p', &bad)).is_err());
        assert!(chose_scram_plus(&frame(b'p', b"SCRAM")).is_err());
    }
}
