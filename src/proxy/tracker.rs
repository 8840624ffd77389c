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

use ghostwire_proto::{self as proto, Field, TransactionStatus};

use super::reshape::{self, Reshape};

/// The longest client batch kept for a replay.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Answers held back at most (then they are passed on, and the batch cannot be replayed).
const MAX_HELD_BYTES: usize = 1024 * 1024;
/// Statement texts kept per session.
const MAX_TEXT_BYTES: usize = 8 * 1024 * 1024;
/// Names the proxy prepares under.
const PROBE: &str = "ghostwire_probe";
const TRIAL: &str = "ghostwire_trial";

/// A named (or the unnamed) statement the client prepared.
#[derive(Debug, Clone)]
struct Statement {
    query: String,
    /// As the client gave them (0: inferred).
    client_types: Vec<u32>,
    /// As the server inferred them (ParameterDescription), once described.
    params: Option<Vec<u32>>,
    /// The result the client was last told (empty: no rows), once described.
    shape: Option<Vec<Field>>,
    /// Prepared as a rewrite that returns `shape` from a table that changed.
    rewritten: bool,
    /// The batch it was prepared in.
    batch: u64,
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
}

#[derive(Debug)]
struct Batch {
    origin: Origin,
    seq: u64,
    entries: VecDeque<(Pending, bool)>,
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
        }
    }

    fn internal(&self) -> bool {
        matches!(self.origin, Origin::Probe | Origin::Reprepare)
    }
}

/// A recovery in progress.
#[derive(Debug)]
struct Recovery {
    statement: String,
    /// The failed batch's messages.
    batch: Vec<u8>,
    /// What the client would have got without a recovery.
    given: Vec<u8>,
    params_all_text: bool,
    /// The batch describes the statement or its portal: the client learns the new shape.
    describes: bool,
    parsed: Vec<String>,
    probe_params: Option<Vec<u32>>,
    probe_shape: Option<Vec<Field>>,
    failed: bool,
    /// (text, types, rewritten) the statement was prepared again with.
    plan: Option<(String, Vec<u32>, bool)>,
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
    statements: HashMap<String, Statement>,
    text_bytes: usize,
    /// Portal → statement.
    portals: HashMap<String, String>,
    batches: VecDeque<Batch>,
    next_seq: u64,
    /// The transaction status of the last ReadyForQuery.
    status: Option<TransactionStatus>,
    recovery: Option<Recovery>,
    disabled: bool,
    pub counts: Counts,
}

fn is_stale_plan(body: &[u8]) -> bool {
    let Ok(fields) = proto::error_fields(body) else { return false };
    let field = |c: u8| fields.iter().find(|(k, _)| *k == c).map(|(_, v)| *v);
    // SQLSTATE 0A000 is "feature not supported" in general; the routine says which.
    field(b'C') == Some("0A000") && field(b'R') == Some("RevalidateCachedQuery")
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(tag);
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    pub fn disabled(&self) -> bool {
        self.disabled
    }

    /// A recovery is under way: the client's messages wait.
    pub fn recovering(&self) -> bool {
        self.recovery.is_some()
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
        out
    }

    fn current_client_batch(&mut self) -> &mut Batch {
        let open = self.batches.back().is_some_and(|b| !b.closed && b.origin == Origin::Client);
        if !open {
            self.next_seq += 1;
            self.batches.push_back(Batch::new(Origin::Client, self.next_seq));
        }
        self.batches.back_mut().expect("just pushed")
    }

    /// A whole client message (`msg`: tag, length and body), before it is sent.
    pub fn on_client(&mut self, msg: &[u8]) -> ClientStep {
        if self.disabled || msg.len() < 5 {
            return ClientStep::Forward;
        }
        if self.recovery.is_some() {
            return ClientStep::Wait;
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
        let risky =
            |name: &str, statements: &HashMap<String, Statement>| statements.get(name).is_some_and(|s| s.batch < seq);
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
                let (portal, statement) = proto::bind_names(body).map_err(bad)?;
                Pending::Bind { portal: portal.to_owned(), statement: statement.to_owned(), risky: false }
            }
            b'D' => {
                let t = proto::target_body(body).map_err(bad)?;
                if !t.statement {
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
            b'E' => Pending::Execute { portal: proto::execute_portal(body).map_err(bad)?.to_owned() },
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
        if self.recovery.is_some() {
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
        let s = Statement { query, client_types: types, params: None, shape: None, rewritten: false, batch };
        self.statements.insert(name, s);
    }

    /// A whole server message (`msg`: tag, length and body).
    pub fn on_server(&mut self, msg: &[u8]) -> Outcome {
        if self.disabled || msg.len() < 5 {
            return Outcome { forward: true, ready: self.ready_of(msg), ..Outcome::default() };
        }
        let (tag, body) = (msg[0], &msg[5..]);
        if matches!(tag, b'S' | b'A') {
            return Outcome { forward: true, ..Outcome::default() }; // asynchronous: always passed on
        }
        let Some(batch) = self.batches.front() else {
            return self.disable(&format!("a server message {:?} nothing waits for", tag as char));
        };
        if tag == b'N' {
            return self.pass(msg);
        }
        if tag == b'Z' {
            return self.on_ready(msg);
        }
        if batch.failed {
            return self.pass(msg); // after an error the server only sends ReadyForQuery
        }
        let result = match tag {
            b'E' => return self.on_error(msg),
            b'1' => self.answer(|p| matches!(p, Pending::Parse { .. })),
            b'2' => self.answer(|p| matches!(p, Pending::Bind { .. })),
            b'3' => self.answer(|p| matches!(p, Pending::Close { .. })),
            b't' => self.parameters(body).map(|()| false),
            b'T' | b'n' => self.described(tag, body),
            b'D' | b'G' | b'H' | b'W' | b'd' | b'c' | b'V' => self.inside(tag).map(|()| false),
            b'C' | b'I' | b's' => self.completed().map(|()| false),
            _ => Err(format!("unexpected server message {:?}", tag as char)),
        };
        match result {
            Ok(true) => Outcome::default(), // the answer to the proxy's own message
            Ok(false) => self.pass(msg),
            Err(why) => self.disable(&why),
        }
    }

    /// The start of a server message too long to hold: passed on (a held batch is let go).
    pub fn on_server_large(&mut self, tag: u8) -> Outcome {
        if self.disabled {
            return Outcome { forward: true, ..Outcome::default() };
        }
        if !matches!(tag, b'D' | b'd' | b'E' | b'N') {
            return self.disable("a long server message that cannot be followed");
        }
        if tag == b'D' {
            let _ = self.inside(b'D');
        }
        let mut out = Outcome { forward: true, ..Outcome::default() };
        if let Some(b) = self.batches.front_mut() {
            out.deliver = std::mem::take(&mut b.held);
            b.forwarded = true;
            b.risky = 0;
        }
        out
    }

    fn ready_of(&self, msg: &[u8]) -> Option<TransactionStatus> {
        (msg.first() == Some(&b'Z')).then(|| proto::ready_for_query(&msg[5..]).ok()).flatten()
    }

    /// Passes `msg` on, holds it, or drops it, as the front batch is.
    fn pass(&mut self, msg: &[u8]) -> Outcome {
        let Some(b) = self.batches.front_mut() else { return Outcome { forward: true, ..Outcome::default() } };
        if b.internal() {
            return Outcome::default();
        }
        if b.recovering {
            if let Some(r) = self.recovery.as_mut() {
                r.given.extend(msg);
            }
            return Outcome::default();
        }
        if b.risky > 0 && b.held.len() + msg.len() <= MAX_HELD_BYTES {
            b.held.extend(msg);
            return Outcome::default();
        }
        b.forwarded = true;
        b.risky = 0;
        Outcome { forward: true, deliver: std::mem::take(&mut b.held), ..Outcome::default() }
    }

    /// The front entry, which `matches` must accept; popped. Ok(true): it was the proxy's
    /// own (its answer is not the client's).
    fn answer(&mut self, matches: impl Fn(&Pending) -> bool) -> Result<bool, String> {
        let b = self.batches.front_mut().ok_or("no batch")?;
        let (entry, internal) = b.entries.pop_front().ok_or("no entry")?;
        if !matches(&entry) {
            return Err(format!("an answer out of order for {entry:?}"));
        }
        let (origin, seq) = (b.origin, b.seq);
        match entry {
            Pending::Parse { name, query, types }
                if !internal && origin != Origin::Probe && origin != Origin::Reprepare =>
            {
                if !name.is_empty() {
                    b.parsed.push(name.clone());
                }
                match query {
                    Some(query) => self.register(name, query, types, seq),
                    None => {
                        if let Some(s) = self.statements.remove(&name) {
                            self.text_bytes -= s.query.len();
                        }
                    }
                }
            }
            Pending::Bind { portal, statement, risky } => {
                if risky {
                    b.risky = b.risky.saturating_sub(1);
                }
                self.portals.insert(portal, statement);
            }
            Pending::Close { statement: true, name } if !internal && !b.internal() => {
                if let Some(s) = self.statements.remove(&name) {
                    self.text_bytes -= s.query.len();
                }
            }
            Pending::Close { statement: false, name } => {
                self.portals.remove(&name);
            }
            _ => {}
        }
        Ok(internal)
    }

    fn parameters(&mut self, body: &[u8]) -> Result<(), String> {
        let params = proto::parameter_description(body).map_err(|e| e.to_string())?;
        let b = self.batches.front_mut().ok_or("no batch")?;
        match b.entries.front_mut() {
            Some((Pending::DescribeStatement { params: p, .. }, _)) => {
                *p = Some(params);
                Ok(())
            }
            other => Err(format!("ParameterDescription for {other:?}")),
        }
    }

    fn described(&mut self, tag: u8, body: &[u8]) -> Result<bool, String> {
        let shape = if tag == b'T' { proto::row_description(body).map_err(|e| e.to_string())? } else { Vec::new() };
        let b = self.batches.front_mut().ok_or("no batch")?;
        let origin = b.origin;
        match b.entries.front() {
            // A simple query's own row descriptions.
            Some((Pending::End, _)) if tag == b'T' => return Ok(false),
            Some((Pending::Execute { .. }, _)) if tag == b'T' => return Ok(false),
            _ => {}
        }
        let (entry, internal) = b.entries.pop_front().ok_or("no entry")?;
        match entry {
            Pending::DescribeStatement { name, risky, params } => {
                if risky {
                    b.risky = b.risky.saturating_sub(1);
                }
                if origin == Origin::Probe {
                    if let Some(r) = self.recovery.as_mut() {
                        r.probe_params = params;
                        r.probe_shape = Some(shape);
                    }
                } else if !internal && let Some(s) = self.statements.get_mut(&name) {
                    s.params = params.or(s.params.take());
                    s.shape = Some(shape);
                    s.rewritten = false;
                }
            }
            Pending::DescribePortal { portal } => {
                if let Some(s) = self.portals.get(&portal).and_then(|n| self.statements.get_mut(n)) {
                    if !s.rewritten {
                        s.shape = Some(shape);
                    }
                }
            }
            other => return Err(format!("a row description for {other:?}")),
        }
        Ok(internal)
    }

    /// DataRow, the COPY messages and FunctionCallResponse: inside the front entry.
    fn inside(&mut self, tag: u8) -> Result<(), String> {
        let b = self.batches.front().ok_or("no batch")?;
        match b.entries.front() {
            Some((Pending::Execute { portal }, _)) => {
                let reshaped =
                    self.portals.get(portal).and_then(|n| self.statements.get(n)).is_some_and(|s| s.rewritten);
                if tag == b'D' && reshaped {
                    self.counts.reshaped_rows += 1;
                }
                Ok(())
            }
            Some((Pending::End, _)) => Ok(()), // a simple query or a function call
            other => Err(format!("{:?} for {other:?}", tag as char)),
        }
    }

    /// CommandComplete, EmptyQueryResponse, PortalSuspended.
    fn completed(&mut self) -> Result<(), String> {
        let b = self.batches.front_mut().ok_or("no batch")?;
        match b.entries.front() {
            Some((Pending::Execute { .. }, _)) => {
                b.entries.pop_front();
                Ok(())
            }
            Some((Pending::End, _)) => Ok(()), // a statement of a simple query
            other => Err(format!("a command completion for {other:?}")),
        }
    }

    fn on_error(&mut self, msg: &[u8]) -> Outcome {
        let Some(b) = self.batches.front_mut() else { return self.disable("an error nothing waits for") };
        let failed_entry = b.entries.front().map(|(e, _)| e.clone());
        // The server skips the rest of the batch.
        while b.entries.front().is_some_and(|(e, _)| !matches!(e, Pending::End)) {
            b.entries.pop_front();
        }
        b.failed = true;
        let statement = match &failed_entry {
            Some(Pending::Bind { statement, risky: true, .. }) => Some(statement.clone()),
            Some(Pending::DescribeStatement { name, risky: true, .. }) => Some(name.clone()),
            _ => None,
        };
        // A rewrite whose table changed again fails its own way (the columns its text names
        // are not there): recovered from like a stale plan, from the client's text.
        let rewritten = statement.as_ref().and_then(|n| self.statements.get(n)).is_some_and(|s| s.rewritten);
        let stale = is_stale_plan(&msg[5..]) || rewritten;
        let Some(b) = self.batches.front_mut() else { return self.disable("no batch") };
        if b.internal() {
            if let Some(r) = self.recovery.as_mut() {
                r.failed = true;
            }
            return Outcome::default();
        }
        if !stale {
            b.risky = 0; // nothing but ReadyForQuery follows an error: let it all go
            return self.pass(msg);
        }
        let replayable = b.origin == Origin::Client
            && b.closed
            && !b.forwarded
            && b.bytes.is_some()
            && self.batches.len() == 1
            && self.status == Some(TransactionStatus::Idle);
        let Some(name) = statement.filter(|n| replayable && self.statements.contains_key(n)) else {
            self.counts.passed_on += 1;
            if let Some(b) = self.batches.front_mut() {
                b.risky = 0;
            }
            return self.pass(msg);
        };
        let b = self.batches.front_mut().expect("checked above");
        let bytes = b.bytes.clone().unwrap_or_default();
        let (describes, params_all_text) = scan_batch(&bytes, &name);
        let mut given = std::mem::take(&mut b.held);
        given.extend(msg);
        b.recovering = true;
        let parsed = std::mem::take(&mut b.parsed);
        let s = &self.statements[&name];
        let types = s.params.clone().unwrap_or_else(|| s.client_types.clone());
        let query = s.query.clone();
        self.recovery = Some(Recovery {
            statement: name,
            batch: bytes,
            given,
            params_all_text,
            describes,
            parsed,
            probe_params: None,
            probe_shape: None,
            failed: false,
            plan: None,
        });
        // The probe goes out now: the server reaches it once it has skipped to the Sync.
        let mut probe = proto::parse_message(PROBE, &query, &types);
        probe.extend(proto::describe_message(true, PROBE));
        probe.extend(proto::close_message(true, PROBE));
        probe.extend(proto::sync_message());
        self.push_internal(
            Origin::Probe,
            vec![
                Pending::Parse { name: PROBE.into(), query: None, types: Vec::new() },
                Pending::DescribeStatement { name: PROBE.into(), risky: false, params: None },
                Pending::Close { statement: true, name: PROBE.into() },
                Pending::End,
            ],
        );
        Outcome { inject: probe, ..Outcome::default() }
    }

    fn push_internal(&mut self, origin: Origin, entries: Vec<Pending>) {
        self.next_seq += 1;
        let mut b = Batch::new(origin, self.next_seq);
        b.bytes = None;
        b.closed = true;
        b.entries = entries.into_iter().map(|e| (e, true)).collect();
        self.batches.push_back(b);
    }

    fn on_ready(&mut self, msg: &[u8]) -> Outcome {
        let status = proto::ready_for_query(&msg[5..]).ok();
        let Some(mut b) = self.batches.pop_front() else { return self.disable("a ReadyForQuery nothing waits for") };
        if !matches!(b.entries.pop_front(), Some((Pending::End, _))) || !b.entries.is_empty() {
            return self.disable("a ReadyForQuery before the end of its batch");
        }
        self.status = status;
        match b.origin {
            Origin::Probe => self.after_probe(),
            Origin::Reprepare => self.after_reprepare(),
            _ if b.recovering => {
                if let Some(r) = self.recovery.as_mut() {
                    r.given.extend(msg);
                }
                Outcome::default()
            }
            _ => {
                b.risky = 0;
                let deliver = std::mem::take(&mut b.held);
                Outcome { forward: true, deliver, ready: status, ..Outcome::default() }
            }
        }
    }

    /// Gives the client what it would have got, and ends the recovery.
    fn give_up(&mut self, why: &str) -> Outcome {
        let Some(r) = self.recovery.take() else { return Outcome::default() };
        tracing::info!("prepared statement {:?}: passing the server's error on ({why})", r.statement);
        self.counts.passed_on += 1;
        let ready = r.given.len().checked_sub(6).and_then(|at| proto::ready_for_query(&r.given[at + 5..]).ok());
        Outcome { deliver: r.given, ready, resume: true, ..Outcome::default() }
    }

    fn after_probe(&mut self) -> Outcome {
        let Some(r) = self.recovery.as_ref() else { return self.disable("a probe without a recovery") };
        if r.failed {
            return self.give_up("the statement cannot be prepared on the changed table");
        }
        let Some(s) = self.statements.get(&r.statement) else { return self.give_up("the statement is gone") };
        let new_shape = r.probe_shape.clone().unwrap_or_default();
        let text = if r.describes {
            Some((s.query.clone(), false))
        } else {
            match s.shape.as_ref().map(|old| reshape::reshape(&s.query, old, &new_shape)) {
                Some(Ok(Reshape::Same)) => Some((s.query.clone(), false)),
                Some(Ok(Reshape::Rewrite(q))) => Some((q, true)),
                Some(Err(e)) => return self.give_up(&e.to_string()),
                None => None,
            }
        };
        let Some((text, rewritten)) = text else {
            return self.give_up("the client never described its result");
        };
        // Parameters keep the types the client's values were encoded for.
        let types = match (&s.params, s.client_types.iter().all(|&t| t != 0), r.params_all_text) {
            (Some(p), _, _) => p.clone(),
            (None, true, _) => s.client_types.clone(),
            (None, false, true) => r.probe_params.clone().unwrap_or_default(),
            (None, false, false) => return self.give_up("the parameters' types were never described"),
        };
        let name = r.statement.clone();
        let parsed = r.parsed.clone();
        let mut out = proto::parse_message(TRIAL, &text, &types);
        let mut entries = vec![Pending::Parse { name: TRIAL.into(), query: None, types: Vec::new() }];
        for n in parsed.iter().filter(|n| **n != name) {
            out.extend(proto::close_message(true, n));
            entries.push(Pending::Close { statement: true, name: n.clone() });
        }
        if !name.is_empty() {
            out.extend(proto::close_message(true, &name));
            entries.push(Pending::Close { statement: true, name: name.clone() });
        }
        out.extend(proto::parse_message(&name, &text, &types));
        entries.push(Pending::Parse { name: name.clone(), query: None, types: Vec::new() });
        out.extend(proto::close_message(true, TRIAL));
        entries.push(Pending::Close { statement: true, name: TRIAL.into() });
        out.extend(proto::sync_message());
        entries.push(Pending::End);
        self.push_internal(Origin::Reprepare, entries);
        if let Some(r) = self.recovery.as_mut() {
            r.plan = Some((text, types, rewritten));
        }
        Outcome { inject: out, ..Outcome::default() }
    }

    fn after_reprepare(&mut self) -> Outcome {
        let Some(r) = self.recovery.as_ref() else { return self.disable("a re-prepare without a recovery") };
        if r.failed {
            return self.give_up("the statement could not be prepared again");
        }
        let Some(r) = self.recovery.take() else { return Outcome::default() };
        for n in &r.parsed {
            if let Some(s) = self.statements.remove(n) {
                self.text_bytes -= s.query.len();
            }
        }
        if let (Some(s), Some((_, types, rewritten))) = (self.statements.get_mut(&r.statement), &r.plan) {
            s.params = Some(types.clone());
            s.rewritten = *rewritten;
            if !*rewritten {
                s.shape = r.probe_shape.clone();
            }
        }
        self.counts.reprepared += 1;
        self.counts.replayed += 1;
        tracing::debug!("prepared statement {:?} prepared again; replaying the batch", r.statement);
        // The replay: the client's batch, its answers the client's.
        self.next_seq += 1;
        self.batches.push_back(Batch::new(Origin::Replay, self.next_seq));
        let mut rest: &[u8] = &r.batch;
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize + 1;
            let Some(m) = rest.get(..len) else { break };
            let mut prefix = Vec::new();
            match self.client_entry(m[0], &m[5..], &mut prefix) {
                Ok(Some(e)) => self.push_replay_entry(e),
                Ok(None) => {}
                Err(why) => return self.disable(&why),
            }
            rest = &rest[len..];
        }
        Outcome { inject: r.batch, resume: true, ..Outcome::default() }
    }

    fn push_replay_entry(&mut self, entry: Pending) {
        let Some(b) = self.batches.back_mut() else { return };
        let end = matches!(entry, Pending::End);
        b.entries.push_back((entry, false));
        b.closed |= end;
    }
}

/// Whether the batch describes `statement` (or a portal bound to it), and whether all its
/// Bind messages send their parameters as text.
fn scan_batch(bytes: &[u8], statement: &str) -> (bool, bool) {
    let (mut describes, mut all_text) = (false, true);
    let mut portals: Vec<String> = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize + 1;
        let Some(m) = rest.get(..len) else { break };
        match m[0] {
            b'B' => {
                if let Ok(b) = proto::bind_body(&m[5..]) {
                    all_text &= b.params_all_text();
                    if b.statement == statement {
                        portals.push(b.portal.to_owned());
                    }
                }
            }
            b'D' => {
                if let Ok(t) = proto::target_body(&m[5..]) {
                    describes |= if t.statement { t.name == statement } else { portals.iter().any(|p| p == t.name) };
                }
            }
            _ => {}
        }
        rest = &rest[len..];
    }
    (describes, all_text)
}

/// A whole message, for tests and for the session's synthesized answers.
pub fn whole(tag: u8, body: &[u8]) -> Vec<u8> {
    message(tag, body)
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
