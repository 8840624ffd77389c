//! The run's side of change capture: installing it in the mode the migration uses, the
//! logical stream's life (started for any phase before the swap, on resume too; stopped
//! with the run; the slot and publication dropped once swapped), and fences.

use std::time::Duration;

use tokio_postgres::Client;

use super::capture::{self, Mode};
use super::engine::Reporter;
use super::error::{Context as _, MigrateError};
use super::run::Run;
use super::spec::Spec;
use crate::state::{self, Migration, Phase};

/// Before a logical capture's run goes on: if a crash of the server emptied its change log
/// (UNLOGGED, see `capture::log_table_sql`), the shadow may lack the changes whose keys it
/// held, and the slot, confirmed past them, will not send them again. The shadow is then
/// dropped and the run goes back to building it: a new copy reads every row as it is, and
/// the slot, the publication and the (now empty) log stay, the stream going on from the
/// slot. Returns whether it did; `m` is then the migration as it now is.
pub(super) async fn copy_over_if_log_lost(
    control: &Client,
    m: &mut Migration,
    reporter: &dyn Reporter,
) -> Result<bool, MigrateError> {
    if Mode::of(m) != Mode::Logical || m.phase <= Phase::Capture || !m.phase.before_swap() || m.spec.is_none() {
        return Ok(false);
    }
    let id = m.id;
    let during = |e| Err::<bool, _>(e).during(id, m.phase, "checking the change log");
    if capture::logical::log_intact(control, id).await.or_else(during)? {
        return Ok(false);
    }
    let message = format!("{}: copying again", capture::logical::LogicalError::LogLost);
    tracing::warn!("migration #{id}: {message}");
    reporter.note(&message);
    let sql = format!(
        "DROP SCHEMA IF EXISTS {} CASCADE; {};
         UPDATE ghostwire.migrations SET spec = NULL, checkpoint = NULL, copy_end = NULL, rows_copied = 0 WHERE id = {id}",
        crate::sql::ident(&super::spec::work_schema(id)),
        super::copy::drop_round_sql(id)
    );
    control.batch_execute(&sql).await.during(id, m.phase, "dropping the shadow to copy again")?;
    state::event(control, id, m.phase, "change_log_lost", &message, None, None).await.during(
        id,
        m.phase,
        "recording the lost change log",
    )?;
    state::set_phase(control, id, Phase::Shadow, &message).await.during(id, m.phase, "going back to the shadow")?;
    (m.spec, m.checkpoint, m.copy_end, m.rows_copied, m.phase) = (None, None, None, 0, Phase::Shadow);
    Ok(true)
}

impl Run<'_> {
    /// Phase `capture`: the triggers, or the publication, the slot and the wait for the
    /// writers in flight.
    pub(super) async fn install_capture(&mut self, spec: &Spec) -> Result<(), MigrateError> {
        match self.capture {
            Mode::Trigger => {
                // CREATE TRIGGER waits for a vacuum of the table as the swap does.
                self.clear_autovacuum(spec, "installing the capture triggers").await?;
                capture::install(&self.control, spec, &self.retry).await.during(
                    self.id,
                    Phase::Capture,
                    "installing the capture triggers",
                )
            }
            Mode::Logical => {
                // CREATE PUBLICATION takes the table's SHARE UPDATE EXCLUSIVE lock, which a
                // vacuum of it holds.
                self.clear_autovacuum(spec, "creating the publication").await?;
                capture::logical::install(&self.control, &self.session(), spec, &self.retry)
                    .await
                    .map_err(|e| self.logical_error(e))
            }
        }
    }

    /// Starts streaming from the slot (which must still be there and usable).
    pub(super) async fn start_stream(&mut self, spec: &Spec) -> Result<(), MigrateError> {
        capture::logical::check_slot(&self.control, self.id).await.map_err(|e| self.logical_error(e))?;
        let stream = capture::logical::Stream::start(&self.session(), spec).await;
        self.stream = Some(stream.map_err(|e| self.logical_error(e))?);
        Ok(())
    }

    /// A logical capture's error as the run's. A change log emptied by a crash of the server
    /// is a lost connection: reconnecting, the run finds the log lost and copies again.
    pub(super) fn logical_error(&self, e: capture::logical::LogicalError) -> MigrateError {
        match e {
            capture::logical::LogicalError::LogLost => MigrateError::Disconnected {
                id: self.id,
                table: self.table.to_string(),
                phase: self.phase,
                cause: e.to_string(),
            },
            other => self.capture_error(other),
        }
    }

    pub(super) fn capture_error(&self, reason: impl ToString) -> MigrateError {
        MigrateError::Capture {
            id: self.id,
            table: self.table.to_string(),
            phase: self.phase,
            reason: reason.to_string(),
        }
    }

    /// Stops the logical capture's stream, if it runs.
    pub(super) async fn stop_stream(&mut self) {
        if let Some(s) = self.stream.take() {
            s.stop().await;
        }
    }

    /// Once swapped there is nothing to stream: the slot would only pin WAL.
    pub(super) async fn end_capture_after_swap(&mut self) {
        if self.capture != Mode::Logical {
            return;
        }
        self.stop_stream().await;
        if let Err(e) = capture::logical::remove(&self.control, self.id).await {
            let message = format!(
                "could not drop the replication slot and publication of migration #{} ({}): `ghostwire finish {}` \
                 drops them",
                self.id,
                crate::connect::describe(&e),
                self.table
            );
            self.reporter.note(&message);
        }
    }

    /// Of the keys a verification found different without a log entry, those still without
    /// one once the stream is fenced (logical capture: the log lags the table by the
    /// stream's delay; with triggers the verification's own snapshot is exact).
    pub(super) async fn unexplained_after_fence(
        &self,
        spec: &Spec,
        keys: &[String],
    ) -> Result<Vec<String>, MigrateError> {
        if keys.is_empty() || self.stream.is_none() {
            return Ok(keys.to_vec());
        }
        self.fence(Duration::from_secs(60)).await?;
        super::verify::still_unexplained(&self.control, spec, keys).await.during(
            self.id,
            Phase::Verify,
            "checking the differences against the change log",
        )
    }

    /// Waits until the change log holds every change committed before this call (logical
    /// capture; at once with triggers, which log in the writers' own transactions).
    pub(super) async fn fence(&self, timeout: Duration) -> Result<(), MigrateError> {
        match &self.stream {
            Some(s) => s.fence(timeout).await.map_err(|e| self.logical_error(e)),
            None => Ok(()),
        }
    }
}
