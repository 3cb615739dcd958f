//! Listening sockets: resolve, bind with an explicit backlog, and report the
//! backlog the kernel will really use.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// An address that cannot be bound; names the config key.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} ({key}): {source}")]
pub struct BindError {
    pub key: &'static str,
    pub address: String,
    pub source: std::io::Error,
}

/// Binds `address` (every address it resolves to, first success wins) with
/// an explicit listen backlog: tokio's `TcpListener::bind` always asks for
/// 128, which a burst of connects overflows.
pub async fn bind(
    key: &'static str,
    address: &str,
    backlog: u32,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |source| BindError {
        key,
        address: address.to_string(),
        source,
    };
    let mut last = None;
    for addr in tokio::net::lookup_host(address).await.map_err(err)? {
        match listen_on(addr, backlog) {
            Ok(listener) => {
                let local = listener.local_addr().map_err(err)?;
                return Ok((listener, local));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "resolves to no address")
    })))
}

fn listen_on(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As tokio's own bind: a restarted proxy must not wait out TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The backlog the kernel will actually use: Linux silently caps it at
/// `net.core.somaxconn`.
pub fn effective_backlog(backlog: u32) -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(backlog, |cap| backlog.min(cap))
}
