//! A session's start, up to its first ReadyForQuery: the client leg's encryption (an
//! SSLRequest answered `S` and TLS accepted, direct TLS with ALPN `postgresql` as in
//! PostgreSQL 17, GSSENCRequest answered `N`, plain text refused under `--client-tls
//! require`), cancel requests passed on, the server leg opened with the upstream's
//! sslmode, and the authentication exchange relayed message by message. The server
//! authenticates; the proxy only steps in where a login cannot succeed through it: SCRAM
//! channel binding to a certificate the server does not have is refused at once with the
//! fix, and a client on plain text is not offered SCRAM-SHA-256-PLUS (it cannot bind, and
//! libpq refuses a PLUS offer over plain text).

use bytes::{Buf, BytesMut};
use ghostwire_proto::{AuthRequest, Framer, Item, StartupPacket, TransactionStatus};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::session::SessionError;
use crate::connect::stream::{MaybeTls, ServerStream};
use crate::connect::tls::ALPN;

pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// The first byte of a TLS handshake record (direct TLS, no SSLRequest first).
const TLS_HANDSHAKE: u8 = 0x16;
/// Messages of the authentication exchange are small; a larger one is a protocol error.
const AUTH_MESSAGE_LIMIT: usize = 64 * 1024;

/// A session whose login succeeded: both streams, and what each side sent beyond it.
pub struct Ready {
    pub client: ClientStream,
    pub server: ServerStream,
    pub client_buf: BytesMut,
    pub server_buf: BytesMut,
    pub status: TransactionStatus,
    pub backend: Option<(i32, Vec<u8>)>,
    /// The `--route` that set the session's search_path.
    pub route: Option<usize>,
}

async fn send(to: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), SessionError> {
    to.write_all(bytes).await?;
    to.flush().await?;
    Ok(())
}

/// Reads more from `from` into `buf`, unless the proxy stops; false when the peer closed.
async fn fill(
    from: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    stop: &CancellationToken,
) -> Result<bool, SessionError> {
    buf.reserve(4096);
    tokio::select! {
        _ = stop.cancelled() => Ok(false),
        n = from.read_buf(buf) => Ok(n? > 0),
    }
}

/// Runs the client leg to its StartupMessage; returns the stream, the message, the bytes
/// after it, or None when the connection ends here (a cancel request, a refusal).
/// The client's stream, its startup packet (as the server gets it), what it sent after it,
/// and the route that set its search_path.
type ClientLegOpened = (ClientStream, BytesMut, BytesMut, Option<usize>);

async fn client_leg(
    shared: &Shared,
    tcp: TcpStream,
    stop: &CancellationToken,
) -> Result<Option<ClientLegOpened>, SessionError> {
    let acceptor = shared.client_tls.acceptor();
    let mut client: ClientStream = MaybeTls::Plain(tcp);
    if let (Some(acceptor), MaybeTls::Plain(tcp)) = (acceptor, &client) {
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            n = tcp.peek(&mut first) => n?,
        };
        if peeked == 1 && first[0] == TLS_HANDSHAKE {
            let MaybeTls::Plain(tcp) = client else { return Ok(None) };
            let mut tls = acceptor.accept(tcp).await?;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
                let refusal = ghostwire_proto::fatal_error(
                    "08P01",
                    "received direct TLS connection request without ALPN protocol negotiation extension \"postgresql\"",
                );
                send(&mut tls, &refusal).await?;
                return Ok(None);
            }
            metrics::counter!("ghostwire_proxy_tls_sessions_total", "negotiation" => "direct").increment(1);
            client = MaybeTls::Tls(Box::new(tls));
        }
    }
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let Some((packet, len)) = ghostwire_proto::parse_startup(&buf)? else {
            if !fill(&mut client, &mut buf, stop).await? {
                return Err(SessionError::ClosedInStartup);
            }
            continue;
        };
        match packet {
            StartupPacket::SslRequest => {
                match (acceptor, client) {
                    (Some(acceptor), MaybeTls::Plain(mut tcp)) => {
                        if buf.len() > len {
                            // As PostgreSQL: bytes sent before the handshake could be injected.
                            return Err(SessionError::Protocol(ghostwire_proto::ProtoError::Malformed {
                                what: "unencrypted data after SSLRequest",
                            }));
                        }
                        send(&mut tcp, b"S").await?;
                        client = MaybeTls::Tls(Box::new(acceptor.accept(tcp).await?));
                        metrics::counter!("ghostwire_proxy_tls_sessions_total", "negotiation" => "postgres")
                            .increment(1);
                    }
                    (_, mut other) => {
                        send(&mut other, b"N").await?;
                        client = other;
                    }
                }
                buf.advance(len);
            }
            StartupPacket::GssEncRequest => {
                send(&mut client, b"N").await?;
                buf.advance(len);
            }
            StartupPacket::Cancel { pid, key } => {
                shared.forward_cancel(pid, key, &buf[..len]).await;
                return Ok(None);
            }
            StartupPacket::Startup { .. } => {
                if shared.client_tls.requires_tls() && !client.is_tls() {
                    let refusal = ghostwire_proto::fatal_error(
                        "28000",
                        "this ghostwire proxy accepts TLS connections only (--client-tls require): connect with \
                         sslmode=require, verify-ca or verify-full",
                    );
                    send(&mut client, &refusal).await?;
                    return Ok(None);
                }
                let StartupPacket::Startup { version, params } = &packet else { unreachable!("matched above") };
                let routed = super::route::apply(&shared.routes, *version, params);
                let startup = buf.split_to(len);
                return Ok(Some(match routed {
                    Some((route, rewritten)) => (client, BytesMut::from(&rewritten[..]), buf, Some(route)),
                    None => (client, startup, buf, None),
                }));
            }
        }
    }
}

/// The next whole message in `buf` (reading as needed): (tag, total length).
async fn next_message(
    from: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    stop: &CancellationToken,
) -> Result<Option<(u8, usize)>, SessionError> {
    let mut framer = Framer::new(AUTH_MESSAGE_LIMIT as u32, AUTH_MESSAGE_LIMIT);
    loop {
        match framer.next(buf)? {
            Item::Message { tag, total, .. } => return Ok(Some((tag, total))),
            Item::NeedMore => {
                if !fill(from, buf, stop).await? {
                    return Ok(None);
                }
            }
            Item::LargeStart { .. } | Item::Continue(_) => {
                return Err(SessionError::Protocol(ghostwire_proto::ProtoError::Malformed {
                    what: "oversized message during authentication",
                }));
            }
        }
    }
}

/// Why SCRAM-SHA-256-PLUS cannot pass: the client binds to the proxy's certificate, the
/// server to its own.
const BINDING_REFUSAL: &str = "SCRAM channel binding (SCRAM-SHA-256-PLUS) cannot pass through this ghostwire proxy: the \
    client binds to the proxy's TLS certificate and the server to its own, and they differ. Fix one of: give the proxy \
    the server's certificate and key (--tls-cert, --tls-key), make the proxy's server leg plain text on a trusted \
    network or local socket (sslmode=disable in --upstream), or connect with channel_binding=disable";

/// Opens the session: the client leg, the server leg, the login. None when it ended (a
/// cancel request, a refusal, a failed login: the client has been told).
pub async fn open(shared: &Shared, tcp: TcpStream, stop: &CancellationToken) -> Result<Option<Ready>, SessionError> {
    let Some((mut client, startup, mut client_buf, route)) = client_leg(shared, tcp, stop).await? else {
        return Ok(None);
    };
    let (mut server, server_cert) = match shared.upstream.open().await {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!("a client's session could not reach the server: {e}");
            let refusal = ghostwire_proto::fatal_error(
                "08006",
                &format!("the ghostwire proxy could not reach the database server: {e}"),
            );
            send(&mut client, &refusal).await?;
            return Ok(None);
        }
    };
    send(&mut server, &startup).await?;
    // Channel binding can pass only when the client sees the server's own certificate.
    let binding_passes = match (&client, &server_cert) {
        (MaybeTls::Tls(_), Some(server_cert)) => {
            shared.client_tls.leaf().as_ref() == Some::<&CertificateDer>(server_cert)
        }
        _ => true,
    };
    let mut server_buf = BytesMut::with_capacity(4096);
    let mut backend = None;
    let mut offered_sasl = false;
    loop {
        let Some((tag, total)) = next_message(&mut server, &mut server_buf, stop).await? else { return Ok(None) };
        let message = server_buf.split_to(total);
        let body = &message[5..];
        match tag {
            b'R' => {
                let request = ghostwire_proto::auth_request(body)?;
                match &request {
                    // The server offers SCRAM-SHA-256-PLUS because its leg is TLS; a client
                    // talking plain text to the proxy cannot bind to it, and libpq gives up
                    // when it is offered over plain text ("perhaps SSL was stripped by a
                    // proxy"): offer it the rest. SCRAM itself protects the exchange.
                    AuthRequest::Sasl(mechanisms)
                        if !client.is_tls() && mechanisms.contains(&ghostwire_proto::SCRAM_SHA_256_PLUS) =>
                    {
                        let kept: Vec<&str> =
                            mechanisms.iter().copied().filter(|m| *m != ghostwire_proto::SCRAM_SHA_256_PLUS).collect();
                        send(&mut client, &ghostwire_proto::sasl_request(&kept)).await?;
                    }
                    _ => send(&mut client, &message).await?,
                }
                if !request.needs_answer() {
                    continue;
                }
                let sasl_start = matches!(request, AuthRequest::Sasl(_)) && !offered_sasl;
                offered_sasl |= matches!(request, AuthRequest::Sasl(_));
                let Some((_, len)) = next_message(&mut client, &mut client_buf, stop).await? else { return Ok(None) };
                let answer = client_buf.split_to(len);
                if sasl_start
                    && !binding_passes
                    && ghostwire_proto::sasl_initial_mechanism(&answer[5..])? == ghostwire_proto::SCRAM_SHA_256_PLUS
                {
                    tracing::info!("refused a SCRAM-SHA-256-PLUS login that cannot pass through the proxy");
                    metrics::counter!("ghostwire_proxy_refused_logins_total", "reason" => "channel_binding")
                        .increment(1);
                    send(&mut client, &ghostwire_proto::fatal_error("28000", BINDING_REFUSAL)).await?;
                    return Ok(None);
                }
                send(&mut server, &answer).await?;
            }
            b'K' => {
                let (pid, key) = ghostwire_proto::backend_key_data(body)?;
                backend = Some((pid, key.to_vec()));
                send(&mut client, &message).await?;
            }
            b'Z' => {
                let status = ghostwire_proto::ready_for_query(body)?;
                send(&mut client, &message).await?;
                return Ok(Some(Ready { client, server, client_buf, server_buf, status, backend, route }));
            }
            b'E' => {
                send(&mut client, &message).await?;
                return Ok(None);
            }
            _ => send(&mut client, &message).await?,
        }
    }
}
