//! Why a migration stopped, with the next step for the operator.

use thiserror::Error;

use crate::plan::PlanError;
use crate::state::Phase;

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    /// Another ghostwire process holds the table's lock.
    #[error(
        "another ghostwire process (backend pid {pid}) is migrating {table} right now; wait for it, or stop it with `ghostwire abort {table}`"
    )]
    Busy { table: String, pid: i32 },
    #[error("{table} has an unfinished migration #{id} (phase {phase}{}); finish it first: `ghostwire abort {table}` removes it{}", error.as_ref().map(|e| format!(", failed: {e}")).unwrap_or_default(), if *phase == Phase::Swapped { "; after the swap, `ghostwire finish` drops the old table" } else { "" })]
    Unfinished { table: String, id: i64, phase: Phase, error: Option<String> },
    #[error("{0}")]
    NeedsConsent(String),
    /// Bad input discovered once the shadow exists (nothing on the live table changed).
    #[error("{0}")]
    Refused(String),
    #[error("migration #{id} failed in phase {phase}: {context}: {}{}", crate::connect::describe(source), next_step(*phase))]
    Database {
        id: i64,
        phase: Phase,
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "migration #{id}: verification found {count} row(s) that differ between {table} and the shadow table without a pending change (first keys: {sample}); the original table is untouched. This is a defect in ghostwire: please report it. `ghostwire abort {table}` removes the shadow."
    )]
    Mismatch { id: i64, table: String, count: usize, sample: String },
    #[error(
        "migration #{id}: the shadow table lacks {missing}, which the new {table} must have; the swap is refused and {table} is untouched and writable. Something removed it from the shadow after it was built: `ghostwire abort {table}` removes the shadow, then run the migration again"
    )]
    ShadowIncomplete { id: i64, table: String, missing: String },
    #[error(
        "migration #{id}: the cut-over gave up after {attempts} attempts ({reason}); {table} is untouched and writable. Find what holds long locks or snapshots on it (pg_stat_activity), then run the migration again, or `ghostwire abort {table}`"
    )]
    CutoverGaveUp { id: i64, table: String, attempts: u32, reason: String },
    #[error("migration #{id} of {table} was aborted{}", if *.cleaned { "; its shadow table, triggers and change log are removed" } else { "" })]
    Aborted { id: i64, table: String, cleaned: bool },
    #[error(
        "migration #{id} of {table} stopped at a safe point in phase {phase}; `ghostwire resume {table}` continues it, `ghostwire abort {table}` removes it"
    )]
    Interrupted { id: i64, table: String, phase: Phase },
    #[error("migration #{id} of {table} was aborted in phase {phase}: {reason}. {}", if *.cleaned { "Its shadow table, triggers and change log are removed and the table is as it was; run the migration again once the cause is gone" } else { "Its shadow table and triggers are still there: `ghostwire abort {table}` removes them" })]
    Critical { id: i64, table: String, phase: Phase, reason: String, cleaned: bool },
    /// The session to the database is gone; the engine reconnects (see `reconnect`).
    #[error("migration #{id} of {table} lost its connection to the database in phase {phase}: {cause}")]
    Disconnected { id: i64, table: String, phase: Phase, cause: String },
    #[error(
        "migration #{id} of {table} lost its connection to the database in phase {phase} ({cause}) and could not get it back within {waited_s} s (--reconnect-timeout). {}",
        if phase.before_swap() { format!("The original table is untouched and the run is resumable: `ghostwire resume {table}` continues it from its last checkpoint, `ghostwire abort {table}` removes it") } else { format!("The swap is done; `ghostwire resume {table}` completes what is left") }
    )]
    GaveUpReconnecting { id: i64, table: String, phase: Phase, cause: String, waited_s: u64 },
    #[error(
        "migration #{id} of {table} stopped at the cut-over: the table's definition changed under the migration ({what}), and the shadow would not carry the change. The original is untouched: `ghostwire abort {table}` removes the run; start it again after the change"
    )]
    TableChanged { id: i64, table: String, what: String },
    #[error("migration #{id} of {table} stopped in phase {phase}: logical capture: {reason}{}", next_step(*phase))]
    Capture { id: i64, table: String, phase: Phase, reason: String },
    #[error(
        "migration #{id} of {table} was aborted by `ghostwire abort` from elsewhere in phase {phase}; this run stops. That command removes the shadow table, triggers and change log"
    )]
    AbortedElsewhere { id: i64, table: String, phase: Phase },
    #[error(
        "migration #{id} of {table} stopped: existing rows violate {constraint}: {example}. What the run made is removed; correct those rows, then run the migration again"
    )]
    Violated { id: i64, table: String, constraint: String, example: String },
    /// A concurrent index build, drop or rebuild failed.
    #[error("migration #{id} of {table} stopped: {message}")]
    BuildFailed { id: i64, table: String, message: String },
}

fn next_step(phase: Phase) -> &'static str {
    if phase.before_swap() {
        ". The original table is untouched and the run is resumable: `ghostwire resume TABLE` continues it from its \
         last checkpoint once the cause is gone, `ghostwire abort TABLE` removes the shadow table, triggers and change log"
    } else {
        ""
    }
}

impl MigrateError {
    /// The connection to the database was lost (server restart, failover, terminated
    /// session, network): reconnecting and going on from the last checkpoint may work.
    pub fn is_connection_lost(&self) -> bool {
        use crate::connect::{ConnectError, is_connection_lost};
        match self {
            MigrateError::Database { source, .. } => is_connection_lost(source),
            MigrateError::Plan(PlanError::Database(e)) => is_connection_lost(e),
            MigrateError::Connect(ConnectError::Failed { .. }) | MigrateError::Disconnected { .. } => true,
            _ => false,
        }
    }

    /// Refused before anything was changed (exit status 2), as opposed to a failed run.
    pub fn is_refusal(&self) -> bool {
        match self {
            MigrateError::Plan(p) => p.is_refusal(),
            MigrateError::Connect(c) => c.is_refusal(),
            MigrateError::Busy { .. }
            | MigrateError::Unfinished { .. }
            | MigrateError::NeedsConsent(_)
            | MigrateError::Refused(_) => true,
            _ => false,
        }
    }
}

/// Attaches the migration, phase and step to a database error.
pub trait Context<T> {
    fn during(self, id: i64, phase: Phase, context: &str) -> Result<T, MigrateError>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn during(self, id: i64, phase: Phase, context: &str) -> Result<T, MigrateError> {
        self.map_err(|source| MigrateError::Database { id, phase, context: context.to_owned(), source })
    }
}
