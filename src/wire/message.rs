//! Typed messages (`type` + `int32 length` + body) during authentication,
//! read through a buffer whose surplus the relay takes over.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{ProtocolError, ReadError};

/// Reads typed messages (`type` + `int32 length` + body) through a buffer.
/// Whatever was read past the last returned message is kept and must be
/// forwarded by whoever takes over the stream ([`MessageReader::into_buffer`]).
pub struct MessageReader {
    buf: BytesMut,
    max_len: usize,
}

impl MessageReader {
    pub fn new(max_len: usize) -> Self {
        MessageReader {
            // Login messages are small; a long session should not keep a
            // big login buffer alive.
            buf: BytesMut::with_capacity(512),
            max_len,
        }
    }

    /// Next whole message (header included). Not cancel-safe across a
    /// partially read message only in that the partial bytes stay buffered,
    /// which is what a retry wants.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<Frame, ReadError> {
        loop {
            if self.buf.len() >= 5 {
                let len = (&self.buf[1..5]).get_i32();
                if len < 4 || len as usize > self.max_len {
                    return Err(ProtocolError::MessageLength(len).into());
                }
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let bytes = self.buf.split_to(total);
                    return Ok(Frame { bytes });
                }
                self.buf.reserve(total - self.buf.len());
            }
            if io.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Eof);
            }
        }
    }

    /// Waits until the peer has sent at least one byte (kept for
    /// [`MessageReader::next`]). Cancel-safe: a read either lands in the
    /// buffer or did not happen.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<(), ReadError> {
        if !self.buf.is_empty() {
            return Ok(());
        }
        if io.read_buf(&mut self.buf).await? == 0 {
            return Err(ReadError::Eof);
        }
        Ok(())
    }

    /// Bytes read past the last message returned.
    pub fn into_buffer(self) -> BytesMut {
        self.buf
    }
}

/// One typed message, header included.
#[derive(Debug)]
pub struct Frame {
    pub bytes: BytesMut,
}

impl Frame {
    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    /// The code of an Authentication ('R') message.
    pub fn auth_code(&self) -> Option<i32> {
        (self.tag() == b'R' && self.body().len() >= 4).then(|| (&self.body()[..4]).get_i32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn message_reader_keeps_surplus() {
        let mut data = vec![b'Z', 0, 0, 0, 5, b'I'];
        data.extend_from_slice(b"extra");
        let mut c = std::io::Cursor::new(data);
        let mut r = MessageReader::new(100);
        let f = r.next(&mut c).await.expect("frame");
        assert_eq!(f.tag(), b'Z');
        assert_eq!(f.body(), b"I");
        assert_eq!(&r.into_buffer()[..], b"extra");
    }

    #[tokio::test]
    async fn negative_lengths_are_reported_as_sent() {
        let mut c = std::io::Cursor::new(vec![b'R', 0xff, 0xff, 0xff, 0xfb]);
        let err = MessageReader::new(100)
            .next(&mut c)
            .await
            .expect_err("refused");
        assert_eq!(err.to_string(), "invalid message length -5");
    }

    #[tokio::test]
    async fn message_reader_caps_length() {
        let mut c = std::io::Cursor::new(vec![b'p', 0x7f, 0, 0, 0]);
        let mut r = MessageReader::new(100);
        assert!(matches!(
            r.next(&mut c).await,
            Err(ReadError::Protocol(ProtocolError::MessageLength(_)))
        ));
    }
}
