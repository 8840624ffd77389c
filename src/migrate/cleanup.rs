//! `abort` and `finish`: remove every trace of a migration. Both are idempotent.
//!
//! Abort (before the swap): the capture triggers come off the live table (briefly locked,
//! with retries), then the change log, its trigger functions and the work schema holding
//! the shadow go. Finish (after the swap): the old table and its archive schema go, and
//! whatever capture objects are left.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::capture;
use super::retry::{RetryPolicy, ddl};
use super::spec;
use crate::sql::{QualifiedName, ident};
use crate::state::{self, Migration, Phase};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("{}", crate::connect::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error(
        "migration #{id} of {table} is already swapped: the new table is live. `ghostwire revert {table}` goes back to \
         the old table without losing a write, `ghostwire finish {table}` drops it"
    )]
    AlreadySwapped { id: i64, table: String },
    #[error("migration #{id} of {table} is not swapped yet (phase {phase}); nothing to finish")]
    NotSwapped { id: i64, table: String, phase: Phase },
    #[error(
        "another ghostwire process (backend pid {pid}) still holds {table} after it was asked to stop; try again, or \
         terminate that session"
    )]
    StillRunning { pid: i32, table: String },
    #[error(
        "the old table {old} cannot be dropped: {reason}. Remove what depends on it, then run `ghostwire finish` again"
    )]
    OldTableInUse { old: String, reason: String },
}

async fn exists(client: &Client, table: &QualifiedName) -> Result<bool, tokio_postgres::Error> {
    Ok(client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.sql()]).await?.get(0))
}

/// Stops a ghostwire process still working on the migration: its sessions are terminated
/// (an open cut-over transaction rolls back), then its table lock is taken over.
pub async fn stop_runner(client: &Client, m: &Migration) -> Result<(), CleanupError> {
    // First the mark, then the sessions: a runner that reconnects finds it and stops.
    state::request_abort(client, m.id).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if state::try_lock_table(client, &m.table).await? {
            return Ok(());
        }
        let holder = state::lock_holder(client, &m.table).await?;
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
                  WHERE pid <> pg_backend_pid() AND datname = current_database()
                    AND (pid = $1 OR application_name = $2)",
                &[&holder.unwrap_or(0), &format!("ghostwire migrate #{}", m.id)],
            )
            .await?;
        if Instant::now() > deadline {
            return Err(CleanupError::StillRunning { pid: holder.unwrap_or(0), table: m.table.to_string() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes the capture triggers, change log, trigger functions and shadow of a migration
/// that has not swapped. The caller holds the table's advisory lock.
pub async fn abort(client: &Client, m: &Migration, retry: &RetryPolicy) -> Result<(), CleanupError> {
    if let Some(schema) = super::version_schema::of(m)
        && m.phase == Phase::Swapped
    {
        state::event(client, m.id, m.phase, "abort", "abort requested", None, None).await?;
        super::version_schema::remove(client, m, &schema, retry).await?;
        let message = format!("aborted: version schema {} dropped, the table as it was", ident(&schema));
        state::set_phase(client, m.id, Phase::Aborted, &message).await?;
        return Ok(());
    }
    if !m.phase.before_swap() && m.phase != Phase::Aborted {
        return Err(CleanupError::AlreadySwapped { id: m.id, table: m.table.to_string() });
    }
    state::event(client, m.id, m.phase, "abort", "abort requested", None, None).await?;
    // A change in place built no shadow: what it made is on the table itself (recorded in
    // its events).
    let made_in_place = if m.spec.is_none() && m.strategy == "online" {
        super::in_place::remove(client, m, retry).await?
    } else {
        Vec::new()
    };
    // The capture is installed only once the shadow's spec is recorded. Logical capture put
    // nothing on the table: no lock on it is needed.
    if m.spec.is_some() && capture::Mode::of(m) == capture::Mode::Trigger && exists(client, &m.table).await? {
        // Dropping a trigger waits for a vacuum of the table, as the swap does.
        for w in super::blockers::clear_autovacuum(client, &[m.table.sql()]).await? {
            let message = format!("removing the capture triggers: {}", w.describe());
            state::event(client, m.id, m.phase, "autovacuum", &message, None, None).await?;
        }
        ddl(client, retry, "removing the capture triggers", &capture::drop_triggers_sql(m.id, &m.table)).await?;
    }
    capture::logical::remove(client, m.id).await?;
    client.batch_execute(&capture::drop_log_sql(m.id)).await?;
    // Made before the first swap attempt, kept when the attempts gave up.
    client.batch_execute(&super::revert::capture::drop_log_sql(m.id)).await?;
    client.batch_execute(&super::copy::drop_round_sql(m.id)).await?;
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", ident(&spec::work_schema(m.id)))).await?;
    let message = if made_in_place.is_empty() {
        "aborted: shadow table, triggers and change log removed".to_owned()
    } else {
        format!("aborted: removed {} (made by the change in place)", made_in_place.join(", "))
    };
    state::set_phase(client, m.id, Phase::Aborted, &message).await?;
    Ok(())
}

/// Drops the old table kept after the swap, and what is left of the migration.
pub async fn finish(client: &Client, m: &Migration) -> Result<(), CleanupError> {
    if m.phase == Phase::Finished {
        return Ok(());
    }
    if m.phase == Phase::Reverted {
        return finish_reverted(client, m).await;
    }
    // A revert that stopped midway (`reverting`) left the new table live: finishing keeps it.
    if m.phase != Phase::Swapped && m.phase != Phase::Reverting {
        return Err(CleanupError::NotSwapped { id: m.id, table: m.table.to_string(), phase: m.phase });
    }
    if let Some(schema) = super::version_schema::of(m) {
        super::version_schema::contract(client, m, &schema, &RetryPolicy::default()).await?;
        let message = format!("finished: the change applied to the table, version schema {} dropped", ident(&schema));
        state::set_phase(client, m.id, Phase::Finished, &message).await?;
        return Ok(());
    }
    // The revert window closes: reverse capture off the live table first (a short lock).
    if super::revert::capture::installed(client, m.id, &m.table).await? {
        let sql = super::revert::capture::drop_triggers_sql(m.id, &m.table);
        ddl(client, &RetryPolicy::default(), "removing the reverse capture triggers", &sql).await?;
    }
    client.batch_execute(&super::revert::capture::drop_log_sql(m.id)).await?;
    let archive = spec::archive_schema(m.id);
    let old = QualifiedName::new(&archive, &m.table.name);
    if exists(client, &old).await? {
        // No CASCADE: anything still depending on the old table is the operator's to decide.
        if let Err(e) = client.batch_execute(&format!("DROP TABLE {}", old.sql())).await {
            let reason = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
            return Err(CleanupError::OldTableInUse { old: old.to_string(), reason });
        }
    }
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {}", ident(&archive))).await?;
    capture::logical::remove(client, m.id).await?;
    client.batch_execute(&capture::drop_log_sql(m.id)).await?;
    client.batch_execute(&super::copy::drop_round_sql(m.id)).await?;
    state::set_phase(client, m.id, Phase::Finished, "finished: old table dropped").await?;
    Ok(())
}

/// After a revert: the new table kept in `ghostwire_<id>_new` is dropped.
async fn finish_reverted(client: &Client, m: &Migration) -> Result<(), CleanupError> {
    let kept_schema = super::revert::swap_back::kept_schema(m.id);
    let kept = QualifiedName::new(&kept_schema, &m.table.name);
    if exists(client, &kept).await? {
        if let Err(e) = client.batch_execute(&format!("DROP TABLE {}", kept.sql())).await {
            let reason = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
            return Err(CleanupError::OldTableInUse { old: kept.to_string(), reason });
        }
    }
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {}", ident(&kept_schema))).await?;
    client.batch_execute(&super::revert::capture::drop_log_sql(m.id)).await?;
    capture::logical::remove(client, m.id).await?;
    client.batch_execute(&capture::drop_log_sql(m.id)).await?;
    client.batch_execute(&super::copy::drop_round_sql(m.id)).await?;
    state::set_phase(client, m.id, Phase::Finished, "finished: the new table kept after the revert is dropped").await?;
    Ok(())
}
