//! A connection from another replica of the fleet ([`crate::fleet`]):
//! mutual TLS (the fleet's CA vouches for the peer), the two hellos, then
//! one request: a probe (who is here) or a client's CancelRequest that a
//! peer received and this replica issued. The cancel is looked up among
//! this replica's own sessions only, never sent on again, and delivered
//! to the backend as a local one is. Nothing is answered.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::cancel::deliver;
use super::Context;
use crate::fleet::wire::{Hello, Request};
use crate::policy::cancel::Lookup;

/// Serves one peer connection, bounded by `fleet.timeout` until its
/// request has arrived.
pub async fn serve(tcp: TcpStream, from: SocketAddr, ctx: &Context) {
    let (Some(fleet), Some(tls)) = (&ctx.fleet, ctx.runtime.load().fleet_tls.as_ref().map(|t| t.server.clone())) else {
        return;
    };
    let me = fleet.me();
    let received = async {
        let mut link = TlsAcceptor::from(tls).accept(tcp).await?;
        link.write_all(&me.encode()).await?;
        link.flush().await?;
        let hello = Hello::read(&mut link).await?;
        let request = Request::read(&mut link).await?;
        Ok::<_, crate::fleet::PeerError>((hello, request))
    };
    let (hello, request) = match tokio::time::timeout(fleet.timeout(), received).await {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => return refused(ctx, from, &e),
        Err(_) => return refused(ctx, from, &crate::fleet::PeerError::Timeout),
    };
    // A later replica with this replica's id: logged, counted, not served.
    if fleet.met(&hello, from) {
        if matches!(request, Request::Cancel { .. }) {
            count(ctx, "refused");
        }
        return;
    }
    let Request::Cancel { source, packet } = request else {
        return;
    };
    let now = std::time::Instant::now();
    let result = match ctx.cancels.lookup_from_peer(source, &packet, now) {
        Lookup::Found(target) => deliver(ctx, target).await,
        other => other.as_str(),
    };
    debug!(%from, replica = hello.replica, %source, result, "CancelRequest from a peer");
    count(ctx, result);
}

fn refused(ctx: &Context, from: SocketAddr, why: &crate::fleet::PeerError) {
    if why.is_tls() {
        warn!(%from, "fleet: peer connection refused: {why}");
    } else {
        debug!(%from, "fleet: peer connection refused: {why}");
    }
    count(ctx, "refused");
}

fn count(ctx: &Context, result: &str) {
    ctx.metrics
        .cancel_peer
        .with_label_values(&["received", result])
        .inc();
}

