//! A flaky front for a real keyserver: a QUIC server with a certificate of
//! its own that answers each join by the next step of a script — refuse it
//! `Busy` or `Internal`, drop the connection after reading it, or pass it
//! (and everything after) to the keyserver. A token re-pointed at the front
//! ([`FrontCert::token`]) makes a sidecar meet those failures in order.

use std::net::SocketAddr;
use std::sync::Arc;

use meshlib::proto::{self, ErrorCode, Hello, JoinToken, ProtoError, ServerMsg};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

/// What the front does with one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Reads the hello, answers with this error code.
    Refuse(ErrorCode),
    /// Reads the hello, then closes the connection without an answer.
    Drop,
    /// Passes the hello and the rest of the stream to the keyserver.
    Forward,
}

/// The front's certificate, made before the front runs (a token can point
/// at a front that is not up yet).
pub struct FrontCert {
    cert: Vec<u8>,
    key: Vec<u8>,
    /// The certificate's SHA-256 (what a token pointing at it pins).
    pub fingerprint: [u8; 32],
}

impl FrontCert {
    /// A fresh self-signed certificate.
    pub fn new() -> Self {
        let ck = rcgen::generate_simple_self_signed(vec![proto::SERVER_NAME.to_owned()]).unwrap();
        let cert = ck.cert.der().to_vec();
        Self {
            fingerprint: proto::sha256(&cert),
            cert,
            key: ck.signing_key.serialize_der(),
        }
    }

    /// `token` re-pointed at a front on `addr` with this certificate.
    pub fn token(&self, token: &str, addr: SocketAddr) -> String {
        let mut t: JoinToken = token.parse().unwrap();
        t.addrs = vec![addr];
        t.cert_sha256 = self.fingerprint;
        t.to_string()
    }
}

/// A running front.
pub struct Front {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The hellos it saw, in order, as the step it applied.
    pub seen: Arc<Mutex<Vec<Step>>>,
    task: JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    /// Starts a front on `bind` with `cert` for the keyserver at `upstream`
    /// (pinned by `upstream_fp`); connections beyond the script are
    /// forwarded.
    pub fn start(
        bind: SocketAddr,
        cert: &FrontCert,
        upstream: SocketAddr,
        upstream_fp: [u8; 32],
        script: Vec<Step>,
    ) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(cert.cert.clone())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key.clone().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![proto::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, bind).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut script = script.into_iter();
            while let Some(incoming) = endpoint.accept().await {
                let step = script.next().unwrap_or(Step::Forward);
                let log = log.clone();
                tokio::spawn(async move {
                    let _ = serve(incoming, step, upstream, upstream_fp, &log).await;
                });
            }
        });
        Self { addr, seen, task }
    }
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// One connection: the hello, then the step.
async fn serve(
    incoming: quinn::Incoming,
    step: Step,
    upstream: SocketAddr,
    upstream_fp: [u8; 32],
    seen: &Mutex<Vec<Step>>,
) -> Result<(), Failure> {
    let conn = incoming.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello: Hello = proto::read_frame(&mut recv, proto::DEFAULT_MAX_FRAME).await?;
    seen.lock().push(step);
    match step {
        Step::Refuse(code) => {
            let msg = ServerMsg::Error(ProtoError {
                code,
                message: format!("front says {code:?}"),
            });
            proto::write_frame(&mut send, &msg, proto::DEFAULT_MAX_FRAME).await?;
            send.finish()?;
            conn.closed().await;
        }
        Step::Drop => conn.close(0u32.into(), b"dropped"),
        Step::Forward => {
            let client = meshlib::control::client_endpoint("127.0.0.1:0".parse()?)?;
            let cfg = meshlib::control::quic_config(upstream_fp, &Default::default())?;
            let up = client
                .connect_with(cfg, upstream, proto::SERVER_NAME)?
                .await?;
            let (mut up_send, mut up_recv) = up.open_bi().await?;
            proto::write_frame(&mut up_send, &hello, proto::DEFAULT_MAX_FRAME).await?;
            let to_server = tokio::io::copy(&mut recv, &mut up_send);
            let to_client = tokio::io::copy(&mut up_recv, &mut send);
            let _ = tokio::join!(to_server, to_client);
        }
    }
    Ok(())
}
