//! The coordinator's TLS identity and its QUIC server configuration.
//!
//! The coordinator either serves an operator-provided certificate ([`load_pem`]) or makes a
//! self-signed one on first start and keeps it under `data_dir/tls/` ([`load_or_create`]), so
//! that trainers can pin its SHA-256 fingerprint across restarts. [`server_config`] turns an
//! identity plus [`TransportLimits`] into a `quinn::ServerConfig`: ring provider, TLS 1.3 only,
//! ALPN [`ALPN`], no client certificates (trainers authenticate inside the protocol).
//!
//! This module deliberately knows nothing about trainers, rounds or the wire protocol.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt, VarIntBoundsExceeded};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// The ALPN protocol identifier of Tributary's QUIC protocol, version 1.
pub const ALPN: &[u8] = b"tributary/1";

/// Sub-directory of the data directory that holds the generated certificate and key.
const TLS_DIR: &str = "tls";
/// File name of the generated certificate, PEM.
const CERT_FILE: &str = "cert.pem";
/// File name of the generated private key, PEM (PKCS#8).
const KEY_FILE: &str = "key.pem";

/// The coordinator's certificate chain and private key.
///
/// `Debug` never prints the key: `PrivateKeyDer` elides it.
#[derive(Debug)]
pub struct ServerIdentity {
    /// The certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf certificate's private key.
    pub key: PrivateKeyDer<'static>,
    /// Lower-case hex SHA-256 of the leaf certificate's DER: what trainers pin.
    pub fingerprint: String,
}

/// QUIC transport limits applied to every trainer connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// How many bidirectional streams a trainer may have open at once.
    pub max_concurrent_bidi_streams: u32,
    /// How many unidirectional streams a trainer may have open at once.
    pub max_concurrent_uni_streams: u32,
    /// A connection silent for this long is closed; `Duration::ZERO` disables the timeout.
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets; `Duration::ZERO` disables them.
    pub keep_alive: Duration,
    /// Bytes a trainer may send on one stream before the coordinator reads them.
    pub stream_receive_window: u32,
    /// Bytes a trainer may send over all streams of a connection before the coordinator reads
    /// them (an honest trainer uploads one delta at a time).
    pub receive_window: u32,
    /// Bytes the coordinator buffers for one connection's outgoing streams (a trainer that
    /// stops reading its downloads pins at most this).
    pub send_window: u32,
    /// The same before the trainer's hello is checked: an unauthenticated peer may only send
    /// its hello, so it gets a small window and may open no stream at all (the limits above
    /// apply from [`TransportLimits::open_after_handshake`] on).
    pub handshake_receive_window: u32,
    /// Connections accepted by QUIC but not yet taken by the accept loop, at most.
    pub max_incoming: usize,
}

impl TransportLimits {
    /// Lifts a connection from the handshake limits to the full ones, once its hello checked.
    pub fn open_after_handshake(&self, connection: &quinn::Connection) {
        connection.set_receive_window(VarInt::from_u32(self.receive_window));
        connection
            .set_max_concurrent_bi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams));
        connection
            .set_max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams));
    }
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_concurrent_bidi_streams: 8,
            max_concurrent_uni_streams: 16,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            stream_receive_window: 4 * 1024 * 1024,
            receive_window: 8 * 1024 * 1024,
            send_window: 8 * 1024 * 1024,
            handshake_receive_window: 64 * 1024,
            max_incoming: 4096,
        }
    }
}

/// Errors of loading, creating or using the coordinator's TLS identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file or directory could not be read, written or synced.
    #[error("i/o error on {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A PEM file could not be read or holds no item of the expected kind.
    #[error("cannot read {what} from pem file {path}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// `"certificates"` or `"a private key"`.
        what: &'static str,
        /// The cause.
        #[source]
        source: pem::Error,
    },
    /// The private key cannot be used, or does not belong to the leaf certificate.
    #[error("private key in {key_path} is unusable with the certificate in {cert_path}")]
    KeyMismatch {
        /// The certificate file.
        cert_path: PathBuf,
        /// The key file.
        key_path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// rcgen failed to make a self-signed certificate.
    #[error("cannot generate a self-signed certificate for names {names:?}")]
    Generate {
        /// The subject alternative names asked for.
        names: Vec<String>,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// rustls rejected the identity or the protocol settings.
    #[error("invalid rustls server configuration")]
    Rustls {
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// The rustls configuration lacks the cipher suite QUIC needs for initial packets.
    #[error("rustls configuration is unusable for quic")]
    Quic {
        /// The cause.
        #[source]
        source: NoInitialCipherSuite,
    },
    /// A transport limit is too large for QUIC.
    #[error("transport limit {field} is out of range")]
    TransportLimit {
        /// The `TransportLimits` field.
        field: &'static str,
        /// The cause.
        #[source]
        source: VarIntBoundsExceeded,
    },
}

/// Loads the self-signed identity kept in `data_dir/tls/`, or makes and stores one.
///
/// `names` become the certificate's subject alternative names; names that parse as IP
/// addresses become IP SANs, the rest DNS SANs. They are used only when a certificate is made:
/// a stored certificate is returned unchanged, so its fingerprint is stable across restarts.
///
/// The key is written before the certificate, each atomically (temporary file, fsync, rename,
/// fsync of the directory), so the certificate file marks a complete identity: if it is absent,
/// a new identity is made and any leftover key is replaced; if it is present, the key must be
/// too.
pub fn load_or_create(data_dir: &Path, names: &[String]) -> Result<ServerIdentity, TlsError> {
    let tls_dir = data_dir.join(TLS_DIR);
    let cert_path = tls_dir.join(CERT_FILE);
    let key_path = tls_dir.join(KEY_FILE);
    if cert_path.try_exists().map_err(|source| TlsError::Io {
        path: cert_path.clone(),
        source,
    })? {
        return load_pem(&cert_path, &key_path);
    }

    let certified = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|source| {
        TlsError::Generate {
            names: names.to_vec(),
            source,
        }
    })?;
    create_private_dir(&tls_dir)?;
    write_atomically(
        &key_path,
        certified.signing_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_atomically(&cert_path, certified.cert.pem().as_bytes(), false)?;

    let leaf = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    Ok(ServerIdentity {
        fingerprint: fingerprint(&leaf),
        cert_chain: vec![leaf],
        key,
    })
}

/// Loads an operator-provided certificate chain (leaf first) and private key, both PEM.
///
/// The key may be PKCS#8, PKCS#1 or SEC1; it must parse with the ring provider and match the
/// leaf certificate.
pub fn load_pem(cert_path: &Path, key_path: &Path) -> Result<ServerIdentity, TlsError> {
    let cert_chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .and_then(|certs| match certs.is_empty() {
            true => Err(pem::Error::NoItemsFound),
            false => Ok(certs),
        })
        .map_err(|source| TlsError::Pem {
            path: cert_path.to_path_buf(),
            what: "certificates",
            source,
        })?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Pem {
        path: key_path.to_path_buf(),
        what: "a private key",
        source,
    })?;

    // Catch a wrong or unsupported key now, with both paths in the error, rather than when the
    // endpoint is built.
    rustls::sign::CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &ring_provider())
        .map_err(|source| TlsError::KeyMismatch {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            source,
        })?;

    Ok(ServerIdentity {
        fingerprint: fingerprint(&cert_chain[0]),
        cert_chain,
        key,
    })
}

/// Builds the QUIC server configuration: ring provider, TLS 1.3 only, ALPN [`ALPN`], no client
/// authentication, and a transport configuration from `limits`.
pub fn server_config(
    identity: &ServerIdentity,
    limits: &TransportLimits,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(ring_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls { source })?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|source| TlsError::Rustls { source })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];

    let quic = QuicServerConfig::try_from(tls).map_err(|source| TlsError::Quic { source })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(limits)?));
    config.max_incoming(limits.max_incoming);
    Ok(config)
}

/// Lower-case hex SHA-256 of a certificate's DER encoding.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// The crypto provider of every TLS configuration in this module.
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn transport_config(limits: &TransportLimits) -> Result<TransportConfig, TlsError> {
    let idle_timeout =
        IdleTimeout::try_from(limits.idle_timeout).map_err(|source| TlsError::TransportLimit {
            field: "idle_timeout",
            source,
        })?;
    let keep_alive = (!limits.keep_alive.is_zero()).then_some(limits.keep_alive);

    let mut transport = TransportConfig::default();
    // Until the hello is checked: no peer-opened streams and a small window (the control
    // stream is opened by the coordinator).
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(idle_timeout))
        .keep_alive_interval(keep_alive)
        .stream_receive_window(VarInt::from_u32(limits.stream_receive_window))
        .receive_window(VarInt::from_u32(limits.handshake_receive_window))
        .send_window(u64::from(limits.send_window));
    Ok(transport)
}

/// Creates `dir` and its parents; on unix, `dir` itself is made readable by its owner only.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// [`crate::durable::write_atomically`], with this module's error.
fn write_atomically(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    crate::durable::write_atomically(path, contents, secret).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_names() -> Vec<String> {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    }

    #[test]
    fn create_then_load_gives_the_same_identity() {
        let data_dir = tempfile::tempdir().unwrap();
        let first = load_or_create(data_dir.path(), &default_names()).unwrap();
        let second = load_or_create(data_dir.path(), &default_names()).unwrap();
        assert_eq!(first.fingerprint, second.fingerprint);
        assert_eq!(first.cert_chain, second.cert_chain);
        assert_eq!(first.key, second.key);
    }

    #[test]
    fn fingerprint_is_64_lower_case_hex_chars() {
        let data_dir = tempfile::tempdir().unwrap();
        let identity = load_or_create(data_dir.path(), &default_names()).unwrap();
        assert_eq!(identity.fingerprint.len(), 64);
        assert!(identity
            .fingerprint
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(identity.fingerprint, fingerprint(&identity.cert_chain[0]));
    }

    #[test]
    fn load_pem_of_written_files_gives_the_same_fingerprint() {
        let data_dir = tempfile::tempdir().unwrap();
        let created = load_or_create(data_dir.path(), &default_names()).unwrap();
        let tls_dir = data_dir.path().join(TLS_DIR);
        let loaded = load_pem(&tls_dir.join(CERT_FILE), &tls_dir.join(KEY_FILE)).unwrap();
        assert_eq!(created.fingerprint, loaded.fingerprint);
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let data_dir = tempfile::tempdir().unwrap();
        load_or_create(data_dir.path(), &default_names()).unwrap();
        let key_path = data_dir.path().join(TLS_DIR).join(KEY_FILE);
        let mode = fs::metadata(key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn leftover_key_without_certificate_is_replaced() {
        let data_dir = tempfile::tempdir().unwrap();
        let tls_dir = data_dir.path().join(TLS_DIR);
        fs::create_dir_all(&tls_dir).unwrap();
        fs::write(tls_dir.join(KEY_FILE), b"half-written").unwrap();
        let created = load_or_create(data_dir.path(), &default_names()).unwrap();
        let loaded = load_or_create(data_dir.path(), &default_names()).unwrap();
        assert_eq!(created.fingerprint, loaded.fingerprint);
    }

    #[test]
    fn garbage_pem_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        fs::write(&cert_path, b"-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        fs::write(&key_path, b"garbage").unwrap();
        let error = load_pem(&cert_path, &key_path).unwrap_err();
        assert!(
            matches!(
                error,
                TlsError::Pem {
                    what: "certificates",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn garbage_key_is_an_error() {
        let data_dir = tempfile::tempdir().unwrap();
        load_or_create(data_dir.path(), &default_names()).unwrap();
        let tls_dir = data_dir.path().join(TLS_DIR);
        fs::write(tls_dir.join(KEY_FILE), b"no key here").unwrap();
        let error = load_pem(&tls_dir.join(CERT_FILE), &tls_dir.join(KEY_FILE)).unwrap_err();
        assert!(
            matches!(
                error,
                TlsError::Pem {
                    what: "a private key",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn key_of_another_certificate_is_an_error() {
        let first_dir = tempfile::tempdir().unwrap();
        let second_dir = tempfile::tempdir().unwrap();
        load_or_create(first_dir.path(), &default_names()).unwrap();
        load_or_create(second_dir.path(), &default_names()).unwrap();
        let cert_path = first_dir.path().join(TLS_DIR).join(CERT_FILE);
        let key_path = second_dir.path().join(TLS_DIR).join(KEY_FILE);
        let error = load_pem(&cert_path, &key_path).unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
    }

    #[test]
    fn missing_files_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = load_pem(&dir.path().join("a.pem"), &dir.path().join("b.pem")).unwrap_err();
        assert!(matches!(error, TlsError::Pem { .. }), "{error:?}");
    }

    #[test]
    fn server_config_builds_with_default_limits() {
        let data_dir = tempfile::tempdir().unwrap();
        let identity = load_or_create(data_dir.path(), &default_names()).unwrap();
        server_config(&identity, &TransportLimits::default()).unwrap();
    }

    #[test]
    fn huge_idle_timeout_is_an_error() {
        let limits = TransportLimits {
            idle_timeout: Duration::MAX,
            ..TransportLimits::default()
        };
        let error = transport_config(&limits).unwrap_err();
        assert!(
            matches!(
                error,
                TlsError::TransportLimit {
                    field: "idle_timeout",
                    ..
                }
            ),
            "{error:?}"
        );
    }
}
