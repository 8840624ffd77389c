//! Logical capture (`--capture logical`): the table's changes read from the WAL through a
//! replication slot and pgoutput, their keys written to the change log by a task of the
//! run. The application's writes carry no extra work.
//!
//! Install: a publication for the table alone (`replication::slot::publication_sql`), the
//! slot, then a wait for every transaction that held a write lock on the table when the
//! slot was made. The slot streams each transaction that commits after its consistent
//! point; one whose commit record is just before it may still be running as far as
//! snapshots go (a commit is written to the WAL before the transaction leaves the process
//! array), so the first copy chunk's snapshot would not see it either. Such a transaction
//! still holds its locks (they are released after it leaves the process array): waiting
//! for the lockers of that moment closes the gap (DESIGN.md §4).
//!
//! The stream task: every committed transaction's changes of the table become log rows
//! (old and new key on a key update, a marker on TRUNCATE), written in batches; an LSN is
//! confirmed to the server only after the log rows up to it are committed; keepalives that
//! ask for it are answered; while no transaction is pending the server's WAL end is
//! confirmed, so an idle table pins no WAL. A Relation message showing the table's name or
//! key changed stops the run. A fence (a logical message written in its own committed
//! transaction) asked for while the cut-over holds the lock is reached after every
//! transaction that committed before the lock: the log then holds all of them.
//!
//! Why the wait after the slot closes the gap (the argument DESIGN.md §4 asks for): take a
//! transaction T that wrote the table and is not streamed, so its commit record is before
//! the consistent point C. The first copy chunk's snapshot S is taken after the slot was
//! made, so after C. If S sees T, the copy has T's rows. If it does not, T was still in the
//! process array when S was taken, hence when the slot was made, and it still held its
//! locks then, its RowExclusiveLock on the table among them: the wait for the lockers of
//! that moment outlasts T, and S, taken after the wait, sees it. So every transaction that
//! wrote the table is streamed or copied (or both: applying a key twice is harmless).
//! Waiting on the table's lockers, not on the oldest xmin, keeps an unrelated long
//! transaction from holding the migration up.
//!
//! Why the fence is its own transaction: the swap's transaction is decoded only when it
//! commits, too late; a message in a committed transaction on another session is decoded in
//! commit order, after every transaction that committed before it, and every transaction
//! that wrote the table committed before the swap's lock was granted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ghostwire_proto::ServerCopy;
use ghostwire_proto::pgoutput::{Datum, Logical, decode};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::super::retry::{self, RetryPolicy};
use super::super::spec::Spec;
use crate::connect::{self, Params};
use crate::replication::{ReplicationClient, ReplicationError, Streamed, slot};
use crate::sql::ident;

#[derive(Debug, Error)]
pub enum LogicalError {
    #[error("{0}")]
    Replication(#[from] ReplicationError),
    #[error("{}", connect::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Connect(#[from] connect::ConnectError),
    #[error(
        "the table's definition changed under the migration ({0}); the original is untouched: `ghostwire abort` removes the run, then start it again"
    )]
    TableChanged(String),
    #[error(
        "the server invalidated replication slot {0} (wal_status lost: it retained more WAL than max_slot_wal_keep_size allows), so changes were lost to it; `ghostwire abort` removes the run, then start it again (with a higher max_slot_wal_keep_size, or --capture trigger)"
    )]
    SlotLost(String),
    #[error("{0}")]
    Stream(String),
    #[error("the fence was not reached within {0:?}")]
    FenceTimeout(Duration),
}

/// Creates what logical capture needs (each step idempotent, for a resumed run), then waits
/// for the writers in flight.
pub async fn install(control: &Client, session: &Params, spec: &Spec, retry: &RetryPolicy) -> Result<(), LogicalError> {
    let names = slot::Names::of(control, spec.migration_id).await?;
    retry::in_transaction(control, &super::log_table_sql(spec)).await?;
    if !slot::publication_exists(control, &names).await? {
        let sql = slot::publication_sql(&names, &spec.table);
        retry::ddl(control, retry, "creating the publication", &sql).await?;
    }
    if slot::state(control, &names).await?.is_none() {
        let mut repl = ReplicationClient::connect(session).await?;
        let at = slot::create(&mut repl, &names).await?;
        tracing::info!("replication slot {} consistent at {}", names.slot, ghostwire_proto::format_lsn(at));
    }
    wait_for_writers(control, spec).await?;
    Ok(())
}

/// Waits until every transaction that holds a write lock on the table (or a partition of
/// it) now has ended.
async fn wait_for_writers(control: &Client, spec: &Spec) -> Result<(), LogicalError> {
    let rows = control
        .query(
            "SELECT DISTINCT l.virtualtransaction FROM pg_catalog.pg_locks l
              WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
                AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
                AND l.relation IN (SELECT relid FROM pg_catalog.pg_partition_tree($1::oid))",
            &[&spec.original_oid],
        )
        .await?;
    let vxids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let started = Instant::now();
    let mut said = false;
    loop {
        let left: i64 = control
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'virtualxid' AND virtualxid = ANY($1)",
                &[&vxids],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        if !said && started.elapsed() > Duration::from_secs(5) {
            tracing::warn!("waiting for {left} transaction(s) that were writing to the table when the slot was made");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counters of the stream, shared with the run.
#[derive(Debug, Default)]
pub struct Progress {
    /// The last LSN confirmed to the server.
    pub confirmed: AtomicU64,
    /// Keys (and markers) written to the log.
    pub logged: AtomicU64,
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
        };
        let (f, c) = (Arc::clone(&failure), cancel.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = task.run(rx, c).await {
                tracing::error!("logical capture stopped: {e}");
                if let Ok(mut slot) = f.lock() {
                    *slot = Some(e.to_string());
                }
            }
        });
        Ok(Stream { requests, failure, cancel, task, progress, names })
    }

    /// Why the stream stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        if let Some(f) = self.failure.lock().ok().and_then(|f| f.clone()) {
            return Some(f);
        }
        self.task.is_finished().then(|| "the stream task ended".to_owned())
    }

    /// Returns once every transaction committed before this call is in the change log.
    pub async fn fence(&self, timeout: Duration) -> Result<(), LogicalError> {
        let (reply, done) = oneshot::channel();
        let failed = || LogicalError::Stream(self.failure().unwrap_or_else(|| "the stream task ended".into()));
        self.requests.send(FenceRequest { reply }).await.map_err(|_| failed())?;
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(())) => Ok(()),
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
    // Rows are confirmed to the server once committed: the commit must be durable.
    log.batch_execute("SET synchronous_commit = on").await?;
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

/// One change-log entry.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Key(Vec<Option<String>>),
    Truncate,
}

/// From pgoutput messages to log entries, for one table.
struct Decoder {
    oid: u32,
    schema: String,
    name: String,
    /// (name, type oid) of each key column.
    key: Vec<(String, u32)>,
    /// Where the key columns are in the stream's tuples (from the Relation message).
    positions: Option<Vec<usize>>,
    in_transaction: bool,
    last_commit_end: u64,
    pending: Vec<Entry>,
}

impl Decoder {
    fn new(spec: &Spec) -> Decoder {
        let key = spec
            .key
            .iter()
            .map(|k| (k.name.clone(), spec.table.column(&k.name).map(|c| c.type_oid).unwrap_or(0)))
            .collect();
        Decoder::of(spec.original_oid, &spec.original.schema, &spec.original.name, key)
    }

    fn of(oid: u32, schema: &str, name: &str, key: Vec<(String, u32)>) -> Decoder {
        Decoder {
            oid,
            schema: schema.to_owned(),
            name: name.to_owned(),
            key,
            positions: None,
            in_transaction: false,
            last_commit_end: 0,
            pending: Vec::new(),
        }
    }

    fn key_of(&self, tuple: &[Datum<'_>]) -> Result<Vec<Option<String>>, LogicalError> {
        let positions = self
            .positions
            .as_ref()
            .ok_or_else(|| LogicalError::Stream("a change of the table came before its Relation message".into()))?;
        positions
            .iter()
            .map(|&p| match tuple.get(p) {
                Some(Datum::Text(v)) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
                Some(Datum::Null) => Ok(None),
                Some(Datum::Unchanged) => Err(LogicalError::Stream(
                    "a key value came as an unchanged TOASTed value, without the old key: set REPLICA IDENTITY FULL \
                     on the table, or use --capture trigger"
                        .into(),
                )),
                Some(Datum::Binary(_)) => Err(LogicalError::Stream("a key value came in binary".into())),
                None => Err(LogicalError::Stream("a change has fewer columns than its Relation".into())),
            })
            .collect()
    }

    /// Takes one message. Returns a fence token's content when a ghostwire message came.
    fn take(&mut self, m: Logical<'_>) -> Result<Option<Vec<u8>>, LogicalError> {
        match m {
            Logical::Begin { .. } => self.in_transaction = true,
            Logical::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.last_commit_end = end_lsn;
            }
            Logical::Relation { oid, namespace, name, columns, .. } if oid == self.oid => {
                if namespace != self.schema || name != self.name {
                    return Err(LogicalError::TableChanged(format!("it is now named {namespace}.{name}")));
                }
                let mut positions = Vec::with_capacity(self.key.len());
                for (key, type_oid) in &self.key {
                    let found = columns.iter().position(|c| c.name == key);
                    match found {
                        Some(p) if columns[p].type_oid == *type_oid => positions.push(p),
                        Some(_) => {
                            return Err(LogicalError::TableChanged(format!("key column {key} changed its type")));
                        }
                        None => return Err(LogicalError::TableChanged(format!("key column {key} is gone"))),
                    }
                }
                self.positions = Some(positions);
            }
            Logical::Insert { relation, new } if relation == self.oid => {
                let k = self.key_of(&new)?;
                self.pending.push(Entry::Key(k));
            }
            Logical::Update { relation, key, old, new } if relation == self.oid => {
                let now = self.key_of(&new)?;
                if let Some(before) = key.as_deref().or(old.as_deref()) {
                    let before = self.key_of(before)?;
                    if before != now {
                        self.pending.push(Entry::Key(before));
                    }
                }
                self.pending.push(Entry::Key(now));
            }
            Logical::Delete { relation, key, old } if relation == self.oid => {
                let tuple = key.or(old).unwrap_or_default();
                let k = self.key_of(&tuple)?;
                self.pending.push(Entry::Key(k));
            }
            Logical::Truncate { relations, .. } if relations.contains(&self.oid) => self.pending.push(Entry::Truncate),
            Logical::Message { prefix: "ghostwire", content, .. } => return Ok(Some(content.to_vec())),
            _ => {}
        }
        Ok(None)
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
}

/// Most entries held before they are written.
const MAX_PENDING: usize = 10_000;
/// How long an entry may wait to be written.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A status update at least this often (wal_sender_timeout is 60 s by default).
const STATUS_EVERY: Duration = Duration::from_secs(5);
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
                        self.status(false).await?;
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
            let entries = std::mem::take(&mut self.decoder.pending);
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
            self.progress.logged.fetch_add(entries.len() as u64, Ordering::Relaxed);
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

/// Drops the slot and the publication of migration `id` (abort, finish, after the swap).
pub async fn remove(client: &Client, id: i64) -> Result<(), tokio_postgres::Error> {
    slot::remove(client, &slot::Names::of(client, id).await?).await
}

/// Whether the slot of migration `id` is there and usable.
pub async fn check_slot(client: &Client, id: i64) -> Result<(), LogicalError> {
    let names = slot::Names::of(client, id).await?;
    match slot::state(client, &names).await? {
        Some(s) if s.wal_status.as_deref() == Some("lost") => Err(LogicalError::SlotLost(names.slot)),
        Some(_) => Ok(()),
        None => Err(LogicalError::Stream(format!(
            "replication slot {} is gone, so changes since it was dropped were not recorded; `ghostwire abort` \
             removes the run",
            ident(&names.slot)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghostwire_proto::pgoutput::RelationColumn;

    fn relation<'a>(name: &'a str, columns: &[(&'a str, u32)]) -> Logical<'a> {
        Logical::Relation {
            oid: 7,
            namespace: "Sales",
            name,
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|(n, t)| RelationColumn { key: true, name: n, type_oid: *t, type_modifier: -1 })
                .collect(),
        }
    }

    fn decoder() -> Decoder {
        Decoder::of(7, "Sales", "Order Items", vec![("tenant".into(), 23), ("seq".into(), 20)])
    }

    #[test]
    fn keys_come_from_the_relation_s_columns_old_and_new_on_a_key_update() {
        let mut d = decoder();
        d.take(relation("Order Items", &[("seq", 20), ("note", 25), ("tenant", 23)])).unwrap();
        let t = |s: &'static str| Datum::Text(s.as_bytes());
        d.take(Logical::Insert { relation: 7, new: vec![t("1"), Datum::Null, t("3")] }).unwrap();
        d.take(Logical::Update {
            relation: 7,
            key: Some(vec![t("1"), Datum::Null, t("3")]),
            old: None,
            new: vec![t("2"), t("x"), t("3")],
        })
        .unwrap();
        // Another table's changes are not ours.
        d.take(Logical::Delete { relation: 8, key: Some(vec![t("9")]), old: None }).unwrap();
        d.take(Logical::Truncate { options: 0, relations: vec![8, 7] }).unwrap();
        let key = |a: &str, b: &str| Entry::Key(vec![Some(a.into()), Some(b.into())]);
        assert_eq!(d.pending, [key("3", "1"), key("3", "1"), key("3", "2"), Entry::Truncate]);
        // A fence comes back as its token.
        let fence = Logical::Message { transactional: true, lsn: 1, prefix: "ghostwire", content: b"f1" };
        assert_eq!(d.take(fence).unwrap(), Some(b"f1".to_vec()));
    }

    #[test]
    fn a_changed_relation_stops_the_stream() {
        let renamed = decoder().take(relation("Order Lines", &[("seq", 20), ("tenant", 23)]));
        assert!(matches!(renamed, Err(LogicalError::TableChanged(ref w)) if w.contains("Order Lines")), "{renamed:?}");
        let retyped = decoder().take(relation("Order Items", &[("seq", 1700), ("tenant", 23)]));
        assert!(matches!(retyped, Err(LogicalError::TableChanged(ref w)) if w.contains("seq")), "{retyped:?}");
        let gone = decoder().take(relation("Order Items", &[("tenant", 23)]));
        assert!(matches!(gone, Err(LogicalError::TableChanged(ref w)) if w.contains("gone")), "{gone:?}");
        // A change before any Relation is a protocol error, not a guess.
        let early = decoder().take(Logical::Insert { relation: 7, new: vec![] });
        assert!(matches!(early, Err(LogicalError::Stream(_))));
    }
}
