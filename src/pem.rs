//! The PEM files a config names: a TLS listener's certificate chain and
//! private key, and an upstream's CA certificates.
//!
//! Config loading reads them to check them, so `wsgate check`, startup and
//! reload all refuse the same files with one line each. Pingora reads a
//! listener's files again when it starts the listener and panics on what it
//! cannot use, so nothing it would panic on may pass the check.

use pingora::tls::{CertificateDer, PrivateKeyDer, ServerConfig};
use std::path::{Path, PathBuf};

/// What is wrong with a PEM file. Displayed as the problem only; the caller
/// names the config field.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("no file at `{}`", .0.display())]
    Missing(PathBuf),
    #[error("cannot read `{}`: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no PEM certificate in `{}`", .0.display())]
    NoCertificate(PathBuf),
    #[error("a certificate in `{}` does not parse", .0.display())]
    BadCertificate(PathBuf),
    #[error("no PEM private key in `{}`", .0.display())]
    NoKey(PathBuf),
    #[error("the key in `{}` does not match the certificate in `{}`: {reason}", .key.display(), .cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Every certificate in a PEM file, in order; at least one, each a
/// well-formed X.509 certificate.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut reader = open(path)?;
    let mut certs = Vec::new();
    for cert in rustls_pemfile::certs(&mut reader) {
        let cert = cert.map_err(|source| read_error(path, source))?;
        if x509_parser::parse_x509_certificate(cert.as_ref()).is_err() {
            return Err(PemError::BadCertificate(path.to_owned()));
        }
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(PemError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The first private key (PKCS#1, PKCS#8 or SEC1) in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let mut reader = open(path)?;
    rustls_pemfile::private_key(&mut reader)
        .map_err(|source| read_error(path, source))?
        .ok_or_else(|| PemError::NoKey(path.to_owned()))
}

/// Checks that a listener's files hold a chain and the leaf's own key, as
/// Pingora needs them to build the listener.
pub fn check_listener(cert: &Path, key: &Path) -> Result<(), (Field, PemError)> {
    let chain = certificates(cert).map_err(|e| (Field::Cert, e))?;
    let der = private_key(key).map_err(|e| (Field::Key, e))?;
    pingora::tls::install_default_crypto_provider();
    ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, der)
        .map(drop)
        .map_err(|e| {
            let mismatch = PemError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
                reason: e.to_string(),
            };
            (Field::Key, mismatch)
        })
}

/// Which of a listener's two files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Cert,
    Key,
}

impl Field {
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Cert => "cert",
            Field::Key => "key",
        }
    }
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, PemError> {
    if !path.is_file() {
        return Err(PemError::Missing(path.to_owned()));
    }
    let file = std::fs::File::open(path).map_err(|source| read_error(path, source))?;
    Ok(std::io::BufReader::new(file))
}

fn read_error(path: &Path, source: std::io::Error) -> PemError {
    PemError::Read {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(certificates(&missing), Err(PemError::Missing(_))));

        let text = dir.path().join("text.pem");
        std::fs::write(&text, "not a certificate\n").unwrap();
        assert!(matches!(
            certificates(&text),
            Err(PemError::NoCertificate(_))
        ));
        assert!(matches!(private_key(&text), Err(PemError::NoKey(_))));
        let e = check_listener(&text, &text).unwrap_err();
        assert_eq!(e.0, Field::Cert);
        assert_eq!(
            e.1.to_string(),
            format!("no PEM certificate in `{}`", text.display())
        );
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        // Valid PEM armour and base64 around bytes that are no certificate.
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(
            certificates(&bad),
            Err(PemError::BadCertificate(_))
        ));
    }
}
