//! TLS for the server side of the proxy's client leg: a certificate and key from files,
//! reloaded on demand (SIGHUP) without touching established sessions, ALPN `postgresql`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

use super::tls::{ALPN, TlsSetupError, provider, read_certs, read_key};

/// The certificate handed to new handshakes; replaced whole on reload.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner())))
    }
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsSetupError> {
    let chain = read_certs(cert, "certificate file")?;
    let signing =
        provider().key_provider.load_private_key(read_key(key)?).map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        TlsSetupError::Rustls(format!(
            "the key in {} does not belong to the certificate in {} ({e})",
            key.display(),
            cert.display()
        ))
    })?;
    Ok(certified)
}

/// Accepts TLS from clients with the certificate and key at two paths.
#[derive(Clone)]
pub struct Acceptor {
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").field("cert", &self.cert).finish()
    }
}

impl Acceptor {
    pub fn new(cert: &Path, key: &Path) -> Result<Acceptor, TlsSetupError> {
        let resolver = Arc::new(Resolver { current: RwLock::new(Arc::new(load(cert, key)?)) });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Acceptor {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads the files again; new handshakes use them, established sessions are untouched.
    /// On failure the old certificate stays.
    pub fn reload(&self) -> Result<(), TlsSetupError> {
        let fresh = load(&self.cert, &self.key)?;
        *self.resolver.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    /// The certificate clients see now (the leaf), which their channel binding hashes.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.resolver.current.read().unwrap_or_else(|p| p.into_inner()).cert.first().cloned()
    }

    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }
}
