//! Riding out a lost connection (DESIGN.md §2): a server restart, a failover, a terminated
//! backend or a reset network ends a run's sessions in any phase. The engine reconnects
//! with backoff for up to `--reconnect-timeout`, takes the table's lock back, ends what is
//! left of its old sessions, and goes on from the last checkpoint in the same process, as
//! `ghostwire resume` would; or it stops, saying the run is resumable. A run whose
//! migration `ghostwire abort` marked stops at once and says so.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::engine::{Context, Options, Outcome, session_config};
use super::error::MigrateError;
use crate::connect::{self, Params};
use crate::sql::QualifiedName;
use crate::state::{self, Phase};

impl MigrateError {
    /// The phase a lost connection interrupted, when the error says.
    fn lost_in(&self) -> Option<Phase> {
        match self {
            MigrateError::Database { phase, .. } | MigrateError::Disconnected { phase, .. } => Some(*phase),
            _ => None,
        }
    }
}

/// What a run that may lose its connection needs to know to go on.
pub(super) struct Ride<'a, 'c> {
    pub config: &'a Params,
    pub id: i64,
    pub table: QualifiedName,
    pub opts: &'a Options,
    pub ctx: &'a Context<'c>,
    pub started: Instant,
    /// What the outcome should say the run started from (`None`: a new run).
    pub resumed_from: Option<Phase>,
}

impl Ride<'_, '_> {
    /// Takes `result` of a run; while it is a lost connection, reconnects and goes on.
    pub(super) async fn out(&self, mut result: Result<Outcome, MigrateError>) -> Result<Outcome, MigrateError> {
        loop {
            let lost = match result {
                Err(e) if e.is_connection_lost() => e,
                other => {
                    return other.map(|mut o| {
                        o.total_time = self.started.elapsed();
                        o.resumed_from = self.resumed_from;
                        o
                    });
                }
            };
            let phase = lost.lost_in().unwrap_or(Phase::Planned);
            let timeout = self.opts.reconnect_timeout;
            let message = format!(
                "lost the connection to the database in phase {phase} ({}); reconnecting for up to {} s",
                cause(&lost),
                timeout.as_secs()
            );
            tracing::warn!("migration #{}: {message}", self.id);
            self.ctx.reporter.note(&message);
            let control = self.reconnect(phase, &cause(&lost)).await?;
            let m = state::migration(&control, self.id)
                .await
                .map_err(|e| MigrateError::Plan(e.into()))?
                .ok_or_else(|| self.vanished())?;
            self.ctx.reporter.note(&format!("reconnected; going on from phase {}", m.phase));
            let _ = state::event(
                &control,
                self.id,
                m.phase,
                "reconnected",
                "reconnected after losing the connection",
                None,
                None,
            )
            .await;
            if m.phase == Phase::Finished {
                return Ok(Outcome::already(self.id, self.table.clone(), m.rows_copied, true));
            }
            result = super::engine::continue_migration(self.config, control, m, self.opts, self.ctx).await;
        }
    }

    /// A new control session holding the table's lock, within the reconnect timeout.
    async fn reconnect(&self, phase: Phase, cause: &str) -> Result<Client, MigrateError> {
        let deadline = Instant::now() + self.opts.reconnect_timeout;
        let gave_up = |cause: String| MigrateError::GaveUpReconnecting {
            id: self.id,
            table: self.table.to_string(),
            phase,
            cause,
            waited_s: self.opts.reconnect_timeout.as_secs(),
        };
        let mut last = cause.to_owned();
        for round in 0u32.. {
            if self.ctx.cancel.is_cancelled() {
                return Err(MigrateError::Interrupted { id: self.id, table: self.table.to_string(), phase });
            }
            let params = session_config(self.config, &format!("ghostwire migrate #{}", self.id));
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            let attempt = tokio::time::timeout(left, connect::connect(&params)).await;
            match attempt.unwrap_or_else(|_| {
                Err(connect::ConnectError::Failed { attempts: vec!["timed out".into()], nothing_given: false })
            }) {
                Ok(control) => match self.take_back(&control, phase, deadline).await {
                    Ok(()) => return Ok(control),
                    Err(e) if e.is_connection_lost() => last = cause_of(&e),
                    Err(MigrateError::Busy { pid, .. }) => {
                        return Err(gave_up(format!("{last}; the table's lock is still held by backend {pid}")));
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => last = e.to_string(),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(gave_up(last));
            }
            tokio::time::sleep(connect::reconnect_pause(round).min(deadline - now)).await;
        }
        Err(gave_up(last))
    }

    /// Takes the table's lock again (the old session may linger until the server notices
    /// it is gone), unless `ghostwire abort` has marked the migration; then ends the old
    /// sessions of this run still on the server (an orphaned index build, say).
    async fn take_back(&self, control: &Client, phase: Phase, deadline: Instant) -> Result<(), MigrateError> {
        let db = |e: tokio_postgres::Error| MigrateError::Database {
            id: self.id,
            phase,
            context: "taking the migration back after reconnecting".into(),
            source: e,
        };
        // A crash with synchronous_commit off can take the last commits with it, the state
        // schema or this migration's row included (and, the log being sequential, all it did).
        let exists = "SELECT to_regclass('ghostwire.migrations') IS NOT NULL AND EXISTS (SELECT FROM ghostwire.migrations WHERE id = $1)";
        let found = match control.query_one("SELECT to_regclass('ghostwire.migrations') IS NOT NULL", &[]).await {
            Ok(r) if r.get::<_, bool>(0) => control.query_one(exists, &[&self.id]).await.map(|r| r.get::<_, bool>(0)),
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        if !found.map_err(db)? {
            return Err(self.vanished());
        }
        loop {
            if state::abort_requested(control, self.id).await.map_err(db)? {
                return Err(MigrateError::AbortedElsewhere { id: self.id, table: self.table.to_string(), phase });
            }
            if state::try_lock_table(control, &self.table).await.map_err(db)? {
                break;
            }
            if Instant::now() >= deadline {
                let pid = state::lock_holder(control, &self.table).await.ok().flatten().unwrap_or(0);
                return Err(MigrateError::Busy { table: self.table.to_string(), pid });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let name = format!("ghostwire migrate #{}", self.id);
        let orphans = "SELECT pid FROM pg_catalog.pg_stat_activity
                        WHERE application_name = $1 AND pid <> pg_backend_pid() AND datname = current_database()";
        let ended = Instant::now() + Duration::from_secs(10);
        loop {
            let left = control.query(orphans, &[&name]).await.map_err(db)?;
            if left.is_empty() || Instant::now() >= ended {
                if !left.is_empty() {
                    tracing::warn!("{} old session(s) of migration #{} would not end; going on", left.len(), self.id);
                }
                return Ok(());
            }
            for row in left {
                let pid: i32 = row.get(0);
                control.execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid]).await.map_err(db)?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Ride<'_, '_> {
    fn vanished(&self) -> MigrateError {
        MigrateError::Refused(format!(
            "migration #{} of {} is no longer in ghostwire.migrations: the server lost its last commits (a crash \
             with synchronous_commit off) and with them everything the run had done, so the table is as it was; run \
             the migration again",
            self.id, self.table
        ))
    }
}

fn cause(e: &MigrateError) -> String {
    cause_of(e)
}

/// The underlying reason of a lost connection, without the migration's preamble.
fn cause_of(e: &MigrateError) -> String {
    match e {
        MigrateError::Database { context, source, .. } => format!("{context}: {}", connect::describe(source)),
        MigrateError::Disconnected { cause, .. } => cause.clone(),
        other => other.to_string(),
    }
}
