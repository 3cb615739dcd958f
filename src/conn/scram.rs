//! The client's leg of a terminated SCRAM login (`[scram] terminate`):
//! AuthenticationSASL with the mechanisms this connection can use,
//! SASLInitialResponse → SASLContinue, SASLResponse → the proof checked
//! against the user's verifier, or a mock exchange for a user without one,
//! which a client cannot tell from a wrong password. The SASLFinal that
//! proves the proxy knows the verifier is sent only after the backend
//! accepted the login ([`super::login`]).

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::error::SessionError;
use super::Conn;
use crate::backend::auth_query::Source;
use crate::policy::scram::server::{Finished, ServerExchange, Verified};
use crate::policy::scram::{Verifier, SCRAM_SHA_256_PLUS};
#[cfg(test)]
use crate::policy::scram::SCRAM_SHA_256;
use crate::runtime::ScramSetup;
use crate::wire::stream::ClientStream;
use crate::wire::{MessageReader, ProtocolError, ReadError, MAX_AUTH_PHASE_MESSAGE};

const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// A client that proved its password, and the verifier it proved it to.
pub(super) struct Proved {
    pub verified: Verified,
    pub verifier: Verifier,
}

impl Proved {
    pub fn method(&self) -> &'static str {
        method_label(self.verified.plus)
    }
}

fn method_label(plus: bool) -> &'static str {
    if plus {
        "scram-sha-256-plus"
    } else {
        "scram-sha-256"
    }
}

/// `pgtls_client_logins_total{method, result}`.
pub(super) fn count(conn: &Conn<'_>, method: &str, result: &str) {
    conn.ctx
        .metrics
        .client_logins
        .with_label_values(&[method, result])
        .inc();
}

/// Runs the exchange with the client; counts and logs its outcome.
pub(super) async fn client_leg(
    conn: &Conn<'_>,
    setup: &ScramSetup,
    client: &mut ClientStream,
    user: &str,
) -> Result<Proved, SessionError> {
    let known = match (setup.verifiers.get(user), &setup.auth_query) {
        (Some(v), _) => Some(v.clone()),
        (None, Some(query)) => {
            let m = &conn.ctx.metrics.auth_query;
            match query.lookup(user, conn.rt.auth_timeout).await {
                Ok((v, Source::Cache)) => {
                    m.with_label_values(&["hit"]).inc();
                    v
                }
                Ok((v, Source::Query)) => {
                    m.with_label_values(&["miss"]).inc();
                    v
                }
                Err(e) => {
                    m.with_label_values(&["error"]).inc();
                    warn!("verifier lookup failed: {e}");
                    return Err(SessionError::VerifierLookup);
                }
            }
        }
        (None, None) => None,
    };
    let unknown = known.is_none();
    // The hash of the certificate this connection was served.
    let end_point = client.is_tls().then(|| conn.served.end_point.clone()).flatten();
    let mut exchange = ServerExchange::new(known, Verifier::mock(user, &setup.mock_secret), end_point);
    let result = run(&mut exchange, client).await;
    let (Ok((plus, _)) | Err((plus, _))) = &result;
    let method = method_label(*plus);
    let metric = |result: &str| count(conn, method, result);
    match result {
        Ok((_, Finished::Verified(verified))) => {
            let verifier = exchange.verifier().clone();
            Ok(Proved { verified, verifier })
        }
        Ok((_, Finished::Failed)) => {
            let why = if unknown { "unknown_user" } else { "invalid_password" };
            metric(why);
            if unknown {
                info!(reason = why, "password authentication failed: no SCRAM verifier for this user");
            } else {
                info!(reason = why, "password authentication failed: wrong password");
            }
            Err(SessionError::PasswordFailed(user.to_string()))
        }
        Err((_, error)) => {
            if let SessionError::Scram(e) = &error {
                metric(e.kind());
                warn!("SCRAM exchange refused: {e}");
            }
            Err(error)
        }
    }
}

type Outcome = Result<(bool, Finished), (bool, SessionError)>;

async fn run(exchange: &mut ServerExchange, client: &mut ClientStream) -> Outcome {
    client
        .write_all(&auth_sasl(exchange.mechanisms()))
        .await
        .map_err(|e| (false, SessionError::ClientIo(e)))?;
    let mut reader = MessageReader::new(MAX_AUTH_PHASE_MESSAGE);
    let first = read_sasl(&mut reader, client).await.map_err(|e| (false, e))?;
    let (mechanism, data) = initial_response(&first).map_err(|e| (false, e))?;
    let plus = mechanism == SCRAM_SHA_256_PLUS;
    let server_first = exchange
        .first(&mechanism, &data)
        .map_err(|e| (plus, SessionError::Scram(e)))?;
    client
        .write_all(&auth_message(AUTH_SASL_CONTINUE, server_first.as_bytes()))
        .await
        .map_err(|e| (plus, SessionError::ClientIo(e)))?;
    let last = read_sasl(&mut reader, client).await.map_err(|e| (plus, e))?;
    if !reader.into_buffer().is_empty() {
        return Err((
            plus,
            SessionError::Protocol(ProtocolError::Unexpected("unexpected data after the SASL response")),
        ));
    }
    let finished = exchange
        .finish(&last)
        .map_err(|e| (plus, SessionError::Scram(e)))?;
    Ok((plus, finished))
}

/// AuthenticationSASLFinal with the server signature, then
/// AuthenticationOk: sent once the backend accepted the login.
pub(super) fn final_and_ok(server_final: &str) -> BytesMut {
    let mut out = auth_message(AUTH_SASL_FINAL, server_final.as_bytes());
    out.extend_from_slice(&crate::wire::encode::AUTHENTICATION_OK);
    out
}

fn auth_sasl(mechanisms: &[&str]) -> BytesMut {
    let mut body = Vec::new();
    for m in mechanisms {
        body.extend_from_slice(m.as_bytes());
        body.push(0);
    }
    body.push(0);
    auth_message(AUTH_SASL, &body)
}

fn auth_message(code: i32, data: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(9 + data.len());
    out.put_u8(b'R');
    out.put_i32((8 + data.len()) as i32);
    out.put_i32(code);
    out.put_slice(data);
    out
}

/// The body of the next client message, which must be a SASL answer
/// (`p`); a Terminate or EOF is the client leaving.
async fn read_sasl(reader: &mut MessageReader, client: &mut ClientStream) -> Result<Vec<u8>, SessionError> {
    let frame = reader.next(client).await.map_err(|e| match e {
        ReadError::Eof => SessionError::ClientEof("authentication"),
        e => SessionError::from(e),
    })?;
    match frame.tag() {
        b'p' => Ok(frame.body().to_vec()),
        b'X' => Err(SessionError::ClientEof("authentication")),
        _ => Err(SessionError::Protocol(ProtocolError::Unexpected(
            "expected SASL response",
        ))),
    }
}

/// SASLInitialResponse: mechanism name, then int32 length and the data.
fn initial_response(body: &[u8]) -> Result<(String, Vec<u8>), SessionError> {
    let malformed = || SessionError::Protocol(ProtocolError::Malformed("SASLInitialResponse"));
    let end = body.iter().position(|&b| b == 0).ok_or_else(malformed)?;
    let mechanism = std::str::from_utf8(&body[..end]).map_err(|_| malformed())?.to_string();
    let mut rest = &body[end + 1..];
    if rest.len() < 4 {
        return Err(malformed());
    }
    let len = rest.get_i32();
    if len < 0 || len as usize != rest.len() {
        return Err(malformed());
    }
    Ok((mechanism, rest.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_messages_are_framed_as_postgresql_frames_them() {
        let m = auth_sasl(&[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
        assert_eq!(&m[..], b"R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(initial_response(&body).expect("ok"), ("SCRAM-SHA-256".into(), b"abc".to_vec()));
        for bad in [&b"SCRAM"[..], b"SCRAM-SHA-256\0\0\0", b"SCRAM-SHA-256\0\0\0\0\x09abc", b"S\0\xff\xff\xff\xff"] {
            assert!(initial_response(bad).is_err(), "{bad:?}");
        }
        let f = final_and_ok("v=abc");
        assert_eq!(&f[..], b"R\0\0\0\x0d\0\0\0\x0cv=abcR\0\0\0\x08\0\0\0\0");
    }
}
