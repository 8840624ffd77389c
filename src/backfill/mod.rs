//! `ghostwire backfill`: an UPDATE or DELETE run in keyset batches over the table's key
//! (DESIGN.md §5), each batch a short transaction that commits its checkpoint with it.
//!
//! - The key range is fixed at the start (the largest key then), so the run ends even while
//!   rows are inserted; rows inserted later are the application's to write.
//! - A batch is `(key) > last AND (key) <= next AND (the user's condition)`, plus, for an
//!   UPDATE of plain `col = expr` assignments, `col IS DISTINCT FROM (expr)`: a row already
//!   so is not written again, by this run or a rerun.
//! - Each batch runs under `lock_timeout` and `statement_timeout`; one that times out is
//!   rolled back and retried smaller after a jittered pause.
//! - The batch size follows `--batch-time`, as the copy's chunk size does; the throttle
//!   signals, the pause and the live settings of `migrate` hold it between batches.
//! - State: a row of `ghostwire.migrations` (strategy `backfill`, phase `backfill`, the
//!   checkpoint, the rows changed) and its events. `resume TABLE` goes on after the last
//!   committed batch; `abort TABLE` stops it (the batches done stay done).

mod dry_run;
mod run;
pub mod statement;
mod target;

use std::time::Duration;

pub use dry_run::{DryRun, dry_run};
pub use run::{Context, Outcome, abort, backfill, resume};
pub use statement::{Kind, Statement, StatementError};

use crate::operate::Settings;

/// The strategy recorded in `ghostwire.migrations` for a backfill.
pub const STRATEGY: &str = "backfill";

/// How a backfill runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// `chunk_time_ms` is the target time per batch, `chunk_rows` the most keys in one;
    /// the throttle limits as for `migrate`.
    pub settings: Settings,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// Attempts at one batch (lock or statement timeouts, deadlocks) before the run stops.
    pub attempts: u32,
    /// `--dry-run --count`: count the rows exactly.
    pub count: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            settings: Settings { chunk_time_ms: 250, chunk_rows: 100_000, ..Settings::default() },
            lock_timeout: Duration::from_millis(500),
            statement_timeout: Duration::from_secs(30),
            attempts: 10,
            count: false,
        }
    }
}

impl Options {
    /// As recorded with the run (`ghostwire.migrations.settings`), for `resume`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "settings": self.settings,
            "lock_timeout_ms": self.lock_timeout.as_millis() as u64,
            "statement_timeout_ms": self.statement_timeout.as_millis() as u64,
            "attempts": self.attempts,
        })
    }

    /// The options a run was recorded with (the defaults for what is missing).
    pub fn from_json(v: &serde_json::Value) -> Options {
        let d = Options::default();
        let ms = |k: &str, or: Duration| v[k].as_u64().map(Duration::from_millis).unwrap_or(or);
        Options {
            settings: serde_json::from_value(v["settings"].clone()).unwrap_or(d.settings),
            lock_timeout: ms("lock_timeout_ms", d.lock_timeout),
            statement_timeout: ms("statement_timeout_ms", d.statement_timeout),
            attempts: v["attempts"].as_u64().map(|a| a as u32).unwrap_or(d.attempts),
            count: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Statement(#[from] StatementError),
    /// Refused before anything changed.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("{what}: {}", crate::connect::describe(.cause))]
    Database { what: String, cause: tokio_postgres::Error },
    #[error(
        "backfill #{id} of {table} stopped after {rows} row(s): {what}: {cause}. The batches done are committed; \
         `ghostwire resume {table}` goes on after the last one, `ghostwire abort {table}` ends it"
    )]
    Failed { id: i64, table: String, rows: i64, what: String, cause: String },
    #[error(
        "backfill #{id} of {table} stopped after {rows} row(s): {reason}. `ghostwire resume {table}` goes on after \
         the last batch"
    )]
    Stopped { id: i64, table: String, rows: i64, reason: String },
    #[error("backfill #{id} of {table} was aborted after {rows} row(s); the batches done stay done")]
    Aborted { id: i64, table: String, rows: i64 },
}

impl BackfillError {
    /// Refused before anything changed (exit 2).
    pub fn is_refusal(&self) -> bool {
        matches!(self, BackfillError::Statement(_) | BackfillError::Refused(_))
    }

    fn db(what: &str) -> impl FnOnce(tokio_postgres::Error) -> BackfillError + '_ {
        move |cause| BackfillError::Database { what: what.to_owned(), cause }
    }
}
