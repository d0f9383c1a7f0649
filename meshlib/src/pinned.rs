//! Certificate pinning, for every TLS connection a member opens to the
//! keyserver (control over QUIC or TCP) and to its relay (over TCP): the
//! client accepts exactly the certificate whose SHA-256 matches the
//! fingerprint carried in the join token, and still checks that the server
//! holds its private key (handshake signature). Its own module, so that the
//! control client and the data plane's relay both use it without depending
//! on each other.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

use crate::proto::sha256;

/// The rustls client configuration pinning `fingerprint`: TLS 1.3 only,
/// ALPN `alpn`, ring's algorithms.
pub fn client_config(fingerprint: [u8; 32], alpn: &[u8]) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCert::new(fingerprint, provider.clone());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A [`ServerCertVerifier`] that pins the end-entity certificate's SHA-256.
#[derive(Debug)]
pub struct PinnedCert {
    /// The expected SHA-256 of the certificate's DER bytes.
    fingerprint: [u8; 32],
    /// The crypto provider whose algorithms check the handshake signature.
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    /// A verifier accepting only the certificate with this fingerprint.
    pub fn new(fingerprint: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self {
            fingerprint,
            provider,
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // Constant-time is not needed: the fingerprint is public.
        if sha256(end_entity.as_ref()) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
