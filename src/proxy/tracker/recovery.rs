//! Recovering from a stale prepared statement: the probe, the re-prepare and the replay
//! (the steps in the parent module's documentation).

use ghostwire_proto::{self as proto, TransactionStatus};

use super::{Batch, Origin, Outcome, PROBE, Pending, TRIAL, Tracker, shape_of};
use crate::proxy::reshape::{self, Reshape};

/// A recovery in progress.
#[derive(Debug)]
pub(super) struct Recovery {
    pub(super) statement: String,
    /// The failed batch's messages.
    pub(super) batch: Vec<u8>,
    /// What the client would have got without a recovery.
    pub(super) given: Vec<u8>,
    /// The formats of the statement's parameters in the batch's Binds.
    pub(super) param_formats: proto::ParamFormats,
    /// The batch describes the statement or its portal, and its Binds do not name a result
    /// format per column: the client takes the new shape.
    pub(super) describes: bool,
    pub(super) parsed: Vec<String>,
    pub(super) probe_params: Option<Vec<u32>>,
    /// The probe's RowDescription body (empty: NoData).
    pub(super) probe_shape: Option<Vec<u8>>,
    pub(super) failed: bool,
    /// (text, types, rewritten) the statement was prepared again with.
    pub(super) plan: Option<(String, Vec<u32>, bool)>,
}

fn is_stale_plan(body: &[u8]) -> bool {
    let Ok(fields) = proto::error_fields(body) else { return false };
    let field = |c: u8| fields.iter().find(|(k, _)| *k == c).map(|(_, v)| *v);
    // SQLSTATE 0A000 is "feature not supported" in general; the routine says which.
    field(b'C') == Some("0A000") && field(b'R') == Some("RevalidateCachedQuery")
}

impl Tracker {
    pub(super) fn on_error(&mut self, msg: &[u8]) -> Outcome {
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
            if let Some(r) = self.refresh.as_mut() {
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
            && !b.ended_transaction
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
        let (describes, param_formats) = scan_batch(&bytes, &name);
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
            param_formats,
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

    /// The batch that prepares `text` again as `name` (the unnamed statement too), closing
    /// `also` first: a trial Parse under the proxy's name goes first, so a failure leaves
    /// the client's statement as it was. Its entries are queued; the bytes to send returned.
    pub(super) fn prepare_again(
        &mut self,
        origin: Origin,
        name: &str,
        text: &str,
        types: &[u32],
        also: &[String],
    ) -> Vec<u8> {
        let mut out = proto::parse_message(TRIAL, text, types);
        let mut entries = vec![Pending::Parse { name: TRIAL.into(), query: None, types: Vec::new() }];
        let named = (!name.is_empty()).then_some(name);
        for n in also.iter().map(String::as_str).chain(named) {
            out.extend(proto::close_message(true, n));
            entries.push(Pending::Close { statement: true, name: n.to_owned() });
        }
        out.extend(proto::parse_message(name, text, types));
        entries.push(Pending::Parse { name: name.to_owned(), query: None, types: Vec::new() });
        out.extend(proto::close_message(true, TRIAL));
        entries.push(Pending::Close { statement: true, name: TRIAL.into() });
        out.extend(proto::sync_message());
        entries.push(Pending::End);
        self.push_internal(origin, entries);
        out
    }

    pub(super) fn push_internal(&mut self, origin: Origin, entries: Vec<Pending>) {
        self.next_seq += 1;
        let mut b = Batch::new(origin, self.next_seq);
        b.bytes = None;
        b.closed = true;
        b.entries = entries.into_iter().map(|e| (e, true)).collect();
        self.batches.push_back(b);
    }
    fn give_up(&mut self, why: &str) -> Outcome {
        let Some(r) = self.recovery.take() else { return Outcome::default() };
        tracing::info!("prepared statement {:?}: passing the server's error on ({why})", r.statement);
        self.counts.passed_on += 1;
        let ready = r.given.len().checked_sub(6).and_then(|at| proto::ready_for_query(&r.given[at + 5..]).ok());
        Outcome { deliver: r.given, ready, resume: true, ..Outcome::default() }
    }

    pub(super) fn after_probe(&mut self) -> Outcome {
        let Some(r) = self.recovery.as_ref() else { return self.disable("a probe without a recovery") };
        if r.failed {
            return self.give_up("the statement cannot be prepared on the changed table");
        }
        let Some(s) = self.statements.get(&r.statement) else { return self.give_up("the statement is gone") };
        let Ok(new_shape) = shape_of(r.probe_shape.as_deref().unwrap_or_default()) else {
            return self.give_up("the server's description of the statement could not be read");
        };
        let text = if r.describes {
            Some((s.query.clone(), false))
        } else {
            let old = s.shape.as_deref().map(shape_of);
            match old.map(|o| {
                o.map_err(|e| e.to_string())
                    .and_then(|o| reshape::reshape(&s.query, &o, &new_shape).map_err(|e| e.to_string()))
            }) {
                Some(Ok(Reshape::Same)) => Some((s.query.clone(), false)),
                Some(Ok(Reshape::Rewrite(q))) => Some((q, true)),
                Some(Err(e)) => return self.give_up(&e),
                None => None,
            }
        };
        let Some((text, rewritten)) = text else {
            return self.give_up("the client never described its result");
        };
        // Parameters keep the types the client's values were encoded for.
        let Some(types) = s.types_again(r.probe_params.as_deref(), &r.param_formats) else {
            return self.give_up("the parameters' types were never described");
        };
        let name = r.statement.clone();
        let others: Vec<String> = r.parsed.iter().filter(|n| **n != name).cloned().collect();
        let out = self.prepare_again(Origin::Reprepare, &name, &text, &types, &others);
        if let Some(r) = self.recovery.as_mut() {
            r.plan = Some((text, types, rewritten));
        }
        Outcome { inject: out, ..Outcome::default() }
    }

    pub(super) fn after_reprepare(&mut self) -> Outcome {
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
        let batch = self.new_batch(Origin::Replay);
        self.batches.push_back(batch);
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

/// Whether the batch describes `statement` (or a portal bound to it) and none of its Binds
/// names a result format for each column (a client that does, pgx, built them from the shape
/// it was first told), and the formats of its parameters in the batch's Binds (if they
/// differ between them: all taken as binary).
fn scan_batch(bytes: &[u8], statement: &str) -> (bool, proto::ParamFormats) {
    let mut describes = false;
    let mut results_per_column = false;
    let mut formats: Option<proto::ParamFormats> = None;
    let mut portals: Vec<String> = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize + 1;
        let Some(m) = rest.get(..len) else { break };
        match m[0] {
            b'B' => {
                if let Ok(b) = proto::bind_body(&m[5..])
                    && b.statement == statement
                {
                    portals.push(b.portal.to_owned());
                    results_per_column |= b.result_formats.len() > 1;
                    let these = b.param_formats();
                    formats = Some(match formats {
                        Some(f) if f != these => proto::ParamFormats::all_binary(),
                        _ => these,
                    });
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
    (describes && !results_per_column, formats.unwrap_or_default())
}
