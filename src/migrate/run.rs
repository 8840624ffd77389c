//! The orchestrator: an explicit state machine over the phases of DESIGN.md §2, entered at
//! any phase (a resumed run picks up where the last one stopped).
//!
//! planned → shadow → capture → copy → index → verify → catchup → cutover → swapped
//! (→ finished with `--finish`); index builds and verification share one pool of sessions, so
//! `verify` starts while the last indexes build. A resumed run past them verifies again after
//! its catch-up. Each phase is recorded before it starts; a failure is
//! recorded with its phase. Copy and catch-up ask the throttle before each chunk or batch;
//! when the change backlog grows during the copy, catch-up runs between chunks.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use crate::connect::Params as Config;

use super::engine::{Context, Options, Outcome, PhaseHook, Reporter, session_config};
use super::error::{Context as _, MigrateError};
use super::live::Live;
use super::rehearsal::Meter;
use super::retry::RetryPolicy;
use super::spec::{DeferredIndex, Spec};
use super::{capture, catchup, cleanup, copy, index, post_copy, shadow, verify};
use crate::connect;
use crate::operate::holdback::Holdback;
use crate::plan::{Plan, Strategy};
use crate::sql::QualifiedName;
use crate::state::{self, Migration, Phase};

pub(super) struct Run<'a> {
    pub(super) config: Config,
    pub(super) control: Client,
    pub(super) opts: &'a Options,
    pub(super) reporter: &'a dyn Reporter,
    hook: Option<PhaseHook>,
    pub(super) cancel: tokio_util::sync::CancellationToken,
    pub(super) live: std::sync::Arc<Live>,
    pub(super) retry: RetryPolicy,
    pub(super) id: i64,
    pub(super) phase: Phase,
    pub(super) table: QualifiedName,
    strategy: Strategy,
    /// Rows a previous run copied (resume).
    pub(super) rows_before: i64,
    /// In place, resumed: the statement's position of each step of the plan (which holds only
    /// the subcommands left).
    pub(super) step_positions: Option<Vec<usize>>,
    /// The current throttle, if any.
    pub(super) holdback: Holdback,
    /// The shadow's key index is known to exist (applying changes during the copy needs it).
    pub(super) key_index_ready: bool,
    /// A rehearsal (`--rehearse`, or a resumed one): no swap, and no trace.
    pub(super) rehearse: bool,
    /// A sampled rehearsal (`--sample`): one copy round and one verification range in this
    /// many.
    pub(super) sample_every: Option<u64>,
    pub(super) meter: Option<Meter>,
    /// How the application's writes are captured.
    pub(super) capture: capture::Mode,
    /// The logical capture's stream, while it runs.
    pub(super) stream: Option<capture::logical::Stream>,
    /// Build the table's invalid indexes on the shadow (`--invalid-indexes rebuild`).
    pub(super) rebuild_invalid: bool,
}

impl<'a> Run<'a> {
    pub(super) fn new(
        config: &Config,
        control: Client,
        opts: &'a Options,
        ctx: &Context<'a>,
        id: i64,
        table: QualifiedName,
        strategy: Strategy,
    ) -> Run<'a> {
        super::live::register_metrics();
        let retry = RetryPolicy {
            lock_timeout: opts.lock_timeout,
            attempts: opts.cutover_attempts.max(1),
            ..RetryPolicy::default()
        };
        ctx.live.update(|p| {
            p.migration_id = id;
            p.table = table.to_string();
        });
        Run {
            config: config.clone(),
            control,
            opts,
            reporter: ctx.reporter,
            hook: ctx.hook.clone(),
            cancel: ctx.cancel.clone(),
            live: std::sync::Arc::clone(&ctx.live),
            retry,
            id,
            phase: Phase::Planned,
            table,
            strategy,
            rows_before: 0,
            step_positions: None,
            holdback: Holdback::default(),
            key_index_ready: false,
            rehearse: opts.rehearse,
            sample_every: opts.sample_every(),
            meter: None,
            capture: capture::Mode::Trigger,
            stream: None,
            rebuild_invalid: opts.invalid_indexes == Some(super::engine::InvalidIndexes::Rebuild),
        }
    }

    pub(super) fn session(&self) -> Config {
        session_config(&self.config, &format!("ghostwire migrate #{}", self.id))
    }

    /// A session for copying and applying changes. A chunk and its checkpoint (a batch and
    /// its log deletions) commit together, so an asynchronous commit lost in a crash loses
    /// both: safe, and no flush wait each time.
    async fn work_session(&self) -> Result<Client, MigrateError> {
        let client = connect::connect(&self.session()).await?;
        client.batch_execute("SET synchronous_commit = off").await.during(
            self.id,
            self.phase,
            "preparing a work session",
        )?;
        Ok(client)
    }

    pub(super) async fn enter(&mut self, phase: Phase, message: &str) -> Result<(), MigrateError> {
        self.check_cancelled()?;
        self.phase = phase;
        self.live.update(|p| p.phase = phase.as_str().to_owned());
        state::set_phase(&self.control, self.id, phase, message).await.during(self.id, phase, "recording the phase")?;
        if let Some(meter) = self.meter.as_mut() {
            meter.entered(&self.control, phase).await;
        }
        self.reporter.phase(phase, message);
        if let Some(hook) = &self.hook {
            hook(phase).await;
        }
        Ok(())
    }

    /// Stops at a safe point when Ctrl-C or the control API asked.
    pub(super) fn check_cancelled(&self) -> Result<(), MigrateError> {
        if self.live.abort_requested() {
            return Err(MigrateError::Aborted { id: self.id, table: self.table.to_string(), cleaned: false });
        }
        if self.cancel.is_cancelled() {
            return Err(MigrateError::Interrupted { id: self.id, table: self.table.to_string(), phase: self.phase });
        }
        if self.stream.as_ref().is_some_and(|s| s.log_lost()) {
            return Err(self.logical_error(capture::logical::LogicalError::LogLost));
        }
        if let Some(reason) = self.stream.as_ref().and_then(|s| s.failure()) {
            return Err(self.capture_error(reason));
        }
        Ok(())
    }

    pub(super) async fn event(
        &self,
        kind: &str,
        message: &str,
        duration: Option<Duration>,
        details: Option<serde_json::Value>,
    ) {
        let ms = duration.map(|d| d.as_secs_f64() * 1000.0);
        if let Err(e) = state::event(&self.control, self.id, self.phase, kind, message, ms, details).await {
            tracing::warn!("could not record an event: {e}");
        }
    }

    /// Records how a run ended: an abort requested through the control API, or a critical
    /// limit crossed, removes everything (the capture triggers' overhead included); any
    /// other failure stays on the migration (it is resumable).
    pub(super) async fn finish_up(&mut self, result: Result<Outcome, MigrateError>) -> Result<Outcome, MigrateError> {
        self.stop_stream().await;
        match result {
            Ok(o) => Ok(o),
            Err(MigrateError::Aborted { .. }) if self.phase.before_swap() => {
                self.remove_everything().await?;
                Err(MigrateError::Aborted { id: self.id, table: self.table.to_string(), cleaned: true })
            }
            Err(MigrateError::Critical { id, table, phase, reason, .. }) if self.phase.before_swap() => {
                self.remove_everything().await?;
                let _ = state::set_error(&self.control, self.id, self.phase, &format!("critical: {reason}")).await;
                Err(MigrateError::Critical { id, table, phase, reason, cleaned: true })
            }
            Err(e) => {
                let _ = state::set_error(&self.control, self.id, self.phase, &e.to_string()).await;
                Err(e)
            }
        }
    }

    async fn remove_everything(&self) -> Result<(), MigrateError> {
        if let Ok(Some(m)) = state::migration(&self.control, self.id).await {
            cleanup::abort(&self.control, &m, &self.retry).await.map_err(|e| MigrateError::Refused(e.to_string()))?;
        }
        Ok(())
    }

    /// Runs the phases from `from` on. `plan` is needed from the shadow phase, `spec` after
    /// it; `resumed` is the migration as the last run left it.
    pub(super) async fn drive(
        &mut self,
        from: Phase,
        plan: Option<&Plan>,
        spec: Option<Spec>,
        resumed: Option<&Migration>,
    ) -> Result<Outcome, MigrateError> {
        let started = Instant::now();
        let mut outcome = Outcome {
            id: self.id,
            table: self.table.clone(),
            strategy: self.strategy,
            rows_copied: self.rows_before,
            rows_this_run: 0,
            copy_time: Duration::ZERO,
            total_time: Duration::ZERO,
            swap: None,
            cutover_attempts: 0,
            finished: false,
            unvalidated: Vec::new(),
            clients_held: None,
            resumed_from: None,
            rehearsal: None,
            version_schema: None,
        };
        if self.rehearse && self.meter.is_none() {
            let resumed_from = resumed.map(|m| m.phase);
            let meter = Meter::start(&self.control, plan, resumed_from).await;
            self.meter = Some(meter.during(self.id, self.phase, "starting the rehearsal's measurements")?);
        }
        let direct = self.strategy == Strategy::Instant;
        if direct || plan.is_some_and(|p| super::in_place::chosen(p, self.opts)) {
            let plan =
                plan.ok_or_else(|| MigrateError::Refused("nothing to resume in a catalog-only change".into()))?;
            if direct {
                self.run_directly(plan).await?;
            } else {
                self.in_place(plan).await?;
            }
            outcome.finished = true;
            outcome.total_time = started.elapsed();
            return Ok(outcome);
        }
        let spec = match spec {
            Some(s) => s,
            None => {
                let plan =
                    plan.ok_or_else(|| MigrateError::Refused("cannot rebuild the shadow without the plan".into()))?;
                self.enter(Phase::Shadow, "building the shadow table with the change applied").await?;
                let spec = shadow::create(&self.control, plan, self.id, &self.retry, self.rebuild_invalid).await?;
                let spec_json = serde_json::to_value(&spec).unwrap_or_default();
                state::set_spec(&self.control, self.id, &spec.work_schema, &spec.archive_schema, &spec_json)
                    .await
                    .during(self.id, Phase::Shadow, "recording the spec")?;
                spec
            }
        };
        self.live.update(|p| p.rows_estimated = spec.table.estimated_rows);
        if from <= Phase::Capture {
            let what = match self.capture {
                capture::Mode::Trigger => "installing the capture triggers",
                capture::Mode::Logical => "creating the publication and the replication slot",
            };
            self.enter(Phase::Capture, what).await?;
            if let Some(meter) = self.meter.as_mut() {
                self.reporter.note(&format!(
                    "rehearsal: counting the application's writes for {} s before the capture goes on",
                    self.opts.rehearse_baseline.as_secs_f64()
                ));
                let counted = meter.before_capture(&self.control, &self.table, self.opts.rehearse_baseline).await;
                counted.during(self.id, Phase::Capture, "counting the application's writes")?;
            }
            self.install_capture(&spec).await?;
        }
        if self.capture == capture::Mode::Logical && self.stream.is_none() {
            self.start_stream(&spec).await?;
        }
        let mut work = self.work_session().await?;
        catchup::prepare(&work, &spec).await.during(self.id, self.phase, "preparing catch-up")?;
        if from <= Phase::Copy {
            self.enter(Phase::Copy, "copying rows in keyset chunks").await?;
            let t = Instant::now();
            let copied = self.copy(&mut work, &spec, resumed.filter(|m| m.phase == Phase::Copy)).await?;
            outcome.rows_copied += copied;
            outcome.rows_this_run = copied;
            outcome.copy_time = t.elapsed();
            let slot = self.live.progress().slot_retained_bytes;
            let details = json!({"rows": copied, "jobs": self.opts.parallel.max(1), "slot_retained_bytes": slot});
            self.event("copy_done", &format!("copied {copied} rows"), Some(outcome.copy_time), Some(details)).await;
        }
        if from <= Phase::Index {
            self.build_indexes_and_verify(&work, &spec).await?;
        }
        if from <= Phase::Catchup {
            self.enter(Phase::Catchup, "applying captured changes").await?;
            if let Some(meter) = self.meter.as_mut() {
                let counted = meter.catchup_begins(&self.control, &spec).await;
                counted.during(self.id, Phase::Catchup, "counting the change backlog")?;
            }
            self.catch_up(&work, &spec).await?;
            if from > Phase::Index {
                // A resumed run checks the shadow again before the swap, and gathers the
                // planner's statistics meanwhile (the same pool, with no index to build).
                self.post_copy(&spec, Vec::new(), false).await?;
            }
            if !self.rehearse {
                self.wait_for_cutover(&work, &spec).await?;
            }
        }
        if self.rehearse {
            self.enter(Phase::Cutover, "rehearsal: taking the cut-over's lock once, then removing everything").await?;
            let meter = match self.meter.take() {
                Some(m) => m,
                None => Meter::start(&self.control, plan, Some(from)).await.during(self.id, self.phase, "measuring")?,
            };
            outcome.rehearsal = Some(self.rehearse(&spec, meter, &outcome).await?);
            outcome.total_time = started.elapsed();
            return Ok(outcome);
        }
        if from <= Phase::Cutover {
            self.enter(Phase::Cutover, "swapping the tables").await?;
            let missing =
                index::missing(&work, &spec).await.during(self.id, Phase::Cutover, "listing the shadow's indexes")?;
            if !missing.is_empty() {
                return Err(MigrateError::ShadowIncomplete {
                    id: self.id,
                    table: self.table.to_string(),
                    missing: missing.join(", "),
                });
            }
            let (swapped, attempts, held) = self.cut_over(&work, &spec).await?;
            outcome.swap = Some(swapped);
            outcome.cutover_attempts = attempts;
            outcome.clients_held = held;
        }
        self.phase = Phase::Swapped;
        self.end_capture_after_swap().await;
        self.live.update(|p| p.phase = Phase::Swapped.as_str().to_owned());
        self.reporter.phase(Phase::Swapped, "swapped");
        if let Some(hook) = &self.hook {
            hook(Phase::Swapped).await;
        }
        outcome.unvalidated = self.validate(&spec).await;
        if self.opts.finish {
            let m = state::migration(&self.control, self.id).await.during(
                self.id,
                Phase::Swapped,
                "reading the migration",
            )?;
            if let Some(m) = m {
                cleanup::finish(&self.control, &m).await.map_err(|e| MigrateError::Refused(e.to_string()))?;
                outcome.finished = true;
                self.phase = Phase::Finished;
            }
        }
        outcome.total_time = started.elapsed();
        Ok(outcome)
    }

    async fn copy(&mut self, work: &mut Client, spec: &Spec, resumed: Option<&Migration>) -> Result<i64, MigrateError> {
        let settings = self.live.settings();
        let sizer = copy::ChunkSizer::new(settings.chunk_time(), settings.chunk_rows);
        let checkpoint = resumed.and_then(|m| m.checkpoint.clone());
        let end = resumed.and_then(|m| m.copy_end.clone());
        let estimated = spec.table.estimated_rows;
        let mut helpers = Vec::new();
        for _ in 1..self.opts.parallel.max(1) {
            helpers.push(self.work_session().await?);
        }
        let copier = copy::Copier::start(work, spec, checkpoint, end.clone(), sizer, estimated, helpers).await.during(
            self.id,
            Phase::Copy,
            "starting the copy",
        )?;
        let Some(mut copier) = copier else { return Ok(0) };
        copier.sample_every = self.sample_every;
        if end.is_none() {
            self.control
                .execute("UPDATE ghostwire.migrations SET copy_end = $2 WHERE id = $1", &[&self.id, &copier.end])
                .await
                .during(self.id, Phase::Copy, "recording the copy's end")?;
        }
        let started = Instant::now();
        let mut last_report = Instant::now();
        let before = self.rows_before;
        loop {
            // A round an earlier run left unfinished completes first: until it does, the
            // checkpoint is not the end of what is copied, which applying the backlog between
            // chunks relies on (it drops the entries of keys the copy has yet to read).
            if !copier.finishing_a_round() {
                self.throttle(work, spec, Some(&copier)).await?;
            }
            let s = self.live.settings();
            copier.sizer.target = s.chunk_time();
            copier.sizer.max_rows = s.chunk_rows;
            copier.sizer.rows = copier.sizer.rows.clamp(1, s.chunk_rows);
            let Some(chunk) = copier.next(work, spec).await.during(self.id, Phase::Copy, "copying rows")? else {
                break;
            };
            let done = before + copier.total;
            let rate = copier.total as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let total = estimated.max(done);
            self.live.update(|p| {
                p.rows_copied = done;
                p.rows_per_second = rate;
                p.chunk_rows = chunk.next_size;
                p.eta_seconds = (rate > 0.0).then(|| (total - done).max(0) as f64 / rate);
            });
            if last_report.elapsed() >= Duration::from_millis(500) {
                last_report = Instant::now();
                self.reporter.progress(Phase::Copy, done, total, rate);
            }
            self.check_cancelled()?;
        }
        let done = before + copier.total;
        let rate = copier.total as f64 / started.elapsed().as_secs_f64().max(1e-3);
        self.reporter.progress(Phase::Copy, done, done, rate);
        work.batch_execute(&copy::drop_round_sql(self.id)).await.during(self.id, Phase::Copy, "ending the copy")?;
        Ok(copier.total)
    }

    fn post_copy_error(&self, e: post_copy::PostCopyError) -> MigrateError {
        let database = |phase, context: String, source| MigrateError::Database { id: self.id, phase, context, source };
        match e {
            post_copy::PostCopyError::Index(index::IndexError::Connect(c)) => MigrateError::Connect(c),
            post_copy::PostCopyError::Index(index::IndexError::Build { index, source }) => {
                database(Phase::Index, format!("building index {index}"), source)
            }
            post_copy::PostCopyError::Verify(source) => database(Phase::Verify, "verifying".into(), source),
            post_copy::PostCopyError::Analyze(source) => {
                database(self.phase, "vacuuming and analyzing the shadow".into(), source)
            }
            post_copy::PostCopyError::Worker(w) => MigrateError::Refused(w),
        }
    }

    /// Phases `index` and `verify` on one pool of sessions (`post_copy`): the `verify` phase
    /// is entered once the key index exists, while the other indexes may still be building.
    async fn build_indexes_and_verify(&mut self, work: &Client, spec: &Spec) -> Result<(), MigrateError> {
        let have = index::existing(work, spec).await.during(self.id, Phase::Index, "listing the shadow's indexes")?;
        let missing: Vec<_> = spec.deferred_indexes.iter().filter(|d| !have.contains(&d.name)).cloned().collect();
        self.enter(Phase::Index, &format!("building {} index(es)", missing.len())).await?;
        self.post_copy(spec, missing, true).await?;
        index::attach_constraints(work, spec).await.map_err(|e| self.post_copy_error(e.into()))?;
        Ok(())
    }

    /// Builds `builds`, analyzes the shadow and (unless `--verify none`) verifies it, on one
    /// pool of sessions; records the builds (with `record_builds`) and the verification, and
    /// stops on a difference without a pending change.
    async fn post_copy(
        &mut self,
        spec: &Spec,
        builds: Vec<DeferredIndex>,
        record_builds: bool,
    ) -> Result<(), MigrateError> {
        let verify_rows = self.opts.verify.then_some(self.opts.verify_range_rows);
        let mut pool = post_copy::Pool::start(
            self.session(),
            spec,
            builds,
            self.opts.parallel,
            verify_rows,
            self.sample_every,
            &self.cancel,
        );
        let mut verifying = None;
        if verify_rows.is_some() && pool.key_index_ready().await {
            self.enter(Phase::Verify, "comparing the original and the shadow (other indexes may still be building)")
                .await?;
            verifying = Some(Instant::now());
            pool.open_verification();
        }
        let done = pool.finish().await.map_err(|e| self.post_copy_error(e))?;
        self.check_cancelled()?;
        if record_builds {
            let details = json!(
                done.built.iter().map(|(n, d)| json!({"index": n, "ms": d.as_secs_f64() * 1000.0})).collect::<Vec<_>>()
            );
            let message = format!("built {} index(es)", done.built.len());
            self.event("index_done", &message, Some(done.builds_took), Some(details)).await;
        }
        match (verify_rows, done.report, verifying) {
            (None, ..) => self.event("verify_skipped", "verification skipped (--verify none)", None, None).await,
            (Some(_), Some(report), Some(started)) => self.judge(spec, &report, started.elapsed()).await?,
            // Not reached: the pool ends without verifying only when it fails or is cancelled.
            (Some(_), ..) => {
                return Err(MigrateError::Refused(format!(
                    "the verification of migration #{} did not run; `ghostwire resume {}` runs it",
                    self.id, self.table
                )));
            }
        }
        Ok(())
    }

    /// Applies change-log batches until one comes back short; returns the last batch's
    /// transaction id. Asks the throttle before each batch.
    pub(super) async fn catch_up(&mut self, work: &Client, spec: &Spec) -> Result<i64, MigrateError> {
        let mut applied = 0;
        loop {
            self.throttle(work, spec, None).await?;
            let b = catchup::batch(work, spec, self.opts.catchup_batch).await.during(
                self.id,
                self.phase,
                "applying captured changes",
            )?;
            applied += b.entries;
            if b.entries < self.opts.catchup_batch {
                if applied > 0 {
                    self.reporter.note(&format!("applied {applied} captured change(s)"));
                }
                return Ok(b.xid.unwrap_or(0));
            }
        }
    }

    /// With `--postpone-cutover`: keeps the shadow in step until the cut-over is allowed.
    async fn wait_for_cutover(&mut self, work: &Client, spec: &Spec) -> Result<(), MigrateError> {
        if self.live.cutover_allowed() {
            return Ok(());
        }
        self.enter(Phase::Catchup, "cut-over postponed: keeping the shadow in step until it is allowed").await?;
        self.event("cutover_postponed", "cut-over postponed", None, None).await;
        self.reporter
            .note("cut-over postponed: keeping the shadow in step (allow it with `ghostwire cutover --control ADDR`)");
        let waited = Instant::now();
        self.live.update(|p| p.awaiting_cutover = true);
        while !self.live.cutover_allowed() {
            self.catch_up(work, spec).await?;
            self.live.wait_for_change(Duration::from_millis(500)).await;
            self.check_cancelled()?;
        }
        self.live.update(|p| p.awaiting_cutover = false);
        self.event("cutover_allowed", "cut-over allowed", Some(waited.elapsed()), None).await;
        Ok(())
    }

    /// Records a verification's findings; a difference without a pending change stops the run.
    async fn judge(&self, spec: &Spec, report: &verify::Report, took: Duration) -> Result<(), MigrateError> {
        let details = json!({"ranges": report.ranges, "rows": report.rows, "pending": report.pending,
                             "unexplained": report.unexplained.len(), "matched_by_key": report.matched_by_key});
        self.event(
            "verify_done",
            &format!("verified {} rows in {} ranges", report.rows, report.ranges),
            Some(took),
            Some(details),
        )
        .await;
        let unexplained = self.unexplained_after_fence(spec, &report.unexplained).await?;
        if !unexplained.is_empty() {
            let report = verify::Report { unexplained, ..report.clone() };
            let sample: Vec<String> = report.unexplained.iter().take(5).cloned().collect();
            return Err(MigrateError::Mismatch {
                id: self.id,
                table: spec.original.to_string(),
                count: report.unexplained.len(),
                sample: sample.join(", "),
            });
        }
        Ok(())
    }

    /// Validates the foreign keys added NOT VALID during the swap (different tables' at once,
    /// see `validate`); returns those that failed.
    async fn validate(&self, spec: &Spec) -> Vec<String> {
        let list = super::swap::script(spec).validations;
        let done = super::validate::all(&self.session(), &self.control, &self.retry, self.opts.parallel, list).await;
        for v in &done {
            if v.error.is_some() {
                self.reporter.note(&v.message());
            }
            self.event("validate", &v.message(), Some(v.took), None).await;
        }
        done.into_iter().filter(|v| v.error.is_some()).map(|v| v.validation.what).collect()
    }
}
