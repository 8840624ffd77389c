//! Checking a session's prepared statements after the proxy drained for a swap, before the
//! session starts anything: a statement whose result changed would fail with `cached plan
//! must not change result type`, and inside a transaction block that error cannot be
//! recovered from (the transaction is aborted). Outside one, the recovery replays the batch;
//! inside one, the client would see the error. So once the gate has closed since the
//! session last passed it, its first message waits while:
//!
//! 1. every named statement that returns rows is prepared under a name of the proxy's and
//!    described, all in one batch (a statement that no longer prepares is left as it is: it
//!    fails for the client as it would without the proxy);
//! 2. each one whose result differs from what the client was told is prepared again under
//!    its own name, rewritten to return that shape ([`crate::proxy::reshape`]), one batch
//!    each, a trial Parse first so a failure leaves the client's statement as it was; a
//!    rewrite whose table came back to the client's shape is prepared as written again;
//! 3. the client's message goes on.
//!
//! Statements that return no rows are not checked: their plans are revalidated silently.

use std::collections::VecDeque;

use ghostwire_proto as proto;

use super::{Origin, Outcome, PROBE, Pending, Tracker, shape_of};
use crate::proxy::reshape::{self, Reshape};

/// A check of the session's statements in progress.
#[derive(Debug, Default)]
pub(super) struct Refresh {
    /// Statements still to probe.
    queue: VecDeque<String>,
    /// The statements of the probe batch in flight, in order.
    probing: Vec<String>,
    /// Their descriptions as they come: parameters and the RowDescription body.
    pub(super) results: Vec<(Option<Vec<u32>>, Vec<u8>)>,
    /// An error answered the batch in flight.
    pub(super) failed: bool,
    /// (name, text, parameter types, rewritten) to prepare again.
    rewrites: VecDeque<(String, String, Vec<u32>, bool)>,
    /// The one being prepared again.
    current: Option<(String, Vec<u32>, bool)>,
}

fn probe_name(i: usize) -> String {
    format!("{PROBE}_{i}")
}

impl Tracker {
    /// The gate was passed with `drains` drains behind it: after a new one, the statements
    /// are checked before the session starts anything.
    pub fn passed_gate(&mut self, drains: u64) {
        if drains != self.drains {
            self.drains = drains;
            self.suspect = !self.statements.is_empty();
        }
    }

    /// Starts the check, when one is due and nothing is in flight: the probe batch to send
    /// before the client's message, which waits.
    pub(super) fn start_refresh(&mut self) -> Option<Vec<u8>> {
        let due = self.suspect
            && self.batches.is_empty()
            && self.recovery.is_none()
            && self.status == Some(proto::TransactionStatus::Idle);
        if !due {
            return None;
        }
        self.suspect = false;
        let mut queue: Vec<String> = self
            .statements
            .iter()
            .filter(|(name, s)| !name.is_empty() && s.shape.as_ref().is_some_and(|shape| !shape.is_empty()))
            .map(|(name, _)| name.clone())
            .collect();
        if queue.is_empty() {
            return None;
        }
        queue.sort();
        self.refresh = Some(Refresh { queue: queue.into(), ..Refresh::default() });
        self.next_probes()
    }

    /// The next probe batch (None: nothing left to probe).
    fn next_probes(&mut self) -> Option<Vec<u8>> {
        let r = self.refresh.as_mut()?;
        r.failed = false;
        r.results.clear();
        // Only statements still followed: the answers line up with `probing`.
        let statements = &self.statements;
        r.probing = r.queue.drain(..).filter(|n| statements.contains_key(n)).collect();
        let mut out = Vec::new();
        let mut entries = Vec::new();
        for (i, name) in r.probing.iter().enumerate() {
            let Some(s) = statements.get(name) else { continue };
            let types = s.params.clone().unwrap_or_else(|| s.client_types.clone());
            let probe = probe_name(i);
            out.extend(proto::parse_message(&probe, &s.query, &types));
            out.extend(proto::describe_message(true, &probe));
            out.extend(proto::close_message(true, &probe));
            entries.push(Pending::Parse { name: probe.clone(), query: None, types: Vec::new() });
            entries.push(Pending::DescribeStatement { name: probe.clone(), risky: false, params: None });
            entries.push(Pending::Close { statement: true, name: probe });
        }
        if out.is_empty() {
            return None;
        }
        out.extend(proto::sync_message());
        entries.push(Pending::End);
        self.push_internal(Origin::RefreshProbe, entries);
        Some(out)
    }

    /// The probe batch answered: what each statement returns now.
    pub(super) fn after_refresh_probe(&mut self) -> Outcome {
        let Some(mut r) = self.refresh.take() else { return self.disable("a probe without a check") };
        let probing = std::mem::take(&mut r.probing);
        let described = r.results.len();
        for (name, (params, shape)) in probing.iter().zip(r.results.drain(..)) {
            if let Some(plan) = self.rewrite_for(name, params, &shape) {
                r.rewrites.push_back(plan);
            }
        }
        if r.failed {
            // The statement after the last one described could not be prepared: left as it
            // is (it fails for the client as it would without the proxy). The server skipped
            // those after it: they are probed again.
            if let Some(name) = probing.get(described) {
                tracing::debug!("prepared statement {name:?} no longer prepares after the swap: left as it is");
            }
            r.queue.extend(probing.into_iter().skip(described + 1));
        }
        self.refresh = Some(r);
        self.refresh_step()
    }

    /// What `name` is prepared again as, given what its probe returns (None: as it is).
    fn rewrite_for(
        &self,
        name: &str,
        probed: Option<Vec<u32>>,
        shape: &[u8],
    ) -> Option<(String, String, Vec<u32>, bool)> {
        let s = self.statements.get(name)?;
        let old = shape_of(s.shape.as_deref()?).ok()?;
        let new = shape_of(shape).ok()?;
        let (text, rewritten) = match reshape::reshape(&s.query, &old, &new) {
            Ok(Reshape::Same) if s.rewritten => (s.query.clone(), false),
            Ok(Reshape::Same) => return None,
            // The client learns the new shape from the portal's description: as written.
            Ok(Reshape::Rewrite(_)) if s.takes_new_shape() => (s.query.clone(), false),
            Ok(Reshape::Rewrite(q)) => (q, true),
            Err(_) if s.takes_new_shape() => (s.query.clone(), false),
            Err(e) => {
                tracing::debug!("prepared statement {name:?} after the swap: {e}; left as it is");
                return None;
            }
        };
        // The client's values stay encoded for the types it was told; values sent as text
        // are read as whatever type the server infers now.
        let Some(types) = s.types_again(probed.as_deref(), &s.bind_formats) else {
            tracing::debug!("prepared statement {name:?}: its parameters' types were never described");
            return None;
        };
        Some((name.to_owned(), text, types, rewritten))
    }

    /// The next step of the check: more probes, the next statement to prepare again, or the
    /// end (the client's message goes on).
    fn refresh_step(&mut self) -> Outcome {
        if let Some(probes) = self.next_probes() {
            return Outcome { inject: probes, ..Outcome::default() };
        }
        let next = self.refresh.as_mut().and_then(|r| r.rewrites.pop_front());
        let Some((name, text, types, rewritten)) = next else {
            self.refresh = None;
            return Outcome { resume: true, ..Outcome::default() };
        };
        let out = self.prepare_again(Origin::RefreshReprepare, &name, &text, &types, &[]);
        if let Some(r) = self.refresh.as_mut() {
            r.failed = false;
            r.current = Some((name, types, rewritten));
        }
        Outcome { inject: out, ..Outcome::default() }
    }

    /// A statement prepared again (or not: a failed trial leaves it as it was).
    pub(super) fn after_refresh_reprepare(&mut self) -> Outcome {
        let Some(r) = self.refresh.as_mut() else { return self.disable("a re-prepare without a check") };
        let current = r.current.take();
        if let Some((name, types, rewritten)) = current.filter(|_| !r.failed) {
            if let Some(s) = self.statements.get_mut(&name) {
                s.params = Some(types);
                s.rewritten = rewritten;
            }
            self.counts.reprepared += 1;
            tracing::debug!("prepared statement {name:?} prepared again after the swap, before it was used");
        }
        self.refresh_step()
    }
}
