//! One client connection: its start ([`super::startup`]: encryption, cancel requests,
//! the login), then a relay in each direction (session mode: one server connection per
//! client, so prepared statements, `SET` and temporary tables work).
//!
//! The client→server relay asks the drain gate before an idle session starts something;
//! the server→client relay reads ReadyForQuery to know when the session is idle again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use ghostwire_proto::{Framer, Item, TransactionStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Shared, startup};
use crate::connect::stream::MaybeTls;

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
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ghostwire_proto::ProtoError),
    #[error("the client closed the connection during startup")]
    ClosedInStartup,
}

/// How long a login may take, from the first byte to the first ReadyForQuery (as
/// PostgreSQL's `authentication_timeout`): a login through the proxy never hangs.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one client until either side closes or `stop` fires.
pub async fn run(shared: Arc<Shared>, client: TcpStream, stop: CancellationToken) {
    let peer = client.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    client.set_nodelay(true).ok();
    match tokio::time::timeout(LOGIN_TIMEOUT, startup::open(&shared, client, &stop)).await {
        Ok(Ok(Some(ready))) => relay(shared, ready, peer, stop).await,
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::debug!("session from {peer}: {e}"),
        Err(_) => tracing::info!("session from {peer}: the login did not complete within {LOGIN_TIMEOUT:?}; closed"),
    }
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The two halves of a stream where one leg is TLS (a plain TCP stream splits without a lock).
fn halves<T: AsyncRead + AsyncWrite + Send + Unpin + 'static>(stream: MaybeTls<T>) -> (Reader, Writer) {
    match stream {
        MaybeTls::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            (Box::new(r), Box::new(w))
        }
        MaybeTls::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            (Box::new(r), Box::new(w))
        }
    }
}

async fn relay(shared: Arc<Shared>, ready: startup::Ready, peer: String, stop: CancellationToken) {
    let session = shared.register(peer);
    if let Some((pid, key)) = &ready.backend {
        shared.remember_backend(&session, *pid, key);
    }
    session.flags().status = Some(ready.status);
    let (client_buf, server_buf) = (ready.client_buf, ready.server_buf);
    // The session ends when either direction ends (or the proxy stops): the other is dropped
    // where it waits, and both sockets close with it. One select for the whole session, not
    // one per read. Plain text on both legs, the common case, gets its own monomorphic
    // relay with lock-free halves and no flushes.
    let ended = match (ready.client, ready.server) {
        (MaybeTls::Plain(client), MaybeTls::Plain(server)) => {
            let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
            let up = client_to_server(&shared, &session, cr, sw, client_buf, false);
            let down = server_to_client(&shared, &session, sr, cw, server_buf, false);
            tokio::select! { r = up => r, r = down => r, _ = stop.cancelled() => Ok(()) }
        }
        (client, server) => {
            let ((cr, cw), (sr, sw)) = (halves(client), halves(server));
            let up = client_to_server(&shared, &session, cr, sw, client_buf, true);
            let down = server_to_client(&shared, &session, sr, cw, server_buf, true);
            tokio::select! { r = up => r, r = down => r, _ = stop.cancelled() => Ok(()) }
        }
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
    flush: bool,
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
                    tag != b'X' && !f.busy
                };
                if must_enter {
                    forward(&mut to, &mut buf, ready, &bytes, flush).await?;
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
        forward(&mut to, &mut buf, ready, &bytes, flush).await?;
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
    mut buf: BytesMut,
    flush: bool,
) -> Result<(), SessionError> {
    let mut framer = Framer::new(shared.max_message_len, HOLD_LIMIT);
    let bytes = metrics::counter!("ghostwire_proxy_bytes_total", "direction" => "server_to_client");
    loop {
        let mut ready = 0;
        loop {
            match framer.next(&buf[ready..])? {
                Item::Message { tag, total, body } => {
                    if tag == b'Z' {
                        let status = ghostwire_proto::ready_for_query(body)?;
                        let went_idle = {
                            let mut f = session.flags();
                            f.outstanding = f.outstanding.saturating_sub(1);
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
                    ready += total;
                }
                Item::LargeStart { available, .. } => ready += available,
                Item::Continue(n) => ready += n,
                Item::NeedMore => break,
            }
        }
        forward(&mut to, &mut buf, ready, &bytes, flush).await?;
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
    flush: bool,
) -> Result<(), SessionError> {
    if ready > 0 {
        to.write_all(&buf[..ready]).await?;
        if flush {
            to.flush().await?; // TLS holds written bytes until flushed
        }
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
