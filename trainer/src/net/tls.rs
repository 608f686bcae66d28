//! TLS and QUIC client configuration of a trainer.
//!
//! A trainer trusts the coordinator either by pinning the SHA-256 fingerprint of its leaf
//! certificate (the usual case with the coordinator's self-signed certificate) or through a CA
//! file (an operator-provided certificate). Either way the connection uses the ring provider,
//! TLS 1.3 only and ALPN `tributary/1`.
//!
//! This module deliberately does not depend on the coordinator crate: a trainer only knows what
//! an operator tells it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::NetError;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{IdleTimeout, TransportConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, DigitallySignedStruct, OtherError, PeerIncompatible, SignatureScheme,
};
use sha2::{Digest, Sha256};

/// The ALPN protocol identifier of Tributary's QUIC protocol, version 1.
pub const ALPN: &[u8] = b"tributary/1";

/// Interval of keep-alive packets sent by the trainer.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection silent for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a trainer decides to trust the coordinator's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// Accept exactly the leaf certificate with this SHA-256, hex (either case, `:` separators
    /// allowed), whatever the server name.
    Fingerprint(String),
    /// Verify the chain against the CA certificates in this PEM file, and the server name.
    CaFile(PathBuf),
}

/// Builds the QUIC client configuration for `trust`: ring provider, TLS 1.3 only, ALPN
/// [`ALPN`], keep-alive every 5 s and a 30 s idle timeout.
pub fn client_config(trust: &ServerTrust) -> Result<quinn::ClientConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(format!("ring provider does not support tls 1.3: {e}")))?;
    let mut tls = match trust {
        ServerTrust::Fingerprint(pin) => {
            let verifier = PinnedServerVerifier {
                pin: parse_fingerprint(pin)?,
                provider,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
        ServerTrust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    NetError::Tls(format!(
                        "cannot read ca certificates from {}: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(NetError::Tls(format!(
                    "no ca certificate in {}",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    NetError::Tls(format!("invalid ca certificate in {}: {e}", path.display()))
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];

    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| NetError::Tls(format!("tls configuration is unusable for quic: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s fits in a quic varint"),
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts exactly one leaf certificate, by SHA-256, but still checks that the server holds its
/// key (the TLS 1.3 `CertificateVerify` signature).
struct PinnedServerVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PinnedServerVerifier")
            .field("pin", &hex::encode(self.pin))
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        match constant_time_eq(&digest, &self.pin) {
            true => Ok(ServerCertVerified::assertion()),
            false => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(FingerprintMismatch {
                    expected: hex::encode(self.pin),
                    actual: hex::encode(digest),
                })),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configuration offers TLS 1.3 only; refuse rather than trust a TLS 1.2 handshake.
        Err(rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// The server presented a certificate other than the pinned one.
#[derive(Debug)]
struct FingerprintMismatch {
    expected: String,
    actual: String,
}

impl fmt::Display for FingerprintMismatch {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "server certificate sha-256 {} does not match the pinned {}",
            self.actual, self.expected
        )
    }
}

impl std::error::Error for FingerprintMismatch {}

/// Parses a hex SHA-256 fingerprint, ignoring case, `:` separators and surrounding whitespace.
fn parse_fingerprint(text: &str) -> Result<[u8; 32], NetError> {
    let digits: String = text.trim().chars().filter(|&c| c != ':').collect();
    let mut pin = [0u8; 32];
    if let Err(error) = hex::decode_to_slice(&digits, &mut pin) {
        return Err(NetError::Tls(format!(
            "server fingerprint {text:?} is not 64 hex digits: {error}"
        )));
    }
    Ok(pin)
}

/// Compares without an early exit, so the time taken does not reveal where a mismatch is.
fn constant_time_eq(left: &[u8; 32], right: &[u8; 32]) -> bool {
    let difference = left
        .iter()
        .zip(right)
        .fold(0u8, |acc, (left_byte, right_byte)| {
            acc | (left_byte ^ right_byte)
        });
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_parsing() {
        let lower = "ab".repeat(32);
        let expected = [0xab; 32];
        assert_eq!(parse_fingerprint(&lower).unwrap(), expected);
        assert_eq!(parse_fingerprint(&lower.to_uppercase()).unwrap(), expected);
        let with_colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&with_colons).unwrap(), expected);
        assert!(parse_fingerprint("ab").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        assert!(parse_fingerprint("").is_err());
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let zeros = [0u8; 32];
        let mut last_differs = [0u8; 32];
        last_differs[31] = 1;
        assert!(constant_time_eq(&zeros, &zeros));
        assert!(!constant_time_eq(&zeros, &last_differs));
    }

    #[test]
    fn pinned_config_builds() {
        client_config(&ServerTrust::Fingerprint("00".repeat(32))).unwrap();
    }

    #[test]
    fn bad_pin_is_an_error() {
        assert!(client_config(&ServerTrust::Fingerprint("nope".to_owned())).is_err());
    }

    #[test]
    fn missing_ca_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let trust = ServerTrust::CaFile(dir.path().join("absent.pem"));
        assert!(client_config(&trust).is_err());
    }

    #[test]
    fn empty_ca_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, b"").unwrap();
        assert!(client_config(&ServerTrust::CaFile(path)).is_err());
    }

    #[test]
    fn pinned_verifier_rejects_another_certificate() {
        let verifier = PinnedServerVerifier {
            pin: [0; 32],
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        let cert = CertificateDer::from(vec![1, 2, 3]);
        let name = ServerName::try_from("localhost").unwrap();
        let result = verifier.verify_server_cert(&cert, &[], &name, &[], UnixTime::now());
        assert!(result.is_err());

        let pinned = PinnedServerVerifier {
            pin: Sha256::digest([1, 2, 3]).into(),
            provider: verifier.provider.clone(),
        };
        let result = pinned.verify_server_cert(&cert, &[], &name, &[], UnixTime::now());
        assert!(result.is_ok());
    }
}
