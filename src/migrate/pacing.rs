//! Pacing a run: waiting while a throttle signal is over its limit (DESIGN.md §6), saying
//! why in the status, the state and the events, counting the time held back by reason; and,
//! during the copy, applying a growing change backlog between chunks.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::error::{Context as _, MigrateError};
use super::run::Run;
use super::spec::Spec;
use super::throttle::{self, Verdict};
use super::{capture, catchup, copy, index};
use crate::operate::holdback::Turn;
use crate::state::Phase;

impl Run<'_> {
    /// Waits while a throttle signal is over its limit. During the copy, a growing change
    /// backlog is applied between chunks (the shadow's key index is built for that first).
    pub(super) async fn throttle(
        &mut self,
        work: &Client,
        spec: &Spec,
        copier: Option<&copy::Copier>,
    ) -> Result<(), MigrateError> {
        loop {
            self.check_cancelled()?;
            // A signal that cannot be read holds the run back, unless it cannot be read
            // because the session is gone: then the run reconnects.
            if self.control.is_closed() {
                return Err(MigrateError::Disconnected {
                    id: self.id,
                    table: self.table.to_string(),
                    phase: self.phase,
                    cause: "the server closed the session".into(),
                });
            }
            let settings = self.live.settings();
            let read = capture::backlog(&self.control, spec.migration_id)
                .await
                .map_err(|e| format!("cannot read the change backlog: {}", crate::connect::describe(&e)));
            if let Ok(b) = read {
                self.live.update(|p| p.backlog = b);
                metrics::gauge!("ghostwire_backlog").set(b as f64);
            }
            let backlog = *read.as_ref().unwrap_or(&0);
            let slot_lag = self.slot_lag().await;
            let signals = throttle::read(&self.control, &settings, read, self.live.paused(), slot_lag).await;
            let verdict = throttle::judge(&settings, &signals);
            // During the copy, a large backlog is applied between chunks (unless the operator
            // paused everything, or another signal holds the run back).
            let interleave_at = settings.max_backlog.map(|m| m / 2).unwrap_or(200_000).max(1);
            let backlog_only = match &verdict {
                Verdict::Go => true,
                Verdict::Throttle(reason) => throttle::is_backlog(reason),
                Verdict::Critical(_) => false,
            };
            if let Some(c) = copier
                && backlog_only
                && backlog >= interleave_at
            {
                self.note_throttle(&verdict).await;
                self.apply_during_copy(work, spec, c, interleave_at).await?;
                continue;
            }
            match verdict {
                Verdict::Go => {
                    if let Some(turn) = self.holdback.release() {
                        self.show_turn(turn).await;
                    }
                    return Ok(());
                }
                Verdict::Critical(reason) => {
                    self.event("critical", &reason, None, None).await;
                    return Err(MigrateError::Critical {
                        id: self.id,
                        table: self.table.to_string(),
                        phase: self.phase,
                        reason,
                        cleaned: false,
                    });
                }
                Verdict::Throttle(reason) => {
                    self.note_throttle(&Verdict::Throttle(reason.clone())).await;
                    if throttle::is_backlog(&reason) && copier.is_none() {
                        return Ok(()); // catch-up itself is what brings the backlog down
                    }
                    self.live.wait_for_change(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Logical capture: the WAL the slot retains (also shown live and as a metric).
    async fn slot_lag(&self) -> Option<Result<i64, String>> {
        let stream = self.stream.as_ref()?;
        let read = crate::replication::slot::state(&self.control, &stream.names).await;
        let lag = match read {
            Ok(s) => Ok(s.map(|s| s.retained_bytes).unwrap_or(0)),
            Err(e) => Err(format!("cannot read the replication slot: {}", crate::connect::describe(&e))),
        };
        let ago = stream.progress.confirmed_ago();
        if let Ok(b) = &lag {
            metrics::gauge!("ghostwire_slot_retained_bytes").set(*b as f64);
        }
        if let Some(a) = ago {
            metrics::gauge!("ghostwire_slot_confirmed_ago_seconds").set(a);
        }
        self.live.update(|p| {
            p.slot_retained_bytes = lag.as_ref().ok().copied();
            p.slot_confirmed_ago_seconds = ago;
        });
        Some(lag)
    }

    /// Records that the run is throttled (once per reason: an event, the state, the status).
    async fn note_throttle(&mut self, verdict: &Verdict) {
        let Verdict::Throttle(reason) = verdict else { return };
        if let Some(turn) = self.holdback.hold(reason) {
            self.show_turn(turn).await;
        }
    }

    async fn show_turn(&self, turn: Turn) {
        let (kind, message, took, details) = turn.event();
        self.event(kind, &message, took, details).await;
        turn.show(&self.control, self.id, &self.live, self.reporter).await;
    }

    /// Catch-up between copy chunks, until the backlog is down to half of `at`.
    async fn apply_during_copy(
        &mut self,
        work: &Client,
        spec: &Spec,
        c: &copy::Copier,
        at: i64,
    ) -> Result<(), MigrateError> {
        if !self.key_index_ready
            && !index::existing(work, spec)
                .await
                .during(self.id, Phase::Copy, "listing the shadow's indexes")?
                .contains(&spec.key_index)
        {
            let key = spec.deferred_indexes.iter().find(|d| d.name == spec.key_index).cloned();
            if let Some(key) = key {
                self.reporter
                    .note("the change backlog is growing: building the shadow's key index to apply it during the copy");
                let t = Instant::now();
                work.batch_execute(&index::build_sql(&key)).await.during(
                    self.id,
                    Phase::Copy,
                    "building the shadow's key index",
                )?;
                if let Some((_, attach)) = &key.attach {
                    work.batch_execute(attach).await.during(self.id, Phase::Copy, "making the key index the key")?;
                }
                self.event(
                    "index_done",
                    &format!("built the key index {} during the copy", key.name),
                    Some(t.elapsed()),
                    None,
                )
                .await;
            }
        }
        self.key_index_ready = true;
        loop {
            let b = catchup::batch_during_copy(work, spec, self.opts.catchup_batch, c.checkpoint.as_deref(), &c.end)
                .await
                .during(self.id, Phase::Copy, "applying captured changes during the copy")?;
            let backlog = capture::backlog(&self.control, spec.migration_id).await.unwrap_or(0);
            self.live.update(|p| p.backlog = backlog);
            if b.entries < self.opts.catchup_batch || backlog < at / 2 {
                return Ok(());
            }
            self.check_cancelled()?;
        }
    }
}
