//! TLS for the client side of every connection, on rustls with the `ring` provider: the
//! server certificate checked as `sslmode` says (nothing for `require` without a root
//! certificate, the chain for `verify-ca`, chain and host name for `verify-full`), client
//! certificates, ALPN `postgresql` (needed for PostgreSQL 17's direct TLS), and the
//! `tls-server-end-point` data SCRAM-SHA-256-PLUS binds to.

use std::fs;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::params::{RootCert, SslMode, TlsParams, TlsVersion};

/// The ALPN protocol name PostgreSQL 17 defines.
pub const ALPN: &[u8] = b"postgresql";

#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error(
        "root certificate file \"{0}\" does not exist; either provide the file, use the system's trusted roots with \
         sslrootcert=system, or change sslmode to disable server certificate verification"
    )]
    NoRootCert(String),
    #[error("could not read {what} \"{path}\": {reason}")]
    File { what: &'static str, path: String, reason: String },
    #[error(
        "private key file \"{0}\" has group or world access; file must have permissions u=rw (0600) or less if owned \
         by the current user, or permissions u=rw,g=r (0640) or less if owned by root (chmod 0600 {0})"
    )]
    KeyPermissions(String),
    #[error("certificate present, but not private key file \"{0}\"; pass it with sslkey=FILE")]
    NoKey(String),
    #[error("TLS setup: {0}")]
    Rustls(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(String) -> TlsSetupError {
    let path = path.display().to_string();
    move |reason| TlsSetupError::File { what, path, reason }
}

pub fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path)(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(what, path)(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(what, path)("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// A private key file, refused when others may read it (as libpq and PostgreSQL do).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path).map_err(|e| file_err("private key file", path)(e.to_string()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let loose = if meta.uid() == 0 && me != 0 { meta.mode() & 0o037 != 0 } else { meta.mode() & 0o077 != 0 };
        if loose {
            return Err(TlsSetupError::KeyPermissions(path.display().to_string()));
        }
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err("private key file", path)(e.to_string()))
}

fn system_roots() -> Result<Arc<RootCertStore>, TlsSetupError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| e.to_string()).unwrap_or_else(|| "none found".into());
                return Err(format!("the system's trusted root certificates could not be loaded ({why})"));
            }
            Ok(Arc::new(store))
        })
        .clone()
        .map_err(TlsSetupError::Rustls)
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Encrypt only (`require` without a root certificate, `prefer`, `allow`).
    Nothing,
    /// The chain up to a trusted root (`verify-ca`, or `require` with a root certificate file).
    Chain,
    /// The chain and the host name (`verify-full`).
    ChainAndName,
}

#[derive(Debug)]
struct Verifier {
    check: Check,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = self.webpki.as_ref().filter(|_| self.check != Check::Nothing) else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // webpki checks the chain before the name: a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client TLS configuration for one set of parameters, and what it checks (for messages).
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub check: Check,
    /// Where the trusted roots came from, as the operator named them.
    pub roots: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("check", &self.check).field("roots", &self.roots).finish()
    }
}

impl ClientTls {
    pub fn new(p: &TlsParams) -> Result<ClientTls, TlsSetupError> {
        let provider = provider();
        let (roots, described) = match &p.root {
            RootCert::System => (Some(system_roots()?), "the system's trusted roots (sslrootcert=system)".to_owned()),
            RootCert::File { path, explicit } => {
                let shown = format!("sslrootcert \"{}\"", path.display());
                if path.is_file() {
                    let mut store = RootCertStore::empty();
                    for c in read_certs(path, "root certificate file")? {
                        store.add(c).map_err(|e| file_err("root certificate file", path)(e.to_string()))?;
                    }
                    (Some(Arc::new(store)), shown)
                } else if p.mode >= SslMode::VerifyCa || *explicit && p.mode == SslMode::Require {
                    return Err(TlsSetupError::NoRootCert(path.display().to_string()));
                } else {
                    (None, shown)
                }
            }
        };
        // As in libpq, `require` checks the chain when a root certificate file is there.
        let check = match (p.mode, &roots) {
            (SslMode::VerifyFull, _) => Check::ChainAndName,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Check::Chain,
            _ => Check::Nothing,
        };
        let webpki = match roots.filter(|_| check != Check::Nothing) {
            Some(store) => {
                let mut builder = WebPkiServerVerifier::builder_with_provider(store, Arc::clone(&provider));
                let crls = crls(p)?;
                if !crls.is_empty() {
                    builder = builder.with_crls(crls);
                }
                Some(builder.build().map_err(|e| TlsSetupError::Rustls(e.to_string()))?)
            }
            None => None,
        };
        let verifier = Arc::new(Verifier { check, webpki, provider: Arc::clone(&provider) });
        let versions: Vec<&'static rustls::SupportedProtocolVersion> = match (p.min_version, p.max_version) {
            (TlsVersion::Tls13, _) => vec![&rustls::version::TLS13],
            (_, TlsVersion::Tls12) => vec![&rustls::version::TLS12],
            _ => vec![&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = if p.send_cert && (p.cert_explicit || p.cert.is_file()) {
            let chain = read_certs(&p.cert, "client certificate file")?;
            if !p.key.is_file() {
                return Err(TlsSetupError::NoKey(p.key.display().to_string()));
            }
            builder.with_client_auth_cert(chain, read_key(&p.key)?).map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.enable_sni = p.sni;
        Ok(ClientTls { config: Arc::new(config), check, roots: described })
    }
}

fn crls(p: &TlsParams) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsSetupError> {
    let mut files: Vec<std::path::PathBuf> = p.crl.iter().filter(|f| f.is_file()).cloned().collect();
    if let Some(dir) = &p.crl_dir
        && let Ok(entries) = fs::read_dir(dir)
    {
        files.extend(entries.filter_map(Result::ok).map(|e| e.path()).filter(|f| f.is_file()));
    }
    let mut out = Vec::new();
    for f in files {
        let iter =
            CertificateRevocationListDer::pem_file_iter(&f).map_err(|e| file_err("CRL file", &f)(e.to_string()))?;
        for crl in iter {
            out.push(crl.map_err(|e| file_err("CRL file", &f)(e.to_string()))?);
        }
    }
    Ok(out)
}

/// Explains a failed handshake with `host`: which check failed, and what to pass instead.
pub fn explain(e: &std::io::Error, host: &str, tls: &ClientTls) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::NotValidForNameContext { presented, .. } => format!(
                "the server's certificate is for {} but the connection is to \"{host}\" (sslmode=verify-full checks the \
                 name): connect with host= one of those names, or use sslmode=verify-ca to check only that a trusted CA \
                 signed it",
                if presented.is_empty() {
                    "no host name".to_owned()
                } else {
                    presented.iter().map(|n| bare_name(n)).collect::<Vec<_>>().join(", ")
                }
            ),
            CertificateError::NotValidForName => format!(
                "the server's certificate does not name \"{host}\" (sslmode=verify-full checks the name): connect with \
                 a name the certificate has, or use sslmode=verify-ca to check only that a trusted CA signed it"
            ),
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "the server's certificate is not signed by a certificate authority in {}: pass the CA certificate that \
                 signed it as sslrootcert=FILE (or sslrootcert=system if a public CA signed it), or use sslmode=require \
                 to encrypt without verifying the server",
                tls.roots
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired: renew it on the server".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (check the clocks)".to_owned()
            }
            CertificateError::Revoked => "the server's certificate is revoked (by sslcrl/sslcrldir)".to_owned(),
            other => format!("the server's certificate was refused: {other:?}"),
        },
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "the server refused the TLS handshake ({alert:?}); it may require a client certificate (sslcert and sslkey) \
             or a TLS version this client does not offer"
        ),
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e}"),
    }
}

/// `DnsName("db.example")` (how webpki shows a name) → `db.example`.
fn bare_name(shown: &str) -> &str {
    match (shown.find('"'), shown.rfind('"')) {
        (Some(a), Some(b)) if b > a => &shown[a + 1..b],
        _ => shown,
    }
}

/// The hash SCRAM's `tls-server-end-point` uses for a certificate (RFC 5929 §4.1: the
/// certificate's signature hash, SHA-256 in place of MD5 and SHA-1), or None when it has
/// none (Ed25519, Ed448), as in PostgreSQL.
pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    let algorithm = match signature_algorithm(cert)? {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        [42, 134, 72, 134, 247, 13, 1, 1, 12] | [42, 134, 72, 206, 61, 4, 3, 3] => &ring::digest::SHA384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        [42, 134, 72, 134, 247, 13, 1, 1, 13] | [42, 134, 72, 206, 61, 4, 3, 4] => &ring::digest::SHA512,
        // Ed25519, Ed448
        [43, 101, 112] | [43, 101, 113] => return None,
        _ => &ring::digest::SHA256,
    };
    Some(ring::digest::digest(algorithm, cert).as_ref().to_vec())
}

/// One DER element at the start of `b`: (tag, contents, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (first as usize, b)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        (b[..n].iter().fold(0usize, |acc, &x| (acc << 8) | x as usize), &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The OID bytes of a certificate's `signatureAlgorithm`.
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, certificate, _) = der(cert)? else { return None };
    let (0x30, _tbs, rest) = der(certificate)? else { return None };
    let (0x30, algorithm, _) = der(rest)? else { return None };
    let (0x06, oid, _) = der(algorithm)? else { return None };
    Some(oid)
}

/// A TLS connection to a server, as tokio-postgres drives it.
pub struct TlsStream<S>(pub tokio_rustls::client::TlsStream<S>);

impl<S> TlsStream<S> {
    /// The server's certificate (the leaf).
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.0.get_ref().1.peer_certificates().and_then(|c| c.first())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.peer_certificate().and_then(|c| end_point_hash(c)) {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

/// A failed handshake, explained.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct HandshakeError(pub String);

/// One connection's TLS for tokio-postgres: the configuration (none with sslmode=disable,
/// where tokio-postgres asks for a connector all the same) and the name to check.
pub struct Connector {
    pub tls: Option<ClientTls>,
    pub host: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> tokio_postgres::tls::TlsConnect<S> for Connector {
    type Stream = TlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<TlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.tls.ok_or_else(|| HandshakeError("TLS is disabled for this connection".into()))?;
            let name = ServerName::try_from(self.host.clone())
                .map_err(|_| HandshakeError(format!("\"{}\" is not a valid TLS server name", self.host)))?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
            match connector.connect(name, stream).await {
                Ok(s) => Ok(TlsStream(s)),
                Err(e) => Err(HandshakeError(explain(&e, &self.host, &tls))),
            }
        })
    }
}

/// tokio-postgres asks for a connector per host; ghostwire connects one host at a time.
pub struct MakeConnector(pub Option<Connector>);

impl MakeConnector {
    pub fn new(tls: Option<ClientTls>, host: String) -> MakeConnector {
        MakeConnector(Some(Connector { tls, host }))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> tokio_postgres::tls::MakeTlsConnect<S> for MakeConnector {
    type Stream = TlsStream<S>;
    type TlsConnect = Connector;
    type Error = HandshakeError;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<Connector, HandshakeError> {
        self.0.take().ok_or_else(|| HandshakeError("no TLS configuration for this connection".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        assert_eq!(end_point_hash(&der).unwrap(), ring::digest::digest(&ring::digest::SHA384, &der).as_ref());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        assert_eq!(end_point_hash(&der).unwrap(), ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(end_point_hash(cert.der()), None);
        assert_eq!(end_point_hash(&[0x30, 0x82, 0xff]), None);
        assert_eq!(end_point_hash(&[]), None);
    }
}
