//! One client connection: startup, then a relay in each direction (session mode: one
//! server connection per client, so prepared statements, `SET` and temporary tables work).
//!
//! Startup: SSLRequest and GSSENCRequest are answered 'N' (no TLS termination yet; the
//! client goes on in plain text or gives up, as it is configured to); a CancelRequest is
//! passed to the server when it names one of our sessions; a StartupMessage opens the
//! server connection and is passed on as it came. Authentication is the server's business:
//! its messages go through untouched, so trust, md5 and SCRAM all work.
//!
//! The client→server relay asks the drain gate before an idle session starts something;
//! the server→client relay reads ReadyForQuery to know when the session is idle again.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use ghostwire_proto::{Framer, Item, StartupPacket, TransactionStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// Messages up to this size are held whole (to be inspected); larger ones stream through.
const HOLD_LIMIT: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// What the two relays of a session share.
#[derive(Debug, Default)]
pub struct Flags {
    /// Counted as busy by the gate.
    pub busy: bool,
    /// Query, Sync and FunctionCall messages not yet answered by ReadyForQuery.
    pub outstanding: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// Authentication done (the first ReadyForQuery arrived).
    pub ready: bool,
    pub status: Option<TransactionStatus>,
}

/// A session, as the proxy's registry and `/status` see it.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub client: String,
    pub started: Instant,
    pub flags: Mutex<Flags>,
    pub backend: Mutex<Option<(i32, Vec<u8>)>>,
}

impl Session {
    pub fn flags(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ghostwire_proto::ProtoError),
    #[error("the client closed the connection during startup")]
    ClosedInStartup,
}

/// Serves one client until either side closes or `stop` fires.
pub async fn run(shared: Arc<Shared>, mut client: TcpStream, stop: CancellationToken) {
    let peer = client.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    client.set_nodelay(true).ok();
    match startup(&shared, &mut client, &stop).await {
        Ok(Some((server, leftover))) => relay(shared, client, server, leftover, peer, stop).await,
        Ok(None) => {}
        Err(e) => tracing::debug!("session from {peer}: {e}"),
    }
}

/// Reads startup packets; returns the server connection and any bytes the client sent
/// after its StartupMessage, or None when the connection ends here (a cancel request).
async fn startup(
    shared: &Shared,
    client: &mut TcpStream,
    stop: &CancellationToken,
) -> Result<Option<(TcpStream, BytesMut)>, SessionError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let parsed = ghostwire_proto::parse_startup(&buf)?;
        let Some((packet, len)) = parsed else {
            let n = tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                n = client.read_buf(&mut buf) => n?,
            };
            if n == 0 {
                return Err(SessionError::ClosedInStartup);
            }
            continue;
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                client.write_all(b"N").await?;
                buf.advance(len);
            }
            StartupPacket::Cancel { pid, key } => {
                shared.forward_cancel(pid, key, &buf[..len]).await;
                return Ok(None);
            }
            StartupPacket::Startup { .. } => {
                let mut server = shared.connect_upstream().await?;
                server.write_all(&buf[..len]).await?;
                buf.advance(len);
                return Ok(Some((server, buf)));
            }
        }
    }
}

async fn relay(
    shared: Arc<Shared>,
    client: TcpStream,
    server: TcpStream,
    leftover: BytesMut,
    peer: String,
    stop: CancellationToken,
) {
    let session = shared.register(peer);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // The session ends when either direction ends (or the proxy stops): the other is dropped
    // where it waits, and both sockets close with it. One select for the whole session, not
    // one per read.
    let up = client_to_server(&shared, &session, client_read, server_write, leftover);
    let down = server_to_client(&shared, &session, server_read, client_write);
    let ended = tokio::select! {
        r = up => r,
        r = down => r,
        _ = stop.cancelled() => Ok(()),
    };
    if let Err(e) = ended {
        tracing::debug!("session {}: {e}", session.id);
    }
    shared.unregister(&session);
}

fn needs_sync(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'E' | b'D' | b'C' | b'H')
}

async fn client_to_server(
    shared: &Shared,
    session: &Session,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut buf: BytesMut,
) -> Result<(), SessionError> {
    let mut framer = Framer::new(shared.max_message_len, HOLD_LIMIT);
    // Counters looked up once per session, not once per message.
    let bytes = metrics::counter!("ghostwire_proxy_bytes_total", "direction" => "client_to_server");
    let requests = metrics::counter!("ghostwire_proxy_requests_total");
    loop {
        let mut ready = 0;
        loop {
            // Before a new message from an idle session: ask the gate.
            if framer.at_boundary()
                && let Some(&tag) = buf.get(ready)
            {
                let must_enter = {
                    let f = session.flags();
                    tag != b'X' && f.ready && !f.busy
                };
                if must_enter {
                    forward(&mut to, &mut buf, ready, &bytes).await?;
                    ready = 0;
                    if !shared.gate.try_enter() {
                        let held = shared.gate.enter().await;
                        if !held.is_zero() {
                            metrics::histogram!("ghostwire_proxy_held_seconds").record(held.as_secs_f64());
                        }
                    }
                    session.flags().busy = true;
                }
            }
            match framer.next(&buf[ready..])? {
                Item::Message { tag, total, .. } | Item::LargeStart { tag, available: total, .. } => {
                    let mut f = session.flags();
                    match tag {
                        b'Q' | b'S' | b'F' => {
                            f.outstanding += 1;
                            f.unsynced = false;
                            requests.increment(1);
                        }
                        t if needs_sync(t) => f.unsynced = true,
                        _ => {}
                    }
                    ready += total;
                }
                Item::Continue(n) => ready += n,
                Item::NeedMore => break,
            }
        }
        forward(&mut to, &mut buf, ready, &bytes).await?;
        if !refill(&mut from, &mut buf).await? {
            return Ok(()); // the client went away (mid-message or not): close the server side
        }
    }
}

async fn server_to_client(
    shared: &Shared,
    session: &Session,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> Result<(), SessionError> {
    let mut framer = Framer::new(shared.max_message_len, HOLD_LIMIT);
    let bytes = metrics::counter!("ghostwire_proxy_bytes_total", "direction" => "server_to_client");
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let mut ready = 0;
        loop {
            match framer.next(&buf[ready..])? {
                Item::Message { tag, total, body } => {
                    match tag {
                        b'Z' => {
                            let status = ghostwire_proto::ready_for_query(body)?;
                            let went_idle = {
                                let mut f = session.flags();
                                if f.ready {
                                    f.outstanding = f.outstanding.saturating_sub(1);
                                }
                                f.ready = true;
                                f.status = Some(status);
                                let idle = f.outstanding == 0 && !f.unsynced && status == TransactionStatus::Idle;
                                let leave = idle && f.busy;
                                if leave {
                                    f.busy = false;
                                }
                                leave
                            };
                            if went_idle {
                                shared.gate.leave();
                            }
                        }
                        b'K' => {
                            let (pid, key) = ghostwire_proto::backend_key_data(body)?;
                            shared.remember_backend(session, pid, key);
                        }
                        _ => {}
                    }
                    ready += total;
                }
                Item::LargeStart { available, .. } => ready += available,
                Item::Continue(n) => ready += n,
                Item::NeedMore => break,
            }
        }
        forward(&mut to, &mut buf, ready, &bytes).await?;
        if !refill(&mut from, &mut buf).await? {
            return Ok(()); // the server closed (terminated backend, shutdown): so do we
        }
    }
}

/// Writes the first `ready` bytes of `buf` on, counts them, and drops them from `buf`.
async fn forward(
    to: &mut (impl AsyncWrite + Unpin),
    buf: &mut BytesMut,
    ready: usize,
    bytes: &metrics::Counter,
) -> Result<(), SessionError> {
    if ready > 0 {
        to.write_all(&buf[..ready]).await?;
        bytes.increment(ready as u64);
        buf.advance(ready);
    }
    Ok(())
}

/// Reads more into `buf`; false when the peer closed.
async fn refill(from: &mut (impl AsyncRead + Unpin), buf: &mut BytesMut) -> Result<bool, SessionError> {
    buf.reserve(READ_CHUNK);
    Ok(from.read_buf(buf).await? > 0)
}
