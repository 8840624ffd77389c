//! A session's prepared statements, as the proxy follows them (DESIGN.md §3), and what it
//! does when one's result changed under it. Pure bookkeeping: the relay's two directions
//! tell it every message they pass, and it says what to do with each server message; no I/O.
//!
//! The client's named statements are kept with their text, the parameter types the server
//! inferred and the result shape the client was told. Every message sent to the server is
//! an entry the server's answers are matched against, batch by batch (up to each Sync).
//! Answers to a batch that binds or describes a statement prepared earlier are held back
//! until that Bind or Describe is answered (one message, no extra round trip). When it is
//! answered with `cached plan must not change result type`, in a batch that began outside a
//! transaction block (its implicit transaction rolled back) and that is the only one in
//! flight, the proxy keeps the error to itself and recovers:
//!
//! 1. probe: the statement's text is prepared under a name of the proxy's, with the old
//!    parameter types, and described: the new result shape;
//! 2. re-prepare: the statement is prepared again under its own name, either as it was (the
//!    client's batch describes it, so the client learns the new shape) or rewritten to
//!    return the shape the client has ([`super::reshape`]); a trial Parse first, so a
//!    failure leaves the client's statement as it was;
//! 3. replay: the client's batch again, its answers to the client.
//!
//! Whatever fails on the way gives the client what it would have got (the held answers,
//! the error, ReadyForQuery). Anything unexpected turns the bookkeeping off for the session:
//! from then on the proxy only relays.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use ghostwire_proto::{self as proto, Field, TransactionStatus};

use recovery::Recovery;
use refresh::Refresh;

/// The longest client batch kept for a replay.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Answers held back at most (then they are passed on, and the batch cannot be replayed).
const MAX_HELD_BYTES: usize = 1024 * 1024;
/// Statement texts kept per session.
const MAX_TEXT_BYTES: usize = 8 * 1024 * 1024;
/// Names the proxy prepares under.
const PROBE: &str = "ghostwire_probe";
const TRIAL: &str = "ghostwire_trial";

/// FNV-1a over a statement or portal name: names are short, looked up on every message,
/// and chosen by the session's own client (which can slow only itself).
#[derive(Default)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Names<V> = HashMap<String, V, BuildHasherDefault<NameHasher>>;

/// A named (or the unnamed) statement the client prepared.
#[derive(Debug, Clone)]
struct Statement {
    query: String,
    /// As the client gave them (0: inferred).
    client_types: Vec<u32>,
    /// As the server inferred them (ParameterDescription), once described.
    params: Option<Vec<u32>>,
    /// The result the client was last told (empty: no rows), once described.
    /// As a RowDescription body (empty: NoData); see [`shape_of`].
    shape: Option<Vec<u8>>,
    /// Prepared as a rewrite that returns `shape` from a table that changed.
    rewritten: bool,
    /// The parameter formats of its last Bind (a value sent as text fits whatever type the
    /// server infers for it now).
    bind_formats: proto::ParamFormats,
    /// Executions whose portal the client described after binding it (as libpq does every
    /// time), and whether one ran without: a client that describes only its first execution
    /// (pgjdbc) decodes later rows with the shape it learned then.
    described_runs: u32,
    undescribed_run: bool,
    /// Its last Bind named a result format for each column (two at least): the client built
    /// the Bind from the shape it was first told (pgx), so the column count is fixed for it
    /// even when it describes every portal.
    results_per_column: bool,
    /// The batch it was prepared in.
    batch: u64,
}

impl Statement {
    /// The parameter types to prepare it again with, given the parameters the server
    /// describes now (`now`) and the formats the client sends its values in: those its
    /// values were encoded for (all of them, once described), else for each parameter the
    /// type given in its Parse, or for a value sent as text the server's new inference.
    /// None: not known (a value in binary for a type never given nor described).
    fn types_again(&self, now: Option<&[u32]>, formats: &proto::ParamFormats) -> Option<Vec<u32>> {
        if let Some(p) = &self.params {
            return Some(p.clone());
        }
        let now = now?;
        if self.client_types.len() > now.len() {
            return None;
        }
        now.iter()
            .enumerate()
            .map(|(i, &inferred)| match self.client_types.get(i) {
                Some(&given) if given != 0 => Some(given),
                _ if !formats.is_binary(i) => Some(inferred),
                _ => None,
            })
            .collect()
    }

    /// Whether the client takes a new result shape by itself: it described the portal of
    /// every execution (two at least), and its Binds do not fix the number of columns.
    fn takes_new_shape(&self) -> bool {
        self.described_runs >= 2 && !self.undescribed_run && !self.results_per_column
    }
}

/// What a message sent to the server waits for.
#[derive(Debug, Clone)]
enum Pending {
    /// `query` None: too long to keep (the statement is not followed).
    Parse {
        name: String,
        query: Option<String>,
        types: Vec<u32>,
    },
    Bind {
        portal: String,
        statement: String,
        risky: bool,
    },
    DescribeStatement {
        name: String,
        risky: bool,
        params: Option<Vec<u32>>,
    },
    DescribePortal {
        portal: String,
    },
    Execute {
        portal: String,
        /// Whether its statement is a rewrite (its rows are counted), once its first row came.
        reshaped: Option<bool>,
    },
    Close {
        statement: bool,
        name: String,
    },
    /// The end of a batch: Sync, a simple Query or a FunctionCall, answered by ReadyForQuery.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Client,
    /// The client's batch sent again: never recovered twice.
    Replay,
    Probe,
    Reprepare,
    /// A check of the statements after a drain ([`refresh`]).
    RefreshProbe,
    RefreshReprepare,
}

/// What a batch waits for, in order; `true`: the proxy's own message.
type Entries = VecDeque<(Pending, bool)>;

#[derive(Debug)]
struct Batch {
    origin: Origin,
    seq: u64,
    entries: Entries,
    closed: bool,
    /// Its messages, for a replay (None: too long).
    bytes: Option<Vec<u8>>,
    risky: usize,
    held: Vec<u8>,
    forwarded: bool,
    /// Answered by an error: the rest up to ReadyForQuery is skipped by the server.
    failed: bool,
    /// This batch's failure is being recovered from: its answers are kept, not passed on.
    recovering: bool,
    /// Named statements prepared in it (closed before a replay prepares them again).
    parsed: Vec<String>,
    /// A COMMIT (or another end of a transaction) in it completed: what came before the
    /// error may be durable, and the batch is never replayed.
    ended_transaction: bool,
}

impl Batch {
    fn new(origin: Origin, seq: u64) -> Batch {
        Batch {
            origin,
            seq,
            entries: VecDeque::new(),
            closed: false,
            bytes: Some(Vec::new()),
            risky: 0,
            held: Vec::new(),
            forwarded: false,
            failed: false,
            recovering: false,
            parsed: Vec::new(),
            ended_transaction: false,
        }
    }

    fn internal(&self) -> bool {
        matches!(self.origin, Origin::Probe | Origin::Reprepare | Origin::RefreshProbe | Origin::RefreshReprepare)
    }
}

/// The columns of a RowDescription body kept as the server sent it (empty: none).
fn shape_of(raw: &[u8]) -> Result<Vec<Field>, proto::ProtoError> {
    if raw.is_empty() { Ok(Vec::new()) } else { proto::row_description(raw) }
}

/// What the relay does with one server message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Pass this message on (after `deliver`).
    pub forward: bool,
    /// Bytes to write to the client first (answers held back, or given up on).
    pub deliver: Vec<u8>,
    /// Bytes to send to the server (a probe, a re-prepare, a replay).
    pub inject: Vec<u8>,
    /// A ReadyForQuery the client gets (with this message or in `deliver`).
    pub ready: Option<TransactionStatus>,
    /// A recovery ended: the client's messages may flow again.
    pub resume: bool,
}

/// What the relay does with one client message.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientStep {
    Forward,
    /// Send these bytes to the server first.
    Prefix(Vec<u8>),
    /// Hold the message: a recovery is under way.
    Wait,
    /// Send these bytes to the server and hold the message: the statements are checked
    /// after a drain first.
    Hold(Vec<u8>),
}

/// Counters for `/status` and `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub reprepared: u64,
    pub replayed: u64,
    pub reshaped_rows: u64,
    pub passed_on: u64,
}

#[derive(Debug, Default)]
pub struct Tracker {
    statements: Names<Statement>,
    text_bytes: usize,
    /// Portal → statement.
    portals: Names<String>,
    /// The last Bind sent (portal, statement) and whether its portal was described since.
    last_bind: Option<(String, String, bool)>,
    batches: VecDeque<Batch>,
    next_seq: u64,
    /// The transaction status of the last ReadyForQuery.
    status: Option<TransactionStatus>,
    recovery: Option<Recovery>,
    refresh: Option<Refresh>,
    /// The gate's drains when the session last passed it.
    drains: u64,
    /// The gate has closed since: the statements are checked before the next batch.
    suspect: bool,
    /// The buffers of the last batch answered, for the next (a batch per execution).
    spare: Option<(Entries, Vec<u8>)>,
    disabled: bool,
    pub counts: Counts,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// A tracker that follows nothing: the session is only relayed.
    pub fn off() -> Tracker {
        Tracker { disabled: true, ..Tracker::default() }
    }

    pub fn disabled(&self) -> bool {
        self.disabled
    }

    /// A recovery is under way: the client's messages wait.
    pub fn recovering(&self) -> bool {
        self.recovery.is_some() || self.refresh.is_some()
    }

    /// Something did not add up: from now on, relay only.
    fn disable(&mut self, why: &str) -> Outcome {
        tracing::warn!("prepared-statement bookkeeping off for this session: {why}");
        self.disabled = true;
        self.statements.clear();
        self.portals.clear();
        let mut out = Outcome { forward: true, ..Outcome::default() };
        for b in self.batches.drain(..) {
            out.deliver.extend(b.held);
        }
        if let Some(r) = self.recovery.take() {
            out.deliver.splice(0..0, r.given);
            out.resume = true;
        }
        if self.refresh.take().is_some() {
            out.resume = true;
        }
        out
    }

    fn current_client_batch(&mut self) -> &mut Batch {
        let open = self.batches.back().is_some_and(|b| !b.closed && b.origin == Origin::Client);
        if !open {
            self.next_seq += 1;
            let batch = self.new_batch(Origin::Client);
            self.batches.push_back(batch);
        }
        self.batches.back_mut().expect("just pushed")
    }

    fn new_batch(&mut self, origin: Origin) -> Batch {
        let mut b = Batch::new(origin, self.next_seq);
        if let Some((entries, bytes)) = self.spare.take() {
            (b.entries, b.bytes) = (entries, Some(bytes));
        }
        b
    }

    /// Keeps an answered batch's buffers for the next one, unless they grew large.
    fn recycle(&mut self, b: Batch) {
        let Batch { mut entries, bytes, .. } = b;
        if let Some(mut bytes) = bytes.filter(|b| b.capacity() <= 64 * 1024) {
            entries.clear();
            bytes.clear();
            self.spare = Some((entries, bytes));
        }
    }

    /// A whole client message (`msg`: tag, length and body), before it is sent.
    pub fn on_client(&mut self, msg: &[u8]) -> ClientStep {
        if self.disabled || msg.len() < 5 {
            return ClientStep::Forward;
        }
        if self.recovering() {
            return ClientStep::Wait;
        }
        if let Some(probes) = self.start_refresh() {
            return ClientStep::Hold(probes);
        }
        let mut prefix = Vec::new();
        let entry = match self.client_entry(msg[0], &msg[5..], &mut prefix) {
            Ok(e) => e,
            Err(why) => {
                self.disable(&why);
                return ClientStep::Forward;
            }
        };
        let batch = self.current_client_batch();
        if let Some(bytes) = batch.bytes.as_mut() {
            if bytes.len() + msg.len() <= MAX_BATCH_BYTES {
                bytes.extend(msg);
            } else {
                batch.bytes = None;
            }
        }
        if let Some(e) = entry {
            self.push_entry(e, !prefix.is_empty());
        }
        if prefix.is_empty() { ClientStep::Forward } else { ClientStep::Prefix(prefix) }
    }

    /// Records the answer `entry` awaits in the current client batch. With `prefixed`, the
    /// proxy's own Close and Parse go before it (answered first, and swallowed).
    fn push_entry(&mut self, entry: Pending, prefixed: bool) {
        let seq = self.current_client_batch().seq;
        let risky = |name: &str, statements: &Names<Statement>| statements.get(name).is_some_and(|s| s.batch < seq);
        let entry = match entry {
            Pending::Bind { portal, statement, .. } => {
                let r = risky(&statement, &self.statements);
                Pending::Bind { portal, statement, risky: r }
            }
            Pending::DescribeStatement { name, params, .. } => {
                let r = risky(&name, &self.statements) && !prefixed;
                Pending::DescribeStatement { name, risky: r, params }
            }
            other => other,
        };
        let batch = self.current_client_batch();
        if prefixed && let Pending::DescribeStatement { name, .. } = &entry {
            batch.entries.push_back((Pending::Close { statement: true, name: name.clone() }, true));
            batch.entries.push_back((Pending::Parse { name: name.clone(), query: None, types: Vec::new() }, true));
        }
        if matches!(entry, Pending::Bind { risky: true, .. } | Pending::DescribeStatement { risky: true, .. }) {
            batch.risky += 1;
        }
        let end = matches!(entry, Pending::End);
        batch.entries.push_back((entry, false));
        if end {
            batch.closed = true;
        }
    }

    /// The entry a client message adds (None: it is not answered), and, for a Describe of a
    /// rewritten statement, the Close and Parse that prepare it as it was first.
    fn client_entry(&mut self, tag: u8, body: &[u8], prefix: &mut Vec<u8>) -> Result<Option<Pending>, String> {
        let bad = |e: proto::ProtoError| e.to_string();
        Ok(Some(match tag {
            b'P' => {
                let p = proto::parse_body(body).map_err(bad)?;
                Pending::Parse { name: p.name.to_owned(), query: Some(p.query.to_owned()), types: p.param_types }
            }
            b'B' => {
                let bind = proto::bind_body(body).map_err(bad)?;
                if let Some(s) = self.statements.get_mut(bind.statement) {
                    s.bind_formats = bind.param_formats();
                    s.results_per_column = bind.result_formats.len() > 1;
                }
                self.last_bind = Some((bind.portal.to_owned(), bind.statement.to_owned(), false));
                Pending::Bind { portal: bind.portal.to_owned(), statement: bind.statement.to_owned(), risky: false }
            }
            b'D' => {
                let t = proto::target_body(body).map_err(bad)?;
                if !t.statement {
                    if let Some((portal, _, described)) = self.last_bind.as_mut()
                        && portal == t.name
                    {
                        *described = true;
                    }
                    Pending::DescribePortal { portal: t.name.to_owned() }
                } else {
                    // The client asks what the statement is: if it is a rewrite, it is prepared
                    // as the client wrote it again, and the client learns the new shape.
                    if let Some(s) = self.statements.get(t.name).filter(|s| s.rewritten) {
                        let types = s.params.clone().unwrap_or_else(|| s.client_types.clone());
                        prefix.extend(proto::close_message(true, t.name));
                        prefix.extend(proto::parse_message(t.name, &s.query, &types));
                    }
                    Pending::DescribeStatement { name: t.name.to_owned(), risky: false, params: None }
                }
            }
            b'E' => {
                let portal = proto::execute_portal(body).map_err(bad)?;
                if let Some((_, statement, described)) = self.last_bind.take_if(|(p, _, _)| p == portal)
                    && let Some(s) = self.statements.get_mut(&statement)
                {
                    if described {
                        s.described_runs = s.described_runs.saturating_add(1);
                    } else {
                        s.undescribed_run = true;
                    }
                }
                Pending::Execute { portal: portal.to_owned(), reshaped: None }
            }
            b'C' => {
                let t = proto::target_body(body).map_err(bad)?;
                Pending::Close { statement: t.statement, name: t.name.to_owned() }
            }
            b'S' | b'F' => Pending::End,
            b'Q' => {
                let text = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).to_ascii_uppercase();
                if text.contains("DEALLOCATE") || text.contains("DISCARD") {
                    // SQL-level statements share the protocol's namespace: forget them all.
                    self.statements.clear();
                    self.portals.clear();
                    self.text_bytes = 0;
                }
                Pending::End
            }
            // Flush, CopyData, CopyDone, CopyFail, Terminate: not answered on their own.
            b'H' | b'd' | b'c' | b'f' | b'X' => return Ok(None),
            other => return Err(format!("unexpected client message {:?}", other as char)),
        }))
    }

    /// The start of a client message too long to hold (its first `available` bytes): it
    /// cannot be replayed, and its names must be in what is there.
    pub fn on_client_large(&mut self, start: &[u8]) -> ClientStep {
        if self.disabled {
            return ClientStep::Forward;
        }
        if self.recovering() {
            return ClientStep::Wait;
        }
        let name_at_start = |b: &[u8]| -> Option<String> {
            let end = b.iter().position(|&c| c == 0)?;
            std::str::from_utf8(&b[..end]).ok().map(str::to_owned)
        };
        let body = start.get(5..).unwrap_or_default();
        let step = match start.first() {
            Some(b'd') => return ClientStep::Forward,
            Some(b'B') => proto::bind_names(body).ok().map(|(portal, statement)| Pending::Bind {
                portal: portal.to_owned(),
                statement: statement.to_owned(),
                risky: false,
            }),
            Some(b'P') => name_at_start(body).map(|name| Pending::Parse { name, query: None, types: Vec::new() }),
            Some(b'Q' | b'F') => Some(Pending::End),
            _ => None,
        };
        self.current_client_batch().bytes = None;
        match step {
            Some(e) => self.push_entry(e, false),
            None => {
                self.disable("a long client message that cannot be followed");
            }
        }
        ClientStep::Forward
    }

    fn register(&mut self, name: String, query: String, types: Vec<u32>, batch: u64) {
        if let Some(old) = self.statements.remove(&name) {
            self.text_bytes -= old.query.len();
        }
        if self.text_bytes + query.len() > MAX_TEXT_BYTES {
            return; // not followed: its failures go to the client as they are
        }
        self.text_bytes += query.len();
        let s = Statement {
            query,
            client_types: types,
            params: None,
            shape: None,
            rewritten: false,
            bind_formats: proto::ParamFormats::default(),
            described_runs: 0,
            undescribed_run: false,
            results_per_column: false,
            batch,
        };
        self.statements.insert(name, s);
    }
}

mod answers;
mod recovery;
mod refresh;

#[cfg(test)]
mod tests;
