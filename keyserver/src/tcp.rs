//! The keyserver's TCP port (TLS 1.3, the QUIC certificate): for members
//! whose UDP is blocked. By ALPN it carries the control protocol (the same
//! frames and [`crate::session::StreamSession`] as QUIC, with the same
//! admission) or the relay (`relay::tcp_session`), as DERP does
//! over HTTPS.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use meshlib::proto;

use crate::quic::Gate;
use crate::relay::RelayShared;
use crate::server::Shared;

/// Why the TLS setup failed.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup for the TCP port: {0}")]
pub struct TcpSetupError(String);

/// The TLS acceptor with the keyserver's certificate, offering both ALPNs.
pub fn acceptor(
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
) -> Result<tokio_rustls::TlsAcceptor, TcpSetupError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TcpSetupError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
        )
        .map_err(|e| TcpSetupError(e.to_string()))?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec(), proto::ALPN_RELAY.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Accepts TCP connections until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    relay: Option<Arc<RelayShared>>,
    shutdown: impl Future<Output = ()>,
) {
    let gate = Gate::new(&shared);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("TCP accept: {e}");
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        let (acceptor, shared, relay, gate) = (
            acceptor.clone(),
            shared.clone(),
            relay.clone(),
            gate.clone(),
        );
        tasks.spawn(connection(stream, remote, acceptor, shared, relay, gate));
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

async fn connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    relay: Option<Arc<RelayShared>>,
    gate: Arc<Gate>,
) {
    let timeout = shared.limits.hello_timeout;
    let mut ticket = gate.admit(remote, timeout);
    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        _ => return,
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    match alpn.as_deref() {
        Some(a) if a == proto::ALPN => {
            use tokio::io::AsyncWriteExt as _;
            let (recv, mut send) = tokio::io::split(tls);
            let observe = move || remote;
            let result =
                crate::quic::drive_stream(&observe, &mut send, recv, &shared, &mut ticket).await;
            if let Err(fatal) = result {
                tracing::debug!(%remote, code = ?fatal.0, message = %fatal.1, "session (tcp) ended");
                let _ =
                    proto::write_frame(&mut send, &fatal.frame(), shared.limits.max_frame).await;
            }
            let _ = send.shutdown().await;
        }
        Some(a) if a == proto::ALPN_RELAY => {
            if let Some(relay) = relay {
                crate::relay::tcp_session(tls, relay, Some(ticket)).await;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use meshlib::ids::NetworkId;
    use meshlib::keys::PrivateKey;
    use meshlib::nat::relay::{self, Ticket, TicketBody};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use crate::quic::Gate;
    use crate::server::{Limits, Shared};
    use crate::store::MemStore;

    /// A relay connection on the TCP port that never registers lives on
    /// the unauthenticated budget and is closed at the hello deadline
    /// (issue 20: 8,000 of them held 682 MiB); a registered one stays.
    #[tokio::test]
    async fn unregistered_relay_connections_end_at_the_hello_deadline() {
        let limits = Limits {
            hello_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (shared, _) = Shared::new(
            Box::new(MemStore::new()),
            limits,
            [7; 32],
            SystemTime::now(),
        )
        .unwrap();
        let gate = Gate::new(&shared);
        let secret = [9; 32];
        let udp = crate::relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let handle =
            crate::relay::serve_udp(udp, secret, crate::relay::RelayLimits::default()).unwrap();
        let remote = "127.0.0.1:4000".parse().unwrap();

        // Silent: closed at the deadline.
        let (mut silent, server) = tokio::io::duplex(4096);
        let ticket = gate.admit(remote, Duration::from_millis(500));
        let started = Instant::now();
        let session = tokio::spawn(crate::relay::tcp_session(
            server,
            handle.shared.clone(),
            Some(ticket),
        ));
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("closed in time")
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400));
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest))
            .await
            .expect("the silent side sees the end")
            .ok();

        // Registered: still open past the deadline.
        let (mut member, server) = tokio::io::duplex(4096);
        let ticket = gate.admit(remote, Duration::from_millis(500));
        let session = tokio::spawn(crate::relay::tcp_session(
            server,
            handle.shared.clone(),
            Some(ticket),
        ));
        let t = Ticket::sign(
            &secret,
            TicketBody {
                network: NetworkId::random(),
                public_key: PrivateKey::generate().public_key(),
                ip: "10.240.0.1".parse().unwrap(),
                expires: u64::MAX,
            },
        )
        .to_bytes();
        let frame = relay::register(&t);
        member
            .write_all(&(frame.len() as u16).to_be_bytes())
            .await
            .unwrap();
        member.write_all(&frame).await.unwrap();
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), member.read_exact(&mut len))
            .await
            .expect("registration answered in time")
            .expect("registered answer");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!session.is_finished(), "a registered member is kept");
        drop(member);
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("ends when the member goes")
            .unwrap();
    }
}
