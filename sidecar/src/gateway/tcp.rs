//! TCP mode (every TCP port but 80 and 443): TLS terminated with the
//! gateway's certificate, then bytes both ways to an instance. The TLS
//! ClientHello's SNI picks the group before anything else happens, so a
//! connection that is refused (hard limit, queue timeout, no instance, an
//! unknown name) is closed without completing the handshake.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::routes::{RouteSettings, Routes};

/// What every TCP-mode connection shares.
pub struct TcpCtx {
    /// The groups.
    pub routes: Arc<Routes>,
    /// Timeouts.
    pub settings: RouteSettings,
    /// The TLS configuration (the wildcard certificate, no ALPN).
    pub tls: Arc<rustls::ServerConfig>,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
}

/// Serves one TCP-mode connection on `port`.
pub async fn serve(ctx: Arc<TcpCtx>, stream: TcpStream, peer: SocketAddr, port: u16) {
    let accept = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match tokio::time::timeout(ctx.handshake_timeout, accept).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::debug!(%peer, port, error = %e, "not a TLS ClientHello; closed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, port, "no TLS ClientHello in time; closed");
            return;
        }
    };
    let sni = start.client_hello().server_name().map(str::to_owned);
    let Some((rt, route)) = ctx.routes.find(port, sni.as_deref()) else {
        tracing::debug!(%peer, port, sni = ?sni, "no service group for this name; closed");
        return;
    };
    // Refused (or nothing reachable): the connection closes unanswered.
    let Some((slot, mut upstream)) = rt
        .connect(
            peer.ip().to_canonical(),
            route.destination_port,
            &ctx.settings,
            &ctx.routes.gateway,
        )
        .await
    else {
        return;
    };
    let tls = match tokio::time::timeout(ctx.handshake_timeout, start.into_stream(ctx.tls.clone()))
        .await
    {
        Ok(Ok(tls)) => tls,
        _ => {
            tracing::debug!(%peer, port, "TLS handshake failed; closed");
            return;
        }
    };
    let mut tls = tls;
    let (up, down) = match tokio::io::copy_bidirectional(&mut tls, &mut upstream).await {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(%peer, port, error = %e, "TCP-mode connection ended with an error");
            (0, 0)
        }
    };
    for (c, n_in, n_out) in [
        (&rt.stats.total, up, down),
        (slot.counters.as_ref(), up, down),
    ] {
        c.bytes_in.fetch_add(n_in, Relaxed);
        c.bytes_out.fetch_add(n_out, Relaxed);
    }
    drop(slot);
}
