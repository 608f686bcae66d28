//! TLS to PostgreSQL. A connection URL asking for TLS (`sslmode=require`, `verify-ca` or
//! `verify-full`) gets it, with the server's certificate always verified, host name included,
//! against `sslrootcert=FILE` (a PEM bundle, e.g. a managed database's CA) or else the
//! system's trusted roots. Stricter than libpq's `require`, which accepts any certificate: a
//! coordinator whose every acknowledgement rests on this server never talks to one it has not
//! authenticated. Without those settings the session stays plain TCP, as before.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::db::DbError;

/// A connection URL with the TLS options this store handles itself taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SplitUrl {
    /// What `tokio-postgres` parses (`sslmode=require` when TLS was asked for).
    pub url: String,
    /// Whether TLS is required.
    pub tls: bool,
    /// The CA bundle to verify the server with, instead of the system's roots.
    pub root_cert: Option<PathBuf>,
}

/// Takes `sslmode` and `sslrootcert` out of `url`'s query.
pub(crate) fn split_url(url: &str) -> Result<SplitUrl, DbError> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let (mut tls, mut mode_given, mut root_cert) = (false, false, None);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", mode)) => {
                mode_given = true;
                match mode {
                    "disable" | "prefer" | "allow" => tls = false,
                    "require" | "verify-ca" | "verify-full" => tls = true,
                    other => {
                        return Err(DbError::Config(format!(
                            "sslmode={other}: use disable, require, verify-ca or verify-full"
                        )))
                    }
                }
            }
            Some(("sslrootcert", path)) => root_cert = Some(PathBuf::from(path)),
            _ => kept.push(pair),
        }
    }
    if root_cert.is_some() {
        if mode_given && !tls {
            return Err(DbError::Config(
                "sslrootcert is set but sslmode turns TLS off; use sslmode=verify-full".into(),
            ));
        }
        tls = true;
    }
    if tls {
        kept.push("sslmode=require");
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(SplitUrl {
        url,
        tls,
        root_cert,
    })
}

/// The TLS connector for `root_cert`, or the system's roots without one.
pub(crate) fn connector(root_cert: Option<&std::path::Path>) -> Result<MakeRustlsConnect, DbError> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certificates = CertificateDer::pem_file_iter(path).map_err(|error| {
                DbError::Config(format!("sslrootcert {}: {error}", path.display()))
            })?;
            for certificate in certificates {
                let certificate = certificate.map_err(|error| {
                    DbError::Config(format!("sslrootcert {}: {error}", path.display()))
                })?;
                roots.add(certificate).map_err(|error| {
                    DbError::Config(format!("sslrootcert {}: {error}", path.display()))
                })?;
            }
        }
        None => {
            for certificate in rustls_native_certs::load_native_certs().certs {
                // A system bundle may hold a certificate rustls cannot use; the rest still count.
                let _ = roots.add(certificate);
            }
        }
    }
    if roots.is_empty() {
        return Err(DbError::Config(
            "TLS to PostgreSQL needs a CA to verify the server with: no trusted roots found; \
             pass sslrootcert=FILE"
                .into(),
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| DbError::Config(format!("tls: {error}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_stay_plain() {
        let split = split_url("postgres://u@h:5432/db?connect_timeout=10").unwrap();
        assert_eq!(split.url, "postgres://u@h:5432/db?connect_timeout=10");
        assert!(!split.tls);
        let split = split_url("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(
            (split.url.as_str(), split.tls),
            ("postgres://u@h/db", false)
        );
    }

    #[test]
    fn every_tls_mode_verifies() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let split = split_url(&format!(
                "postgres://u@h/db?sslmode={mode}&connect_timeout=5"
            ))
            .unwrap();
            assert!(split.tls);
            assert_eq!(
                split.url,
                "postgres://u@h/db?connect_timeout=5&sslmode=require"
            );
            assert_eq!(split.root_cert, None);
        }
        let split = split_url("postgres://u@h/db?sslrootcert=/etc/ca.pem").unwrap();
        assert!(split.tls, "a CA bundle asks for TLS");
        assert_eq!(split.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(split.url, "postgres://u@h/db?sslmode=require");
    }

    #[test]
    fn contradictions_and_unknown_modes_are_refused() {
        assert!(split_url("postgres://u@h/db?sslmode=disable&sslrootcert=/ca.pem").is_err());
        assert!(split_url("postgres://u@h/db?sslmode=sometimes").is_err());
    }
}
