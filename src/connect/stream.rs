//! Byte streams that may be TLS, and the raw TLS negotiation with a server (SSLRequest, or
//! direct TLS), for the proxy's server leg (and, later, the replication client), which
//! speak the protocol themselves instead of through tokio-postgres.

use std::pin::Pin;
use std::task::{Context, Poll};

use ghostwire_proto::SSL_REQUEST_CODE;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::params::{Host, HostKind, SslMode, TlsParams};
use super::tls::{ClientTls, explain};

/// A TCP connection, in plain text or inside TLS (`T`: the client or server TLS stream).
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            MaybeTls::Plain(s) => Some(s),
            MaybeTls::Tls(_) => None,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// A connection to one server with TLS negotiated as `tls.mode` says; also returns the
/// server's certificate (channel binding binds to it). `Err` is a message naming the cause.
pub async fn open(
    host: &Host,
    p: &TlsParams,
    tls: Option<&ClientTls>,
) -> Result<(ServerStream, Option<CertificateDer<'static>>), String> {
    let HostKind::Tcp(name) = &host.kind else {
        return Err("the proxy's upstream must be a TCP host (host:port), not a Unix socket".into());
    };
    let target = match host.addr {
        Some(a) => std::net::SocketAddr::new(a, host.port).to_string(),
        None if name.contains(':') => format!("[{name}]:{}", host.port),
        None => format!("{name}:{}", host.port),
    };
    let mut tcp = TcpStream::connect(&target).await.map_err(|e| format!("could not connect to {target}: {e}"))?;
    tcp.set_nodelay(true).ok();
    let tls = match tls {
        _ if p.mode == SslMode::Disable || p.mode == SslMode::Allow => return Ok((MaybeTls::Plain(tcp), None)),
        Some(tls) => tls,
        None => return Err(format!("sslmode={} needs a TLS configuration", p.mode.as_str())),
    };
    if !p.direct {
        let mut request = Vec::with_capacity(8);
        request.extend(8u32.to_be_bytes());
        request.extend(SSL_REQUEST_CODE.to_be_bytes());
        tcp.write_all(&request).await.map_err(|e| format!("sending SSLRequest to {target}: {e}"))?;
        let answer = tcp.read_u8().await.map_err(|e| format!("reading the answer to SSLRequest from {target}: {e}"))?;
        match answer {
            b'S' => {}
            b'N' if p.mode == SslMode::Prefer => return Ok((MaybeTls::Plain(tcp), None)),
            b'N' => {
                return Err(format!(
                    "server {target} does not support TLS, but sslmode={} requires it (a plaintext connection is never \
                     made in this mode)",
                    p.mode.as_str()
                ));
            }
            other => return Err(format!("unexpected answer {other:#04x} to SSLRequest from {target}")),
        }
    }
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| format!("\"{name}\" is not a valid TLS server name"))?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&tls.config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| explain(&e, name, tls))?;
    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
    Ok((MaybeTls::Tls(Box::new(stream)), cert))
}
