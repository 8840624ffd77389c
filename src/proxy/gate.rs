//! The drain gate (DESIGN.md §3): open → draining → drained.
//!
//! A session is *busy* from the moment it forwards something while idle until the server
//! says it is idle again (ReadyForQuery 'I' with nothing outstanding); a session inside a
//! transaction stays busy. To start something, an idle session passes [`Gate::enter`],
//! which waits while the gate is closed: so while draining, busy sessions run on to the end
//! of their transaction and idle ones hold their client's next message. When no session is
//! busy the gate is drained. One mutex operation per transaction, none per message.
//!
//! A drain has a deadline for the whole operation: if the sessions do not all go idle in
//! time the gate reopens by itself and nobody sees an error; if the engine never calls
//! [`Gate::open`] after a drain, the gate reopens at the deadline too.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateState {
    Open,
    Draining,
    Drained,
}

#[derive(Debug)]
struct Inner {
    state: GateState,
    busy: usize,
    /// Sessions waiting in `enter`.
    held: usize,
    closed_at: Option<Instant>,
    deadline: Option<Instant>,
    /// Tells one drain from the next, so a stale deadline timer does nothing.
    generation: u64,
    /// Drains begun: a session that passes the gate after a new one checks its prepared
    /// statements first (the table may have changed while it waited).
    drains: u64,
}

/// What `/status` shows of the gate.
#[derive(Debug, Clone, Serialize)]
pub struct GateStatus {
    pub state: GateState,
    pub busy_sessions: usize,
    pub held_sessions: usize,
    /// How long the gate has been closed, if it is.
    pub closed_ms: Option<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DrainError {
    #[error("the gate is already {0:?}")]
    NotOpen(GateState),
    #[error("{busy} session(s) were still inside a transaction at the deadline; the gate reopened")]
    Deadline { busy: usize },
}

#[derive(Debug)]
pub struct Gate {
    inner: Mutex<Inner>,
    opened: Notify,
    went_idle: Notify,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            inner: Mutex::new(Inner {
                state: GateState::Open,
                busy: 0,
                held: 0,
                closed_at: None,
                deadline: None,
                generation: 0,
                drains: 0,
            }),
            opened: Notify::new(),
            went_idle: Notify::new(),
        }
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; recover the data if something ever does.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fast path of [`Gate::enter`]: the drains begun so far (and the session counts as
    /// busy) when the gate is open now; None when it is not (nothing changed: call `enter`
    /// to wait).
    pub fn try_enter(&self) -> Option<u64> {
        let mut g = self.lock();
        if g.state == GateState::Open {
            g.busy += 1;
            return Some(g.drains);
        }
        None
    }

    /// An idle session wants to start something: returns once the gate lets it, with how
    /// long it was held (zero when the gate was open) and the drains begun so far. The
    /// session counts as busy from then on.
    pub async fn enter(&self) -> (Duration, u64) {
        // Counts the session as held from when it first finds the gate closed until it gets
        // through or gives up (the future dropped: its session ended).
        struct Held<'a> {
            gate: &'a Gate,
            since: Option<Instant>,
        }
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                if self.since.is_some() {
                    self.gate.lock().held -= 1;
                }
            }
        }
        let mut held = Held { gate: self, since: None };
        loop {
            let opened = self.opened.notified();
            {
                let mut g = self.lock();
                if g.state == GateState::Open {
                    g.busy += 1;
                    let drains = g.drains;
                    drop(g);
                    return (held.since.map(|s| s.elapsed()).unwrap_or(Duration::ZERO), drains);
                }
                if held.since.is_none() {
                    g.held += 1;
                    held.since = Some(Instant::now());
                }
            }
            opened.await;
        }
    }

    /// A busy session is idle again (or gone).
    pub fn leave(&self) {
        let mut g = self.lock();
        g.busy = g.busy.saturating_sub(1);
        if g.busy == 0 && g.state == GateState::Draining {
            self.went_idle.notify_waiters();
        }
    }

    /// Closes the gate and waits until no session is busy, or until `deadline` passes (then
    /// the gate reopens). Once drained, the gate reopens by itself at the deadline unless
    /// [`Gate::open`] comes first. Returns how long draining took.
    pub async fn drain(self: &Arc<Self>, deadline: Duration) -> Result<Duration, DrainError> {
        let started = Instant::now();
        let until = started + deadline;
        let generation = {
            let mut g = self.lock();
            if g.state != GateState::Open {
                return Err(DrainError::NotOpen(g.state));
            }
            g.state = GateState::Draining;
            g.closed_at = Some(started);
            g.deadline = Some(until);
            g.generation += 1;
            g.drains += 1;
            g.generation
        };
        loop {
            let idle = self.went_idle.notified();
            {
                let mut g = self.lock();
                if g.generation != generation || g.state != GateState::Draining {
                    return Err(DrainError::NotOpen(g.state));
                }
                if g.busy == 0 {
                    g.state = GateState::Drained;
                    drop(g);
                    let gate = Arc::clone(self);
                    tokio::spawn(async move {
                        tokio::time::sleep_until(until).await;
                        gate.reopen_if(generation, GateState::Drained);
                    });
                    return Ok(started.elapsed());
                }
            }
            tokio::select! {
                _ = idle => {}
                _ = tokio::time::sleep_until(until) => {
                    let busy = self.lock().busy;
                    if self.reopen_if(generation, GateState::Draining) {
                        return Err(DrainError::Deadline { busy });
                    }
                }
            }
        }
    }

    fn reopen_if(&self, generation: u64, state: GateState) -> bool {
        let mut g = self.lock();
        if g.generation == generation && g.state == state {
            g.state = GateState::Open;
            g.closed_at = None;
            g.deadline = None;
            self.opened.notify_waiters();
            return true;
        }
        false
    }

    /// Opens the gate; returns how long it was closed (None if it was open).
    pub fn open(&self) -> Option<Duration> {
        let mut g = self.lock();
        let closed = g.closed_at.take().map(|t| t.elapsed());
        g.state = GateState::Open;
        g.deadline = None;
        g.generation += 1;
        self.opened.notify_waiters();
        closed
    }

    pub fn status(&self) -> GateStatus {
        let g = self.lock();
        GateStatus {
            state: g.state,
            busy_sessions: g.busy,
            held_sessions: g.held,
            closed_ms: g.closed_at.map(|t| t.elapsed().as_secs_f64() * 1000.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_when_busy_sessions_go_idle_and_holds_new_work() {
        let gate = Arc::new(Gate::default());
        gate.enter().await; // one session in a transaction
        let g = Arc::clone(&gate);
        let drain = tokio::spawn(async move { g.drain(Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        assert_eq!(gate.status().state, GateState::Draining);
        // An idle session wanting to start is held.
        let g = Arc::clone(&gate);
        let held = tokio::spawn(async move { g.enter().await });
        while gate.status().held_sessions == 0 {
            tokio::task::yield_now().await;
        }
        gate.leave(); // the transaction ends
        assert!(drain.await.unwrap().is_ok());
        assert_eq!(gate.status().state, GateState::Drained);
        assert!(!held.is_finished());
        assert!(gate.open().is_some());
        held.await.unwrap();
        assert_eq!(gate.status().busy_sessions, 1);
        assert_eq!(gate.status().held_sessions, 0);
    }

    #[tokio::test]
    async fn a_held_session_that_goes_away_is_no_longer_counted() {
        let gate = Arc::new(Gate::default());
        gate.drain(Duration::from_secs(10)).await.unwrap();
        let g = Arc::clone(&gate);
        let held = tokio::spawn(async move { g.enter().await });
        while gate.status().held_sessions == 0 {
            tokio::task::yield_now().await;
        }
        held.abort(); // the client disconnected while held
        assert!(held.await.unwrap_err().is_cancelled());
        assert_eq!(gate.status().held_sessions, 0);
        assert_eq!(gate.status().busy_sessions, 0);
        // Straight through an open gate: busy, never held.
        assert!(gate.open().is_some());
        assert_eq!(gate.enter().await, (Duration::ZERO, 1));
        assert_eq!(gate.try_enter(), Some(1));
        assert_eq!(gate.status().busy_sessions, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_deadline_reopens_the_gate() {
        let gate = Arc::new(Gate::default());
        gate.enter().await; // never ends
        let err = gate.drain(Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(err, DrainError::Deadline { busy: 1 });
        assert_eq!(gate.status().state, GateState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_gate_without_its_engine_reopens_at_the_deadline() {
        let gate = Arc::new(Gate::default());
        gate.drain(Duration::from_millis(500)).await.unwrap();
        assert_eq!(gate.status().state, GateState::Drained);
        let g = Arc::clone(&gate);
        let held = tokio::spawn(async move { g.enter().await });
        tokio::time::sleep(Duration::from_millis(499)).await;
        assert!(!held.is_finished());
        assert_eq!(gate.status().state, GateState::Drained);
        let (waited, drains) = held.await.unwrap();
        assert_eq!(drains, 1);
        assert!(waited >= Duration::from_millis(499), "{waited:?}");
        assert_eq!(gate.status().state, GateState::Open);
        // A second drain is independent of the first one's timer.
        gate.leave();
        assert!(gate.drain(Duration::from_secs(5)).await.is_ok());
        assert!(matches!(gate.drain(Duration::from_secs(1)).await, Err(DrainError::NotOpen(GateState::Drained))));
    }
}
