//! HTTPS on the main listener: rustls with the configured PEM files, HTTP/2 offered by ALPN,
//! and a reload (on SIGHUP) that swaps the certificate for new connections without touching
//! open ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

fn build(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read server.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("server.tls_cert {} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("cannot read server.tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Tls {
    /// Reads the certificate and key. Blocking.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Tls> {
        Ok(Tls {
            current: RwLock::new(build(cert, key)?),
            cert: cert.to_owned(),
            key: key.to_owned(),
        })
    }

    /// Re-reads the files; on error the old certificate stays in use. Blocking.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = build(&self.cert, &self.key)?;
        *crate::sync::write(&self.current) = fresh;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        let config = crate::sync::read(&self.current).clone();
        TlsAcceptor::from(config)
    }
}
