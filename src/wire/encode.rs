//! The few messages the proxy writes itself, byte for byte as PostgreSQL
//! writes them. ErrorResponse is encoded by [`crate::error::ClientError`],
//! the allow-list of what a client may be told.

use bytes::BytesMut;
use pgwire::messages::startup::{NegotiateProtocolVersion, Startup};
use pgwire::messages::Message;

use super::{ProtocolError, CANCEL_REQUEST_CODE};

/// AuthenticationOk, sent by the proxy after it logged in on the client's
/// behalf.
pub const AUTHENTICATION_OK: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];

/// NegotiateProtocolVersion naming protocol 3.`minor` and the `_pq_.`
/// options not supported. The full version number, as PostgreSQL sends it
/// (libpq 18 reads a bare minor number as a downgrade below 3.0).
pub fn negotiate_protocol_version(
    minor: u16,
    options: Vec<String>,
) -> Result<BytesMut, ProtocolError> {
    let version = Startup::PROTOCOL_VERSION_3_0 | i32::from(minor);
    let msg = NegotiateProtocolVersion::new(version, options);
    let mut buf = BytesMut::with_capacity(msg.message_length() + 1);
    msg.encode(&mut buf)
        .map_err(|_| ProtocolError::Malformed("startup options"))?;
    Ok(buf)
}

/// A protocol 3.0 CancelRequest for a backend key.
pub fn cancel_request(pid: i32, secret: [u8; 4]) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(&16i32.to_be_bytes());
    p[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    p[8..12].copy_from_slice(&pid.to_be_bytes());
    p[12..].copy_from_slice(&secret);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_protocol_version_layout() {
        let buf = negotiate_protocol_version(0, vec!["_pq_.x".into()]).expect("encode");
        assert_eq!(buf[0], b'v');
        assert_eq!(&buf[5..9], &196608i32.to_be_bytes());
        assert_eq!(&buf[9..13], &1i32.to_be_bytes());
        assert_eq!(&buf[13..], b"_pq_.x\0");
    }

    #[test]
    fn cancel_request_layout() {
        let p = cancel_request(7, [1, 2, 3, 4]);
        assert_eq!(p, [0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 7, 1, 2, 3, 4]);
    }
}
