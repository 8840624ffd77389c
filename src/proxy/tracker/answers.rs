//! The server's answers, matched against what each batch waits for: passed on, held back
//! or kept (the proxy's own).

use ghostwire_proto::{self as proto, TransactionStatus};

use super::{MAX_HELD_BYTES, Origin, Outcome, Pending, Tracker};

impl Tracker {
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
            b'C' | b'I' | b's' => self.completed(tag, body).map(|()| false),
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
    pub(super) fn pass(&mut self, msg: &[u8]) -> Outcome {
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
        // Kept as the server sent it (empty: NoData), read only for a recovery: most
        // descriptions are the same as the last one, and cost a comparison.
        let shape: &[u8] = if tag == b'T' { body } else { &[] };
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
                        r.probe_shape = Some(shape.to_vec());
                    }
                } else if origin == Origin::RefreshProbe {
                    if let Some(r) = self.refresh.as_mut() {
                        r.results.push((params, shape.to_vec()));
                    }
                } else if !internal && let Some(s) = self.statements.get_mut(&name) {
                    s.params = params.or(s.params.take());
                    if s.shape.as_deref() != Some(shape) {
                        s.shape = Some(shape.to_vec());
                    }
                    s.rewritten = false;
                }
            }
            Pending::DescribePortal { portal } => {
                if let Some(s) = self.portals.get(&portal).and_then(|n| self.statements.get_mut(n)) {
                    if !s.rewritten && s.shape.as_deref() != Some(shape) {
                        s.shape = Some(shape.to_vec());
                    }
                }
            }
            other => return Err(format!("a row description for {other:?}")),
        }
        Ok(internal)
    }

    /// DataRow, the COPY messages and FunctionCallResponse: inside the front entry.
    fn inside(&mut self, tag: u8) -> Result<(), String> {
        let b = self.batches.front_mut().ok_or("no batch")?;
        match b.entries.front_mut() {
            Some((Pending::Execute { portal, reshaped }, _)) => {
                let (portals, statements) = (&self.portals, &self.statements);
                let reshaped = *reshaped.get_or_insert_with(|| {
                    portals.get(portal).and_then(|n| statements.get(n)).is_some_and(|s| s.rewritten)
                });
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
    fn completed(&mut self, tag: u8, body: &[u8]) -> Result<(), String> {
        let b = self.batches.front_mut().ok_or("no batch")?;
        // COMMIT (also END's tag), ROLLBACK, PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED.
        let command = body.split(|&c| c == b' ' || c == 0).next().unwrap_or_default();
        if tag == b'C' && matches!(command, b"COMMIT" | b"ROLLBACK" | b"PREPARE") {
            b.ended_transaction = true;
        }
        match b.entries.front() {
            Some((Pending::Execute { .. }, _)) => {
                b.entries.pop_front();
                Ok(())
            }
            Some((Pending::End, _)) => Ok(()), // a statement of a simple query
            other => Err(format!("a command completion for {other:?}")),
        }
    }

    fn on_ready(&mut self, msg: &[u8]) -> Outcome {
        let status = proto::ready_for_query(&msg[5..]).ok();
        let Some(mut b) = self.batches.pop_front() else { return self.disable("a ReadyForQuery nothing waits for") };
        if !matches!(b.entries.pop_front(), Some((Pending::End, _))) || !b.entries.is_empty() {
            return self.disable("a ReadyForQuery before the end of its batch");
        }
        self.status = status;
        let out = match b.origin {
            Origin::Probe => self.after_probe(),
            Origin::Reprepare => self.after_reprepare(),
            Origin::RefreshProbe => self.after_refresh_probe(),
            Origin::RefreshReprepare => self.after_refresh_reprepare(),
            _ if b.recovering => {
                if let Some(r) = self.recovery.as_mut() {
                    r.given.extend(msg);
                    // The error left a transaction block open (the batch began one): nothing
                    // can be replayed in it.
                    r.failed |= status != Some(TransactionStatus::Idle);
                }
                Outcome::default()
            }
            _ => {
                b.risky = 0;
                let deliver = std::mem::take(&mut b.held);
                Outcome { forward: true, deliver, ready: status, ..Outcome::default() }
            }
        };
        self.recycle(b);
        out
    }
}
