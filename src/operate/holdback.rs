//! Being held back by the throttle: since when and why, the total, and what each change of it
//! leaves behind (the state row, the live status, the operator's note, an event). Migrate and
//! backfill share it; each records the event through its own log.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::Client;

use super::live::Live;
use super::report::Reporter;
use super::throttle::Throttled;

/// Whether a run is held back now, and for how long it was in all.
#[derive(Default)]
pub struct Holdback {
    current: Option<Throttled>,
    total: Duration,
}

/// A change of what holds a run back.
#[derive(Debug, PartialEq)]
pub enum Turn {
    Started(String),
    Ended { reason: String, took: Duration },
}

impl Holdback {
    /// Held back for `reason` (time counted): a turn when that reason is new.
    pub fn hold(&mut self, reason: &str) -> Option<Turn> {
        if let Some(t) = self.current.as_mut()
            && t.reason() == reason
        {
            t.account();
            return None;
        }
        self.end();
        self.current = Some(Throttled::new(reason.to_owned()));
        Some(Turn::Started(reason.to_owned()))
    }

    /// Going on: a turn when the run was held back.
    pub fn release(&mut self) -> Option<Turn> {
        let reason = self.current.as_ref()?.reason().to_owned();
        let took = self.end();
        Some(Turn::Ended { reason, took })
    }

    fn end(&mut self) -> Duration {
        let Some(mut t) = self.current.take() else { return Duration::ZERO };
        t.account();
        let took = t.since();
        self.total += took;
        took
    }

    /// The time held back so far, the current hold included.
    pub fn total(&self) -> Duration {
        self.total + self.current.as_ref().map_or(Duration::ZERO, Throttled::since)
    }
}

impl Turn {
    /// The event that records it: kind, message, duration, details.
    pub fn event(&self) -> (&'static str, String, Option<Duration>, Option<Value>) {
        match self {
            Turn::Started(reason) => {
                ("throttle_start", format!("throttled: {reason}"), None, Some(json!({ "reason": reason })))
            }
            Turn::Ended { reason, took } => {
                ("throttle_end", format!("no longer throttled ({reason})"), Some(*took), None)
            }
        }
    }

    /// Shows it: the migration's state row (`status`), the live status (the control API),
    /// the operator's note.
    pub async fn show(&self, control: &Client, id: i64, live: &Live, reporter: &dyn Reporter) {
        match self {
            Turn::Started(reason) => {
                let _ = crate::state::set_throttled(control, id, Some(reason)).await;
                live.update(|p| p.throttled = Some(reason.clone()));
                reporter.note(&format!("throttled: {reason}"));
            }
            Turn::Ended { took, .. } => {
                let _ = crate::state::set_throttled(control, id, None).await;
                live.update(|p| p.throttled = None);
                reporter.note(&format!("no longer throttled after {:.1} s", took.as_secs_f64()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_starts_once_and_ends_with_its_time() {
        let mut h = Holdback::default();
        assert_eq!(h.release(), None, "not held back: nothing to record");
        assert_eq!(h.hold("replica lag"), Some(Turn::Started("replica lag".into())));
        assert_eq!(h.hold("replica lag"), None, "the same reason again");
        assert_eq!(h.hold("a pause"), Some(Turn::Started("a pause".into())), "a new reason");
        let Some(Turn::Ended { reason, took }) = h.release() else { panic!("held back") };
        assert_eq!(reason, "a pause");
        assert!(h.total() >= took && h.release().is_none());
        let (kind, message, _, details) = Turn::Started("x".into()).event();
        assert_eq!((kind, message.as_str(), details), ("throttle_start", "throttled: x", Some(json!({"reason": "x"}))));
    }
}
