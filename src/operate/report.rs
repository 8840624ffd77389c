//! Where a run reports what it does (the CLI prints; tests stay quiet).

use crate::state::Phase;

/// What a run tells its operator as it goes: the command prints it (a progress bar, lines,
/// or JSON lines), tests say nothing.
pub trait Reporter: Send + Sync {
    fn phase(&self, _phase: Phase, _message: &str) {}
    fn progress(&self, _phase: Phase, _done: i64, _total: i64, _rows_per_second: f64) {}
    fn note(&self, _message: &str) {}
    /// The run is over: leave the output ready for what the command prints next.
    fn close(&self) {}
}

/// A reporter that says nothing.
pub struct Silent;
impl Reporter for Silent {}
