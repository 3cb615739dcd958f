//! What a client may be told: a SQLSTATE and a fixed, safe text
//! ([`ClientError`]), and the SQLSTATEs the proxy sends. This module is the
//! bottom of the crate: it imports nothing of ours. Each error type says
//! how it looks to a client where it is defined, through [`UserFacing`];
//! [`crate::conn::error::SessionError`] gathers them for one connection.
//! I/O and library error text (which can carry paths or addresses) never
//! goes into a [`ClientError`]: it stays in the log.

use bytes::{Bytes, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;

/// SQLSTATEs the proxy itself sends.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const SERVER_REJECTED_CONNECTION: &str = "08004";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const QUERY_CANCELED: &str = "57014";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
}

/// An error that knows what its client may be told.
pub trait UserFacing {
    /// The FATAL ErrorResponse for the client.
    fn client_error(&self) -> ClientError;
}

/// What a client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub sqlstate: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ClientError {
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            sqlstate,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The ErrorResponse message, severity FATAL.
    pub fn to_bytes(&self) -> Bytes {
        let mut info = ErrorInfo::new("FATAL".into(), self.sqlstate.into(), self.message.clone());
        info.severity_nonlocalized = Some("FATAL".into());
        info.detail = self.detail.clone();
        info.hint = self.hint.clone();
        let response = ErrorResponse::from(info);
        let mut buf = BytesMut::with_capacity(response.message_length() + 1);
        // Encoding into a BytesMut cannot fail for a message this small.
        let _ = response.encode(&mut buf);
        buf.freeze()
    }
}
