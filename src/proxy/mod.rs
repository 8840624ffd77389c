//! `ghostwire proxy`: a PostgreSQL wire-protocol relay with a drain gate (DESIGN.md §3).
//!
//! [`Proxy::serve`] accepts clients and runs a [`session`] for each; [`Proxy::control`] is
//! the handler of its HTTP control API (`POST /drain`, `POST /open`, `GET /status`,
//! `GET /metrics`). The engine drains every proxy, swaps the tables and opens them again.

pub mod gate;
mod relay;
pub mod reshape;
pub mod route;
pub mod session;
mod startup;
pub mod tracker;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Serialize;
use serde_json::json;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connect::tls::TlsSetupError;
use crate::connect::tls_server::Acceptor;
use crate::control::{self, Handler, Request, Response};
use gate::{DrainError, Gate, GateStatus};
use session::Session;
use upstream::Upstream;

/// The default deadline of a drain that names none.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("invalid --upstream: {0}")]
    Upstream(String),
    #[error("--client-tls {0} needs a certificate: pass --tls-cert FILE and --tls-key FILE")]
    NoCertificate(&'static str),
    #[error("the proxy's TLS certificate: {0}")]
    Certificate(#[from] TlsSetupError),
}

/// Whether clients may, or must, use TLS to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTlsMode {
    /// SSLRequest answered `N`; direct TLS refused.
    #[default]
    Disable,
    /// TLS offered, plain text accepted.
    Allow,
    /// Plain text refused with an error message.
    Require,
}

impl ClientTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientTlsMode::Disable => "disable",
            ClientTlsMode::Allow => "allow",
            ClientTlsMode::Require => "require",
        }
    }
}

/// The client leg's TLS: the mode and the certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientLeg {
    mode: ClientTlsMode,
    acceptor: Option<Acceptor>,
}

impl ClientLeg {
    pub fn new(mode: ClientTlsMode, acceptor: Option<Acceptor>) -> Result<ClientLeg, ProxyError> {
        if mode != ClientTlsMode::Disable && acceptor.is_none() {
            return Err(ProxyError::NoCertificate(mode.as_str()));
        }
        Ok(ClientLeg { mode, acceptor })
    }

    fn acceptor(&self) -> Option<&Acceptor> {
        self.acceptor.as_ref().filter(|_| self.mode != ClientTlsMode::Disable)
    }

    fn requires_tls(&self) -> bool {
        self.mode == ClientTlsMode::Require
    }

    /// The certificate clients see now.
    fn leaf(&self) -> Option<rustls::pki_types::CertificateDer<'static>> {
        self.acceptor().and_then(Acceptor::leaf)
    }
}

/// How a proxy is set up.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub upstream: String,
    pub max_message_len: u32,
    pub client_tls: ClientLeg,
    /// Follow prepared statements and recover those a table change made stale (the
    /// default); off, the proxy only relays and clients get the server's error.
    pub recover_statements: bool,
    /// `--route` rules: a search_path for matching sessions.
    pub routes: Vec<route::Route>,
}

/// Proxy-wide state shared by the sessions.
#[derive(Debug)]
pub struct Shared {
    pub gate: Arc<Gate>,
    upstream: Upstream,
    client_tls: ClientLeg,
    recover_statements: bool,
    routes: Vec<route::Route>,
    pub max_message_len: u32,
    sessions: DashMap<u64, Arc<Session>>,
    /// (backend pid, secret key) → session, for cancel requests.
    backends: DashMap<(i32, Vec<u8>), u64>,
    next_id: AtomicU64,
    connections: AtomicU64,
    cancels: AtomicU64,
    /// Client requests relayed (Sync, Query, FunctionCall).
    requests: AtomicU64,
    prepared: PreparedCounts,
}

/// Prepared statements whose result changed under them, over all sessions.
#[derive(Debug, Default)]
struct PreparedCounts {
    reprepared: AtomicU64,
    replayed: AtomicU64,
    reshaped_rows: AtomicU64,
    passed_on: AtomicU64,
}

/// What `/status` says of them.
#[derive(Debug, Clone, Serialize)]
pub struct PreparedStatus {
    /// Statements prepared again after their result changed.
    pub reprepared: u64,
    /// Client batches replayed after a `cached plan must not change result type` error.
    pub replayed: u64,
    /// Rows returned through a statement rewritten to keep the client's result shape.
    pub reshaped_rows: u64,
    /// Such errors passed on to the client (inside a transaction, pipelined, incompatible …).
    pub errors_passed_on: u64,
}

impl Shared {
    /// Adds what a session's tracker counted between `was` and `now`.
    pub(crate) fn add_counts(&self, now: tracker::Counts, was: tracker::Counts) {
        let p = &self.prepared;
        p.reprepared.fetch_add(now.reprepared - was.reprepared.min(now.reprepared), Ordering::Relaxed);
        p.replayed.fetch_add(now.replayed - was.replayed.min(now.replayed), Ordering::Relaxed);
        p.reshaped_rows.fetch_add(now.reshaped_rows - was.reshaped_rows.min(now.reshaped_rows), Ordering::Relaxed);
        p.passed_on.fetch_add(now.passed_on - was.passed_on.min(now.passed_on), Ordering::Relaxed);
    }

    fn register(&self, client: String, route: Option<usize>) -> Arc<Session> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let session = Arc::new(Session {
            id,
            client,
            started: Instant::now(),
            flags: Default::default(),
            backend: Default::default(),
            route,
            tracker: std::sync::Mutex::new(if self.recover_statements {
                tracker::Tracker::new()
            } else {
                tracker::Tracker::off()
            }),
        });
        self.sessions.insert(id, Arc::clone(&session));
        self.connections.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ghostwire_proxy_connections_total").increment(1);
        metrics::gauge!("ghostwire_proxy_sessions").set(self.sessions.len() as f64);
        session
    }

    fn unregister(&self, session: &Session) {
        if std::mem::take(&mut session.flags().busy) {
            self.gate.leave();
        }
        if let Some(key) = session.backend.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.backends.remove(&key);
        }
        self.sessions.remove(&session.id);
        metrics::gauge!("ghostwire_proxy_sessions").set(self.sessions.len() as f64);
    }

    fn remember_backend(&self, session: &Session, pid: i32, key: &[u8]) {
        self.backends.insert((pid, key.to_vec()), session.id);
        *session.backend.lock().unwrap_or_else(|p| p.into_inner()) = Some((pid, key.to_vec()));
    }

    /// Passes a cancel request to the server if it names one of our sessions (the server
    /// ignores a wrong one anyway; this keeps strangers from using us to reach it).
    async fn forward_cancel(&self, pid: i32, key: &[u8], packet: &[u8]) {
        if !self.backends.contains_key(&(pid, key.to_vec())) {
            tracing::debug!("ignoring a cancel request for unknown backend {pid}");
            return;
        }
        self.cancels.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ghostwire_proxy_cancels_total").increment(1);
        match self.upstream.open().await {
            Ok((mut server, _)) => {
                if let Err(e) = async {
                    server.write_all(packet).await?;
                    server.flush().await
                }
                .await
                {
                    tracing::warn!("forwarding a cancel request: {e}");
                }
            }
            Err(e) => tracing::warn!("forwarding a cancel request: {e}"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteStatus {
    pub rule: String,
    pub search_path: String,
    pub sessions: usize,
    pub routed_total: u64,
}

/// Everything `/status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub upstream: String,
    pub upstream_sslmode: &'static str,
    pub client_tls: &'static str,
    pub sessions: usize,
    pub in_transaction: usize,
    pub gate: GateStatus,
    pub connections_total: u64,
    pub cancels_total: u64,
    /// Client requests relayed (Sync, Query, FunctionCall) since the proxy started.
    pub requests_total: u64,
    pub prepared: PreparedStatus,
    /// Each `--route`: its rule, its search_path, the sessions it serves now and those it
    /// routed since the proxy started.
    pub routes: Vec<RouteStatus>,
}

#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// `upstream`: a libpq URL or keyword string, or `host:port`. Only its hosts and TLS
    /// settings are used: clients bring their own user, database and credentials. Clients
    /// talk plain text to this proxy.
    pub fn new(upstream: &str, max_message_len: u32) -> Result<Proxy, ProxyError> {
        Proxy::with_options(ProxyOptions {
            upstream: upstream.to_owned(),
            max_message_len,
            client_tls: ClientLeg::default(),
            recover_statements: true,
            routes: Vec::new(),
        })
    }

    pub fn with_options(options: ProxyOptions) -> Result<Proxy, ProxyError> {
        let upstream = Upstream::parse(&options.upstream)?;
        control::metrics(); // record from the first connection on
        Ok(Proxy {
            shared: Arc::new(Shared {
                gate: Arc::new(Gate::default()),
                upstream,
                client_tls: options.client_tls,
                recover_statements: options.recover_statements,
                routes: options.routes,
                max_message_len: options.max_message_len,
                sessions: DashMap::new(),
                backends: DashMap::new(),
                next_id: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                cancels: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                prepared: PreparedCounts::default(),
            }),
        })
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.shared.gate
    }

    /// Reads the TLS certificate and key again (SIGHUP): new sessions get them, established
    /// ones keep theirs.
    pub fn reload_certificate(&self) -> Result<bool, TlsSetupError> {
        match &self.shared.client_tls.acceptor {
            Some(a) => a.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Accepts clients until `shutdown`; then stops accepting, lets clients finish for up to
    /// `grace`, and closes the sessions still open.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken, grace: Duration) {
        let tracker = TaskTracker::new();
        let sessions_stop = CancellationToken::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    tracker.spawn(session::run(Arc::clone(&self.shared), stream, sessions_stop.clone()));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        tracker.close();
        if !self.shared.sessions.is_empty() {
            tracing::info!(
                "shutting down: waiting up to {grace:?} for {} session(s) to end",
                self.shared.sessions.len()
            );
        }
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!("closing {} remaining session(s)", self.shared.sessions.len());
            sessions_stop.cancel();
            tracker.wait().await;
        }
    }

    pub fn status(&self) -> Status {
        let in_transaction = self
            .shared
            .sessions
            .iter()
            .filter(|s| {
                let f = s.flags();
                f.busy && f.status != Some(ghostwire_proto::TransactionStatus::Idle)
            })
            .count();
        Status {
            upstream: self.shared.upstream.describe(),
            upstream_sslmode: self.shared.upstream.sslmode().as_str(),
            client_tls: self.shared.client_tls.mode.as_str(),
            sessions: self.shared.sessions.len(),
            in_transaction,
            gate: self.shared.gate.status(),
            connections_total: self.shared.connections.load(Ordering::Relaxed),
            cancels_total: self.shared.cancels.load(Ordering::Relaxed),
            requests_total: self.shared.requests.load(Ordering::Relaxed),
            prepared: {
                let p = &self.shared.prepared;
                PreparedStatus {
                    reprepared: p.reprepared.load(Ordering::Relaxed),
                    replayed: p.replayed.load(Ordering::Relaxed),
                    reshaped_rows: p.reshaped_rows.load(Ordering::Relaxed),
                    errors_passed_on: p.passed_on.load(Ordering::Relaxed),
                }
            },
            routes: self
                .shared
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| RouteStatus {
                    rule: r.rule.clone(),
                    search_path: r.search_path.clone(),
                    sessions: self.shared.sessions.iter().filter(|s| s.route == Some(i)).count(),
                    routed_total: r.routed.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// The control API's handler.
    pub fn control(&self) -> Handler {
        let proxy = self.clone();
        Arc::new(move |req: Request| {
            let proxy = proxy.clone();
            Box::pin(async move { proxy.handle(req).await })
        })
    }

    async fn handle(&self, req: Request) -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/drain") => {
                let deadline = req.number("deadline_ms").map(Duration::from_millis).unwrap_or(DEFAULT_DRAIN_DEADLINE);
                match self.shared.gate.drain(deadline).await {
                    Ok(waited) => {
                        metrics::counter!("ghostwire_proxy_drains_total", "outcome" => "drained").increment(1);
                        Response::json(
                            200,
                            &json!({"state": "drained", "waited_ms": ms(waited), "status": self.status()}),
                        )
                    }
                    Err(e) => {
                        let outcome = if matches!(e, DrainError::Deadline { .. }) { "deadline" } else { "busy" };
                        metrics::counter!("ghostwire_proxy_drains_total", "outcome" => outcome).increment(1);
                        Response::json(409, &json!({"state": self.shared.gate.status().state, "error": e.to_string()}))
                    }
                }
            }
            ("POST", "/open") => {
                let closed = self.shared.gate.open();
                if let Some(d) = closed {
                    metrics::histogram!("ghostwire_proxy_gate_closed_seconds").record(d.as_secs_f64());
                }
                Response::json(200, &json!({"state": "open", "closed_ms": closed.map(ms)}))
            }
            ("GET", "/status") => Response::json(200, &self.status()),
            ("GET", "/metrics") => Response::text(200, control::metrics().render()),
            _ => Response::not_found(),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
