//! The cut-over loop: attempts at the swap, with catch-up, proxy draining, jittered pauses
//! and the snapshot-hazard wait in between; every attempt is an event with its timings.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use super::cutover::{self, Outcome as Attempt, Swapped};
use super::error::{Context, MigrateError};
use super::run::Run;
use super::snapshots::{self, Horizon};
use super::spec::Spec;
use super::swap;
use crate::state::Phase;

impl Run<'_> {
    /// Returns the swap, its attempt number, and how long proxies held clients for it.
    pub(super) async fn cut_over(
        &mut self,
        work: &Client,
        spec: &Spec,
    ) -> Result<(Swapped, u32, Option<Duration>), MigrateError> {
        let mut script = swap::script(spec);
        if !self.opts.finish && !self.rehearse {
            // The revert window opens in the swap's transaction.
            match super::revert::mapping::Mapping::of(spec) {
                Ok(m) => {
                    let log = super::revert::capture::log_sql(spec, &m).join(";\n");
                    work.batch_execute(&log).await.during(
                        self.id,
                        Phase::Cutover,
                        "creating the reverse capture's log",
                    )?;
                    script.after_move.extend(super::revert::capture::install_sql(spec));
                    let can = m.describe();
                    self.reporter.note(&format!(
                        "after the swap the old table is kept in step: `ghostwire revert {}` goes back to it ({})",
                        self.table,
                        can.join("; ")
                    ));
                }
                Err(why) => self.reporter.note(&format!("no revert window: {why}")),
            }
        }
        let mut own = Vec::new();
        for c in [&self.control, work] {
            own.push(
                c.query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .during(self.id, Phase::Cutover, "identifying sessions")?
                    .get(0),
            );
        }
        let mut reason = String::from("no attempt made");
        for attempt in 1..=self.opts.cutover_attempts.max(1) {
            // Logical capture: the log first gets everything committed until now, so the
            // fence under the lock has little left to wait for.
            self.fence(Duration::from_secs(60)).await?;
            let xid = self.catch_up(work, spec).await?;
            let last = Horizon::after(work, xid).await.during(self.id, Phase::Cutover, "reading the server's clock")?;
            let _ = self
                .control
                .execute(
                    "UPDATE ghostwire.migrations SET cutover_attempts = $2 WHERE id = $1",
                    &[&self.id, &(attempt as i32)],
                )
                .await;
            self.clear_autovacuum(spec, &format!("cut-over attempt {attempt}")).await?;
            // With proxies: hold new work at every proxy first, so no client is inside a
            // transaction (or holds a snapshot) while the swap runs.
            let gated = Instant::now();
            let drained = match self.drain_proxies().await {
                Ok(d) => d,
                Err(failures) => {
                    metrics::counter!("ghostwire_cutover_attempts_total", "outcome" => "drain_failed").increment(1);
                    reason = format!("a proxy did not drain in time ({failures})");
                    let details = json!({"attempt": attempt, "outcome": "drain_failed", "failures": failures});
                    self.event(
                        "cutover_attempt",
                        &format!("attempt {attempt}: {reason}"),
                        Some(gated.elapsed()),
                        Some(details),
                    )
                    .await;
                    self.reporter.note(&format!("cut-over attempt {attempt}: {reason}; retrying"));
                    super::retry::pause_unless_closed(&self.control, self.retry.pause(attempt)).await;
                    self.check_cancelled()?;
                    continue;
                }
            };
            self.live.update(|p| p.cutover_attempts = attempt);
            let result = cutover::attempt(work, spec, &script, &self.retry, &last, &own, self.stream.as_ref()).await;
            let stall = match drained {
                Some(_) => {
                    self.open_proxies().await;
                    Some(gated.elapsed())
                }
                None => None,
            };
            let result = result.during(self.id, Phase::Cutover, "swapping the tables")?;
            let with_gate = |mut d: serde_json::Value| {
                if let (Some(drain), Some(stall)) = (drained, stall) {
                    d["drain_ms"] = json!(ms(drain));
                    d["stall_ms"] = json!(ms(stall));
                }
                d
            };
            match result {
                Attempt::Swapped(s) => {
                    metrics::counter!("ghostwire_cutover_attempts_total", "outcome" => "swapped").increment(1);
                    metrics::histogram!("ghostwire_lock_wait_seconds").record(s.lock_wait.as_secs_f64());
                    metrics::histogram!("ghostwire_lock_hold_seconds").record(s.lock_hold.as_secs_f64());
                    let (wait_ms, hold_ms) = (ms(s.lock_wait), ms(s.lock_hold));
                    let _ = self
                        .control
                        .execute(
                            "UPDATE ghostwire.migrations SET lock_wait_ms = $2, lock_hold_ms = $3 WHERE id = $1",
                            &[&self.id, &wait_ms, &hold_ms],
                        )
                        .await;
                    let details = with_gate(json!({"attempt": attempt, "outcome": "swapped", "lock_wait_ms": wait_ms,
                                                   "lock_hold_ms": hold_ms, "drained": s.drained}));
                    let held = stall.map(|d| format!("; clients held {:.1} ms", ms(d))).unwrap_or_default();
                    let msg =
                        format!("attempt {attempt}: swapped; lock waited {wait_ms:.1} ms, held {hold_ms:.1} ms{held}");
                    self.phase = Phase::Swapped;
                    self.event("cutover_attempt", &msg, Some(s.lock_hold), Some(details)).await;
                    return Ok((s, attempt, stall));
                }
                Attempt::LockNotGranted { waited } => {
                    metrics::counter!("ghostwire_cutover_attempts_total", "outcome" => "lock_timeout").increment(1);
                    metrics::histogram!("ghostwire_lock_wait_seconds").record(waited.as_secs_f64());
                    // Who held the table for longer than the wait: named for the operator.
                    let holders = super::blockers::long_holders(&self.control, &spec.original.sql(), waited)
                        .await
                        .unwrap_or_default();
                    reason = format!("the lock was not granted within {:?}", self.opts.lock_timeout);
                    if !holders.is_empty() {
                        let named: Vec<String> = holders.iter().map(|h| h.describe()).collect();
                        reason.push_str(&format!("; held by {}", named.join(", ")));
                    }
                    let details = with_gate(json!({"attempt": attempt, "outcome": "lock_timeout",
                                                   "lock_wait_ms": ms(waited), "holders": holders}));
                    self.event("cutover_attempt", &format!("attempt {attempt}: {reason}"), Some(waited), Some(details))
                        .await;
                    self.reporter.note(&format!("cut-over attempt {attempt}: {reason}; retrying"));
                    super::retry::pause_unless_closed(&self.control, self.retry.pause(attempt)).await;
                }
                Attempt::TableChanged(what) => {
                    metrics::counter!("ghostwire_cutover_attempts_total", "outcome" => "table_changed").increment(1);
                    let details = json!({"attempt": attempt, "outcome": "table_changed", "what": what});
                    self.event(
                        "cutover_attempt",
                        &format!("attempt {attempt}: the table changed: {what}"),
                        None,
                        Some(details),
                    )
                    .await;
                    return Err(MigrateError::TableChanged { id: self.id, table: spec.original.to_string(), what });
                }
                Attempt::FenceMissed { reason: why, lock_wait } => {
                    metrics::counter!("ghostwire_cutover_attempts_total", "outcome" => "fence_missed").increment(1);
                    reason = format!("the logical capture's fence was not reached under the lock ({why})");
                    let details = with_gate(json!({"attempt": attempt, "outcome": "fence_missed",
                                                   "lock_wait_ms": ms(lock_wait), "reason": why}));
                    self.event("cutover_attempt", &format!("attempt {attempt}: {reason}"), None, Some(details)).await;
                    self.reporter.note(&format!("cut-over attempt {attempt}: {reason}; retrying"));
                    super::retry::pause_unless_closed(&self.control, self.retry.pause(attempt)).await;
                }
                Attempt::Hazard { sessions, lock_wait } => {
                    metrics::counter!("ghostwire_cutover_attempts_total", "outcome" => "snapshot_hazard").increment(1);
                    let pids: Vec<i32> = sessions.iter().map(|s| s.pid).collect();
                    reason = format!("sessions {pids:?} hold snapshots older than the copy");
                    let details = with_gate(json!({"attempt": attempt, "outcome": "snapshot_hazard",
                                                   "lock_wait_ms": ms(lock_wait), "sessions": sessions}));
                    self.event(
                        "cutover_attempt",
                        &format!("attempt {attempt}: {reason}; waiting for them"),
                        None,
                        Some(details),
                    )
                    .await;
                    self.reporter.note(&format!("cut-over attempt {attempt}: {reason}; waiting for them to finish"));
                    snapshots::wait_for(&self.control, &pids, &last, Duration::from_secs(5)).await.during(
                        self.id,
                        Phase::Cutover,
                        "waiting for old snapshots",
                    )?;
                }
            }
            self.check_cancelled()?;
        }
        Err(MigrateError::CutoverGaveUp {
            id: self.id,
            table: spec.original.to_string(),
            attempts: self.opts.cutover_attempts,
            reason,
        })
    }

    fn proxies(&self) -> super::proxies::Proxies<'_> {
        super::proxies::Proxies {
            urls: &self.opts.proxies,
            token: self.opts.proxy_token.as_ref(),
            drain_timeout: self.opts.drain_timeout,
        }
    }

    async fn drain_proxies(&self) -> Result<Option<Duration>, String> {
        self.proxies().drain().await
    }

    /// Runs `change`, a catalog change on the live table (an instant ALTER), with the
    /// proxies drained: no client queues behind its lock, and each checks its prepared
    /// statements after it. A proxy that does not drain in time is no reason to wait: the
    /// change goes on as it would without one.
    pub(super) async fn with_proxies_drained<T>(&self, change: impl std::future::Future<Output = T>) -> T {
        let drained = match self.drain_proxies().await {
            Ok(drained) => drained.is_some(),
            Err(failures) => {
                tracing::warn!("a proxy did not drain in time ({failures}); changing the table without it");
                false
            }
        };
        let out = change.await;
        if drained {
            self.open_proxies().await;
        }
        out
    }

    async fn open_proxies(&self) {
        self.proxies().open().await
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
