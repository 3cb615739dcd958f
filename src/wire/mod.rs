//! The PostgreSQL wire protocol as far as the proxy must understand it:
//! pre-startup packets ([`packet`]), typed messages during authentication
//! ([`message`]), the few messages the proxy writes itself ([`encode`]),
//! the `replication` startup parameter ([`replication`]) and the stream
//! type that is plaintext or TLS ([`stream`]).
//!
//! Every message is split off by its length header, with a hard cap, before
//! pgwire's decoders see it: those decoders are not hardened against
//! malformed input (they can panic on short bodies). Nothing here reads
//! more bytes from a socket than the message it was asked for, except
//! [`MessageReader`], whose buffered surplus is handed to the relay.
//! No sockets, no policy: bytes in, typed values out.

use crate::error::{sqlstate, ClientError, UserFacing};

pub mod encode;
pub mod message;
pub mod packet;
pub mod replication;
mod route_option;
pub mod stream;

pub use message::{Frame, MessageReader};
pub use packet::{read_packet, NamesError, Packet, StartupPacket, CANCEL_REQUEST_CODE};
pub use replication::Replication;
// What the fuzz targets and benches check against.
#[cfg(feature = "testing")]
pub use packet::{parse_packet, truncate_name, Names, MAX_STARTUP_PACKET_LENGTH, NAMEDATALEN};
#[cfg(feature = "testing")]
pub use replication::parse_bool;

/// Largest message either side may send while authentication is relayed.
/// PostgreSQL caps auth tokens at `PG_MAX_AUTH_TOKEN_LENGTH` (65535) and
/// libpq caps non-data backend messages at 30000 bytes; round up.
pub const MAX_AUTH_PHASE_MESSAGE: usize = 65_535 + 5;

/// A frontend protocol error: always answered with SQLSTATE 08P01.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid length of startup packet")]
    StartupLength,
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0 to 3.0")]
    UnsupportedVersion(u16, u16),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("invalid message length {0}")]
    MessageLength(i32),
    #[error("{0}")]
    Unexpected(&'static str),
}

impl UserFacing for ProtocolError {
    /// FATAL 08P01 with the violation, as PostgreSQL words it.
    fn client_error(&self) -> ClientError {
        ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string())
    }
}

/// Errors reading a packet: the peer closed, I/O, or a protocol error.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("peer closed the connection")]
    Eof,
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ReadError::Eof
        } else {
            ReadError::Io(e)
        }
    }
}
