//! TLS for the listeners (rustls with ring; TLS 1.2 and 1.3 only). A [`Certificate`] is a
//! certificate chain and its key read from PEM files; it answers every handshake with the
//! pair it holds, and [`Certificate::reload`] (on SIGHUP) reads the files again and swaps
//! the new pair in: handshakes after it get the new one, connections already open go on
//! with theirs. With no files configured, the API listener uses a self-signed pair for
//! localhost that [`self_signed`] makes in the data dir on the first start.
//!
//! The client side, for the gateway's own outgoing TLS (the Kubernetes API, https
//! callbacks) and for the CLI: [`connector`], trusting a PEM file or the system's store.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A certificate chain and key from PEM files, reloadable.
pub struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Certificate {
    /// Reads the pair; the error names the file at fault and what is wrong with it.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Certificate>, String> {
        let pair = read_pair(cert_file, key_file)?;
        Ok(Arc::new(Certificate {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: ArcSwap::from_pointee(pair),
        }))
    }

    pub fn cert_file(&self) -> &Path {
        &self.cert_file
    }

    /// Reads the files again and, when they hold a good pair, serves it from now on; on
    /// an error the pair in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let pair = read_pair(&self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }

    /// An acceptor offering HTTP/2 and HTTP/1.1 by ALPN.
    pub fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The certificates of a PEM file, at least one; the error names the file.
fn read_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("{}: cannot read a PEM certificate: {e}", file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            file.display()
        ));
    }
    Ok(certs)
}

/// What a TLS client checks a server's certificate against.
pub enum Trust<'a> {
    /// The certificates of this PEM file alone (a CA, or a self-signed certificate).
    File(&'a Path),
    /// The system's store (rustls-native-certs: `SSL_CERT_FILE` / `SSL_CERT_DIR` if set).
    System,
}

/// A TLS client (TLS 1.2 and 1.3) trusting `trust`; the error names the file, or says the
/// system has no certificate to trust.
pub fn connector(trust: Trust<'_>) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match trust {
        Trust::File(file) => {
            for cert in read_certs(file)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
            }
        }
        Trust::System => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(
                    "no trusted certificate found on this system (SSL_CERT_FILE, SSL_CERT_DIR)"
                        .into(),
                );
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, String> {
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key_file.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unusable private key: {e}", key_file.display()))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match().map_err(|e| {
        format!(
            "{}: this key is not the key of the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(pair)
}

/// The self-signed pair of `<data_dir>/tls/` (`api.crt`, `api.key`), made now if either
/// file is missing: a certificate for `localhost`, `127.0.0.1` and `::1`, the key readable
/// by this user only. Returns the two paths and whether they were just made.
pub fn self_signed(data_dir: &Path) -> Result<(PathBuf, PathBuf, bool), String> {
    let dir = data_dir.join("tls");
    let (cert, key) = (dir.join("api.crt"), dir.join("api.key"));
    if cert.exists() && key.exists() {
        return Ok((cert, key, false));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
    write_private(&key, made.signing_key.serialize_pem().as_bytes())?;
    write_private(&cert, made.cert.pem().as_bytes())?;
    Ok((cert, key, true))
}

/// Writes `path` through a temporary file renamed over it, mode 0600 on unix.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pairs_load_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, made) = self_signed(dir.path()).unwrap();
        assert!(made);
        let loaded = Certificate::load(&cert, &key).unwrap();
        assert_eq!(loaded.cert_file(), cert);
        let (_, _, made_again) = self_signed(dir.path()).unwrap();
        assert!(!made_again, "an existing pair is kept");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let e = Certificate::load(&garbage, &key).unwrap_err();
        assert!(e.contains("garbage.pem"), "{e}");
        let e = Certificate::load(&cert, &garbage).unwrap_err();
        assert!(e.contains("garbage.pem"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = Certificate::load(&missing, &key).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");

        // Another pair's key does not go with this certificate.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key, _) = self_signed(other.path()).unwrap();
        let e = Certificate::load(&cert, &other_key).unwrap_err();
        assert!(e.contains("not the key"), "{e}");

        // A reload that fails keeps the pair in use.
        std::fs::write(&cert, "broken").unwrap();
        assert!(loaded.reload().is_err());
    }
}
