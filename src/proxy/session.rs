//! One client connection: its start ([`super::startup`]: encryption, cancel requests,
//! the login), then a relay in each direction ([`super::relay`]; session mode: one server
//! connection per client, so prepared statements, `SET` and temporary tables work).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ghostwire_proto::TransactionStatus;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::tracker::Tracker;
use super::{Shared, relay, startup};
use crate::connect::stream::MaybeTls;

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
    /// Its prepared statements (see [`super::tracker`]).
    pub tracker: Mutex<Tracker>,
    /// The `--route` that set its search_path.
    pub route: Option<usize>,
}

impl Session {
    pub fn flags(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
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
    let session = shared.register(peer, ready.route);
    if let Some((pid, key)) = &ready.backend {
        shared.remember_backend(&session, *pid, key);
    }
    session.flags().status = Some(ready.status);
    let (client_buf, server_buf) = (ready.client_buf, ready.server_buf);
    // The server side's requests to the client side (a re-prepare, a replay).
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // The session ends when either direction ends (or the proxy stops): the other is dropped
    // where it waits, and both sockets close with it. One select for the whole session, not
    // one per read. Plain text on both legs, the common case, gets its own monomorphic
    // relay with lock-free halves and no flushes.
    let ended = match (ready.client, ready.server) {
        (MaybeTls::Plain(client), MaybeTls::Plain(server)) => {
            let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
            let up = relay::client_to_server(&shared, &session, cr, sw, client_buf, false, rx);
            let down = relay::server_to_client(&shared, &session, sr, cw, server_buf, false, tx);
            tokio::select! { r = up => r, r = down => r, _ = stop.cancelled() => Ok(()) }
        }
        (client, server) => {
            let ((cr, cw), (sr, sw)) = (halves(client), halves(server));
            let up = relay::client_to_server(&shared, &session, cr, sw, client_buf, true, rx);
            let down = relay::server_to_client(&shared, &session, sr, cw, server_buf, true, tx);
            tokio::select! { r = up => r, r = down => r, _ = stop.cancelled() => Ok(()) }
        }
    };
    if let Err(e) = ended {
        tracing::debug!("session {}: {e}", session.id);
    }
    shared.unregister(&session);
}
