//! Sessions in the way of the swap: autovacuum workers, cancelled before each attempt (and
//! before the capture triggers are installed), and long transactions holding the table,
//! named when an attempt's lock is not granted.
//!
//! An autovacuum worker holds SHARE UPDATE EXCLUSIVE on the table it vacuums, for as long as
//! the vacuum takes (hours on a big table). PostgreSQL cancels it for a lock request that has
//! waited `deadlock_timeout` (1 s by default), but the swap waits `--lock-timeout` (100 ms) at
//! most, so every attempt would fail until the vacuum ended. Before each attempt, such
//! workers on the table (or its TOAST table) are cancelled, as PostgreSQL itself would
//! do, except vacuums that prevent transaction ID wraparound, which are left to finish. The
//! vacuum runs again later, on the new table.

use serde_json::json;
use tokio_postgres::Client;

use super::error::{Context as _, MigrateError};
use super::run::Run;
use super::spec::Spec;

/// An autovacuum worker found holding a lock on the table.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pid: i32,
    /// What it is doing, as `pg_stat_activity` says (`autovacuum: VACUUM public.t`).
    pub query: String,
    /// Cancelled, or why not.
    pub cancelled: Result<(), String>,
}

impl Worker {
    /// One line for the operator.
    pub fn describe(&self) -> String {
        match &self.cancelled {
            Ok(()) => format!("cancelled {} (pid {}) holding the table", self.query, self.pid),
            Err(why) => format!("{} (pid {}) holds the table: {why}", self.query, self.pid),
        }
    }
}

const AUTOVACUUM_HOLDERS: &str = "SELECT DISTINCT a.pid, coalesce(a.query, '')
      FROM pg_catalog.pg_stat_activity a
      JOIN pg_catalog.pg_locks l ON l.pid = a.pid AND l.locktype = 'relation' AND l.granted
     WHERE a.backend_type = 'autovacuum worker'
       AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
       AND l.relation IN (SELECT c.oid FROM pg_catalog.pg_class c WHERE c.oid = ANY ($1::text[]::regclass[])
                          UNION ALL
                          SELECT c.reltoastrelid FROM pg_catalog.pg_class c
                           WHERE c.oid = ANY ($1::text[]::regclass[]) AND c.reltoastrelid <> 0)
     ORDER BY 1";

/// Cancels the autovacuum workers holding locks on `tables` (quoted names), except those
/// preventing wraparound; returns every worker found. Cancelling needs superuser (or, from
/// PostgreSQL 18, `pg_signal_autovacuum_worker`): without it, the worker is reported.
pub async fn clear_autovacuum(client: &Client, tables: &[String]) -> Result<Vec<Worker>, tokio_postgres::Error> {
    let mut found = Vec::new();
    for row in client.query(AUTOVACUUM_HOLDERS, &[&tables]).await? {
        let (pid, query): (i32, String) = (row.get(0), row.get(1));
        let cancelled = if query.contains("to prevent wraparound") {
            Err("it prevents transaction ID wraparound; the swap waits for it".to_owned())
        } else {
            match client.query_one("SELECT pg_catalog.pg_cancel_backend($1)", &[&pid]).await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!(
                    "could not cancel it ({}); the swap waits for it to end, or cancel it as a superuser",
                    crate::connect::describe(&e)
                )),
            }
        };
        found.push(Worker { pid, query, cancelled });
    }
    Ok(found)
}

/// A session whose transaction holds a lock on the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Holder {
    pub pid: i32,
    pub state: String,
    /// Seconds since its transaction began.
    pub transaction_seconds: f64,
    pub query: String,
}

impl Holder {
    pub fn describe(&self) -> String {
        format!(
            "pid {} ({}, in a transaction for {:.1} s: {})",
            self.pid, self.state, self.transaction_seconds, self.query
        )
    }
}

/// The sessions (at most five, oldest first) holding a lock on `table` in a transaction
/// older than `older_than`: the likely reason a swap attempt's lock was not granted (a
/// younger holder is usually a short transaction the lock would have waited out).
pub async fn long_holders(
    client: &Client,
    table: &str,
    older_than: std::time::Duration,
) -> Result<Vec<Holder>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.pid, coalesce(a.state, ''), extract(epoch FROM now() - a.xact_start)::float8,
                    left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 80)
               FROM pg_catalog.pg_stat_activity a
              WHERE a.pid <> pg_catalog.pg_backend_pid()
                AND a.xact_start < now() - make_interval(secs => $2)
                AND a.pid IN (SELECT l.pid FROM pg_catalog.pg_locks l
                               WHERE l.locktype = 'relation' AND l.granted AND l.relation = $1::text::regclass)
              ORDER BY a.xact_start LIMIT 5",
            &[&table, &older_than.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Holder { pid: r.get(0), state: r.get(1), transaction_seconds: r.get(2), query: r.get(3) })
        .collect())
}

impl Run<'_> {
    /// Cancels autovacuum workers holding the table or the shadow before `before`, each an
    /// event and a note.
    pub(super) async fn clear_autovacuum(&self, spec: &Spec, before: &str) -> Result<(), MigrateError> {
        let tables = [spec.original.sql(), spec.shadow().sql()];
        let workers = clear_autovacuum(&self.control, &tables).await.during(
            self.id,
            self.phase,
            "looking for autovacuum workers on the table",
        )?;
        for w in workers {
            let message = format!("{}: {}", before, w.describe());
            let details = json!({"before": before, "pid": w.pid, "query": w.query, "cancelled": w.cancelled.is_ok()});
            self.event("autovacuum", &message, None, Some(details)).await;
            self.reporter.note(&message);
        }
        Ok(())
    }
}
