//! Running one `… CONCURRENTLY` statement (an index build, drop or rebuild) on a session of
//! its own, watched from the control session:
//!
//! - its progress (`pg_stat_progress_create_index`), shown like the copy's: the table's
//!   blocks scanned, as rows, then the tuples sorted and loaded;
//! - the sessions it waits for: a concurrent build first waits for every transaction older
//!   than it (and a drop for every one holding a lock on the table). They are named (pid,
//!   application, user, state, how long their transaction is open; never their query's
//!   text, which may hold secrets), and once it has waited `--build-wait-timeout` in all
//!   the build is cancelled;
//! - Ctrl-C, or an abort through the control API: the build is cancelled.
//!
//! None of this locks the application out: the statement holds SHARE UPDATE EXCLUSIVE,
//! which conflicts only with other schema changes and VACUUM.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::connect;
use crate::migrate::error::MigrateError;
use crate::migrate::run::Run;
use crate::state::Phase;

/// Why a concurrent statement did not complete.
#[derive(Debug)]
pub(super) enum Failure {
    /// PostgreSQL's error (a duplicate, a deadlock, a cancel from elsewhere).
    Database(tokio_postgres::Error),
    /// It waited longer than `--build-wait-timeout` for the sessions named.
    GaveUp { waited: Duration, sessions: String },
    /// Ctrl-C or an abort: cancelled at the operator's request.
    Interrupted,
    /// Its session could not be opened.
    Session(MigrateError),
}

impl Failure {
    /// A deadlock: another try may succeed.
    pub(super) fn is_deadlock(&self) -> bool {
        matches!(self, Failure::Database(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED))
    }
}

/// What the watcher has seen of the statement so far.
#[derive(Default)]
struct Watch {
    phase: String,
    waiting_for: Vec<i32>,
    waited: Duration,
    last_tick: Option<Instant>,
    rows_before: (i64, Option<Instant>),
    cancelled: Option<Cancel>,
}

#[derive(Clone, Copy)]
enum Cancel {
    GaveUp,
    Interrupted,
}

impl Run<'_> {
    /// Runs `sql` (one `… CONCURRENTLY` statement) on a session of its own, watched (see the
    /// module). `what` names it in notes and events ("building index items_note_idx").
    pub(super) async fn concurrently(&self, what: &str, sql: &str) -> Result<Duration, Failure> {
        let session = connect::connect(&self.session()).await.map_err(|e| Failure::Session(e.into()))?;
        // No lock_timeout: the waits of a concurrent build are for transactions, not locks
        // the application needs; they are bounded by the watcher instead.
        session
            .batch_execute(
                "SET lock_timeout = 0; SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0",
            )
            .await
            .map_err(Failure::Database)?;
        // A ghostwire process that dies mid-build ends the build soon after (PostgreSQL 14+),
        // rather than when it completes.
        let _ = session.batch_execute("SET client_connection_check_interval = '1s'").await;
        let pid: i32 = session.query_one("SELECT pg_backend_pid()", &[]).await.map_err(Failure::Database)?.get(0);
        let started = Instant::now();
        let statement = session.batch_execute(sql);
        tokio::pin!(statement);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut watch = Watch::default();
        loop {
            tokio::select! {
                result = &mut statement => {
                    return match (result, watch.cancelled) {
                        (Ok(()), _) => Ok(started.elapsed()),
                        (Err(_), Some(Cancel::GaveUp)) => Err(Failure::GaveUp {
                            waited: watch.waited,
                            sessions: self.describe_sessions(&watch.waiting_for).await,
                        }),
                        (Err(_), Some(Cancel::Interrupted)) => Err(Failure::Interrupted),
                        (Err(e), None) => Err(Failure::Database(e)),
                    };
                }
                _ = tick.tick() => {
                    if watch.cancelled.is_none() {
                        let interrupted = self.cancel.is_cancelled() || self.live.abort_requested();
                        let gave_up = watch.waited > self.opts.build_wait_timeout;
                        if interrupted || gave_up {
                            watch.cancelled = Some(if interrupted { Cancel::Interrupted } else { Cancel::GaveUp });
                            let _ = self.control.execute("SELECT pg_catalog.pg_cancel_backend($1)", &[&pid]).await;
                            continue;
                        }
                    }
                    self.look(what, pid, &mut watch).await;
                }
            }
        }
    }

    /// One look at the statement's session: progress, and whom it waits for.
    async fn look(&self, what: &str, pid: i32, watch: &mut Watch) {
        let row = self
            .control
            .query_opt(
                "SELECT a.wait_event_type = 'Lock', coalesce(p.phase, ''), coalesce(p.blocks_total, 0), coalesce(p.blocks_done, 0),
                        coalesce(p.tuples_total, 0), coalesce(p.tuples_done, 0),
                        ARRAY(SELECT DISTINCT b FROM unnest(pg_catalog.pg_blocking_pids(a.pid) || p.current_locker_pid::int) b
                               WHERE b IS NOT NULL AND b <> 0 ORDER BY b)
                   FROM pg_catalog.pg_stat_activity a
                   LEFT JOIN pg_catalog.pg_stat_progress_create_index p ON p.pid = a.pid
                  WHERE a.pid = $1",
                &[&pid],
            )
            .await;
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("watching {what}: {e}");
                return;
            }
        };
        let now = Instant::now();
        let waiting: bool = row.get::<_, Option<bool>>(0).unwrap_or(false);
        let phase: String = row.get(1);
        let (blocks_total, blocks_done, tuples_total, tuples_done): (i64, i64, i64, i64) =
            (row.get(2), row.get(3), row.get(4), row.get(5));
        let blockers: Vec<i32> = row.get(6);
        if waiting {
            if let Some(last) = watch.last_tick {
                watch.waited += now - last;
            }
            if blockers != watch.waiting_for && !blockers.is_empty() {
                let sessions = self.describe_sessions(&blockers).await;
                let message = format!(
                    "{what}: waiting for {sessions} to end (a concurrent build waits for every older transaction, a \
                     concurrent drop for those that hold a lock on the table); it gives up after {} of waiting \
                     (--build-wait-timeout). Reads and writes go on meanwhile",
                    humantime::format_duration(self.opts.build_wait_timeout)
                );
                self.reporter.note(&message);
                self.event("waiting", &message, None, Some(json!({"pids": blockers}))).await;
                watch.waiting_for = blockers;
            }
        }
        watch.last_tick = Some(now);
        if !phase.is_empty() && phase != watch.phase {
            self.reporter.note(&format!("{what}: {phase}"));
            if watch.phase.is_empty() {
                crate::failpoint::hit("in_place.building");
            }
            watch.phase = phase;
        }
        // Blocks scanned shown as rows (the estimate spread over the blocks), then tuples.
        let estimated = self.live.progress().rows_estimated.max(0);
        let (done, total) = if tuples_total > 0 {
            (tuples_done, tuples_total)
        } else if blocks_total > 0 {
            let rows = if estimated > 0 { estimated } else { blocks_total };
            ((blocks_done as f64 / blocks_total as f64 * rows as f64) as i64, rows)
        } else {
            return;
        };
        let rate = match watch.rows_before {
            (before, Some(at)) if done >= before && now > at => (done - before) as f64 / (now - at).as_secs_f64(),
            _ => 0.0,
        };
        watch.rows_before = (done, Some(now));
        self.live.update(|p| {
            p.rows_copied = done;
            p.rows_estimated = total;
            p.rows_per_second = rate;
        });
        self.reporter.progress(Phase::Index, done, total, rate);
    }

    /// `pid 4242 (psql, user app, idle in transaction, transaction open 35 s)`, for each pid.
    pub(super) async fn describe_sessions(&self, pids: &[i32]) -> String {
        let rows = self
            .control
            .query(
                "SELECT pid, coalesce(nullif(application_name, ''), 'no application name'), coalesce(usename::text, '?'),
                        coalesce(state, '?'), extract(epoch FROM now() - xact_start)::float8
                   FROM pg_catalog.pg_stat_activity WHERE pid = ANY($1) ORDER BY pid",
                &[&pids],
            )
            .await
            .unwrap_or_default();
        if rows.is_empty() {
            return pids.iter().map(|p| format!("pid {p}")).collect::<Vec<_>>().join(", ");
        }
        rows.iter()
            .map(|r| {
                let open =
                    r.get::<_, Option<f64>>(4).map(|s| format!(", transaction open {s:.0} s")).unwrap_or_default();
                format!(
                    "pid {} ({}, user {}, {}{open})",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
