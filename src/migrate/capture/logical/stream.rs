//! The stream task of a logical capture: reads the slot through the replication client,
//! decodes, writes the keys to the change log in batches, confirms to the server only what
//! is committed, answers keepalives, reaches fences, and reconnects after a lost session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ghostwire_proto::ServerCopy;
use ghostwire_proto::pgoutput::decode;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::LogicalError;
use super::decode::{Decoder, Entry};
use crate::connect::{self, Params};
use crate::migrate::spec::Spec;
use crate::replication::{ReplicationClient, ReplicationError, Streamed, slot};

/// Counters of the stream, shared with the run.
#[derive(Debug, Default)]
pub struct Progress {
    /// The last LSN confirmed to the server.
    pub confirmed: AtomicU64,
    /// When the stream last told the server how far it got (ms since the Unix epoch).
    pub confirmed_at_ms: AtomicU64,
}

impl Progress {
    /// Seconds since the stream last confirmed (None before it did).
    pub fn confirmed_ago(&self) -> Option<f64> {
        let at = self.confirmed_at_ms.load(Ordering::Relaxed);
        (at > 0).then(|| (unix_ms().saturating_sub(at)) as f64 / 1000.0)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct FenceRequest {
    reply: oneshot::Sender<()>,
}

/// The running stream of one migration.
pub struct Stream {
    requests: mpsc::Sender<FenceRequest>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// The task stopped because the change log was emptied by a crash of the server.
    log_lost: Arc<std::sync::atomic::AtomicBool>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    pub progress: Arc<Progress>,
    /// The slot and publication streamed from.
    pub names: slot::Names,
}

impl Stream {
    /// Connects (a log session and a replication session) and starts streaming from where
    /// the slot was last confirmed.
    pub async fn start(session: &Params, spec: &Spec) -> Result<Stream, LogicalError> {
        let (log, repl, names) = open(session, spec).await?;
        let (requests, rx) = mpsc::channel(4);
        let failure = Arc::new(std::sync::Mutex::new(None));
        let cancel = CancellationToken::new();
        let progress = Arc::new(Progress::default());
        let task = Task {
            session: session.clone(),
            spec: spec.clone(),
            log,
            insert: None,
            repl,
            decoder: Decoder::new(spec),
            fences: Vec::new(),
            fence_seq: 0,
            progress: Arc::clone(&progress),
            cancel: cancel.clone(),
        };
        let log_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, lost, c) = (Arc::clone(&failure), Arc::clone(&log_lost), cancel.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = task.run(rx, c).await {
                tracing::error!("logical capture stopped: {e}");
                lost.store(matches!(e, LogicalError::LogLost), Ordering::Relaxed);
                if let Ok(mut slot) = f.lock() {
                    *slot = Some(e.to_string());
                }
            }
        });
        Ok(Stream { requests, failure, log_lost, cancel, task, progress, names })
    }

    /// Why the stream stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        if let Some(f) = self.failure.lock().ok().and_then(|f| f.clone()) {
            return Some(f);
        }
        self.task.is_finished().then(|| "the stream task ended".to_owned())
    }

    /// Whether the stream stopped because a crash of the server emptied the change log.
    pub fn log_lost(&self) -> bool {
        self.log_lost.load(Ordering::Relaxed)
    }

    /// Returns once every transaction committed before this call is in the change log.
    pub async fn fence(&self, timeout: Duration) -> Result<(), LogicalError> {
        let (reply, done) = oneshot::channel();
        let failed = || LogicalError::Stream(self.failure().unwrap_or_else(|| "the stream task ended".into()));
        self.requests.send(FenceRequest { reply }).await.map_err(|_| failed())?;
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) if self.log_lost() => Err(LogicalError::LogLost),
            Ok(Err(_)) => Err(failed()),
            Err(_) => Err(LogicalError::FenceTimeout(timeout)),
        }
    }

    /// Stops the task (what it received but did not log is streamed again next time).
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Stream {
    /// A run dropped without `stop` (it failed, or reconnects with new sessions) ends its
    /// stream too, freeing the slot for the next one.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn open(session: &Params, spec: &Spec) -> Result<(Client, ReplicationClient, slot::Names), LogicalError> {
    let log = connect::connect(session).await?;
    // Rows are confirmed to the server once committed: the commit must be durable here,
    // and nothing confirmed may have been lost to a crash since (checked on every
    // connection: a crash ends them all). Durable here is enough: the log is UNLOGGED, so a
    // standby has none of it, and waiting for one at every flush would only slow the stream.
    log.batch_execute("SET synchronous_commit = local").await?;
    if !super::log_intact(&log, spec.migration_id).await? {
        return Err(LogicalError::LogLost);
    }
    let names = slot::Names::of(&log, spec.migration_id).await?;
    let options = [("proto_version", "1"), ("publication_names", names.publication.as_str()), ("messages", "true")];
    let started = Instant::now();
    loop {
        let mut repl = ReplicationClient::connect(session).await?;
        match repl.start_logical(&names.slot, 0, &options).await {
            Ok(()) => return Ok((log, repl, names)),
            // The walsender of a stream that just ended (a killed run, a reconnection)
            // still has the slot for a moment.
            Err(ReplicationError::Server { code, .. })
                if code == "55006" && started.elapsed() < Duration::from_secs(15) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

struct Task {
    session: Params,
    spec: Spec,
    log: Client,
    /// The log insert, prepared on `log`.
    insert: Option<tokio_postgres::Statement>,
    repl: ReplicationClient,
    decoder: Decoder,
    /// Fences asked for: (token, who waits).
    fences: Vec<(String, oneshot::Sender<()>)>,
    fence_seq: u64,
    progress: Arc<Progress>,
    /// Cancelled when the stream is stopped.
    cancel: CancellationToken,
}

/// Most entries held before they are written.
const MAX_PENDING: usize = 10_000;
/// How long an entry may wait to be written.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A status update at least this often (wal_sender_timeout is 60 s by default); while
/// idle, it asks the server for its WAL end.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How long the task tries to reconnect after losing a session.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

impl Task {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<FenceRequest>,
        cancel: CancellationToken,
    ) -> Result<(), LogicalError> {
        let mut lost_since: Option<Instant> = None;
        loop {
            match self.stream(&mut requests, &cancel).await {
                Ok(()) => return Ok(()),
                Err(_) if cancel.is_cancelled() => return Ok(()),
                Err(e) if is_lost(&e) => {
                    let since = *lost_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > RECONNECT_FOR {
                        return Err(e);
                    }
                    tracing::warn!("logical capture lost its connection ({e}); reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(connect::reconnect_pause(since.elapsed().as_secs() as u32)) => {}
                    }
                    match open(&self.session, &self.spec).await {
                        Ok((log, repl, _)) => {
                            // What was received and not logged is streamed again.
                            self.log = log;
                            self.insert = None;
                            self.repl = repl;
                            self.decoder = Decoder::new(&self.spec);
                            lost_since = None;
                            // Fences asked for before are written again.
                            let waiting = std::mem::take(&mut self.fences);
                            for (_, reply) in waiting {
                                self.ask_fence(reply).await?;
                            }
                        }
                        Err(e) if is_lost(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn ask_fence(&mut self, reply: oneshot::Sender<()>) -> Result<(), LogicalError> {
        self.fence_seq += 1;
        let token = format!("fence {} {}", self.spec.migration_id, self.fence_seq);
        slot::emit_fence(&self.log, &token).await?;
        self.fences.push((token, reply));
        Ok(())
    }

    async fn stream(
        &mut self,
        requests: &mut mpsc::Receiver<FenceRequest>,
        cancel: &CancellationToken,
    ) -> Result<(), LogicalError> {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        let mut last_status = Instant::now();
        let mut first_pending: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                request = requests.recv() => match request {
                    Some(r) => self.ask_fence(r.reply).await?,
                    None => return Ok(()),
                },
                message = self.repl.recv() => {
                    let mut next = Some(message?);
                    // What else is already buffered goes through without a wake-up each.
                    while let Some(message) = next {
                        let body = match message {
                            Streamed::Data(body) => body,
                            Streamed::Done => return Err(LogicalError::Replication(ReplicationError::Closed)),
                        };
                        if self.take(&body, &mut first_pending).await? {
                            last_status = Instant::now();
                        }
                        next = self.repl.buffered()?;
                    }
                }
                _ = tick.tick() => {
                    if first_pending.is_some_and(|t| t.elapsed() >= FLUSH_EVERY) {
                        self.flush().await?;
                        first_pending = None;
                        self.status(false).await?;
                        last_status = Instant::now();
                    } else if last_status.elapsed() >= STATUS_EVERY {
                        // Idle, the server is asked for its WAL end (a keepalive comes back
                        // at once), which is then confirmed: an idle table pins no WAL.
                        self.status(!self.decoder.in_transaction).await?;
                        last_status = Instant::now();
                    }
                }
            }
        }
    }

    /// Takes one CopyData message; true when a status update was sent.
    async fn take(&mut self, body: &[u8], first_pending: &mut Option<Instant>) -> Result<bool, LogicalError> {
        match ghostwire_proto::server_copy(body).map_err(ReplicationError::from)? {
            ServerCopy::XLogData { data, .. } => {
                let m = decode(data).map_err(ReplicationError::from)?;
                let had = self.decoder.pending.len();
                if let Some(token) = self.decoder.take(m)? {
                    self.reached(&token).await?;
                }
                if self.decoder.pending.len() > had {
                    crate::failpoint::hit("logical.received");
                    first_pending.get_or_insert_with(Instant::now);
                }
                if self.decoder.pending.len() >= MAX_PENDING {
                    self.flush().await?;
                    *first_pending = None;
                }
                Ok(false)
            }
            ServerCopy::Keepalive { wal_end, reply, .. } => {
                if !self.decoder.in_transaction {
                    // Everything before the server's WAL end has been received.
                    self.flush().await?;
                    *first_pending = None;
                    self.progress.confirmed.fetch_max(wal_end, Ordering::Relaxed);
                }
                if reply || !self.decoder.in_transaction {
                    self.status(reply).await?;
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// A ghostwire message: if it is a fence asked for, the log gets everything before it.
    async fn reached(&mut self, token: &[u8]) -> Result<(), LogicalError> {
        let Some(at) = self.fences.iter().position(|(t, _)| t.as_bytes() == token) else { return Ok(()) };
        self.flush().await?;
        crate::failpoint::hit("logical.fence");
        // Fences asked for earlier are reached too.
        for (_, reply) in self.fences.drain(..=at) {
            let _ = reply.send(());
        }
        Ok(())
    }

    /// Writes the pending entries in one transaction, in order.
    async fn flush(&mut self) -> Result<(), LogicalError> {
        if !self.decoder.pending.is_empty() {
            let (entries, xids) = self.decoder.take_pending();
            let confirmed = self.progress.confirmed.load(Ordering::Relaxed);
            super::visible::wait(&self.cancel, &self.log, &mut self.repl, confirmed, &xids, STATUS_EVERY).await?;
            let insert = match &self.insert {
                Some(statement) => statement.clone(),
                None => {
                    let statement = self.log.prepare(&insert_keys_sql(&self.spec)).await?;
                    self.insert = Some(statement.clone());
                    statement
                }
            };
            write_entries(&mut self.log, &insert, &self.spec, &entries).await?;
            crate::failpoint::hit("logical.logged");
            metrics::counter!("ghostwire_logical_changes_total").increment(entries.len() as u64);
        }
        self.progress.confirmed.fetch_max(self.decoder.last_commit_end, Ordering::Relaxed);
        Ok(())
    }

    async fn status(&mut self, reply: bool) -> Result<(), LogicalError> {
        let confirmed = self.progress.confirmed.load(Ordering::Relaxed);
        self.repl.send_status(confirmed, reply).await?;
        self.progress.confirmed_at_ms.store(unix_ms(), Ordering::Relaxed);
        Ok(())
    }
}

fn is_lost(e: &LogicalError) -> bool {
    match e {
        LogicalError::Replication(r) => r.is_connection_lost(),
        LogicalError::Database(d) => connect::is_connection_lost(d),
        LogicalError::Connect(c) => !c.is_refusal(),
        _ => false,
    }
}

/// The statement that logs keys given column by column as text arrays.
fn insert_keys_sql(spec: &Spec) -> String {
    let log = spec.log_table().sql();
    let n = spec.key.len();
    let params: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let casts: Vec<String> = spec.key.iter().enumerate().map(|(i, k)| format!("u.c{i}::{}", k.type_sql)).collect();
    format!(
        "INSERT INTO {log} ({}) SELECT {} FROM unnest({}) AS u({})",
        spec.key_list(),
        casts.join(", "),
        params.join(", "),
        aliases.join(", ")
    )
}

/// Writes `entries` in one transaction, in order; a key seen twice between markers is
/// written once (applying it reads the row as it is then, whatever changed it).
async fn write_entries(
    log: &mut Client,
    insert: &tokio_postgres::Statement,
    spec: &Spec,
    entries: &[Entry],
) -> Result<(), tokio_postgres::Error> {
    let marker = format!("INSERT INTO {} (ghostwire_truncated) VALUES (true)", spec.log_table().sql());
    let tx = log.transaction().await?;
    let mut i = 0;
    while i < entries.len() {
        if entries[i] == Entry::Truncate {
            tx.batch_execute(&marker).await?;
            i += 1;
            continue;
        }
        let run_end = entries[i..].iter().position(|e| *e == Entry::Truncate).map_or(entries.len(), |p| i + p);
        let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(run_end - i); spec.key.len()];
        let mut seen = std::collections::HashSet::with_capacity(run_end - i);
        for e in &entries[i..run_end] {
            if let Entry::Key(values) = e
                && seen.insert(values)
            {
                for (c, v) in columns.iter_mut().zip(values) {
                    c.push(v.clone());
                }
            }
        }
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        tx.execute(insert, &params).await?;
        i = run_end;
    }
    tx.commit().await
}
