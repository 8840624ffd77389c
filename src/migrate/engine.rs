//! The orchestrator: an explicit state machine over the phases of DESIGN.md §2.
//!
//! planned → shadow → capture → copy → index → catchup → verify → cutover → swapped
//! (→ finished with `--finish`). Each phase is recorded in `ghostwire.migrations` before it
//! starts; a failure is recorded with the phase it happened in. The engine owns the one
//! cancellation token; connections of a run are named `ghostwire migrate #<id>` so that
//! `abort` can find and stop them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;

use super::cutover::Swapped;
use super::error::{Context, MigrateError};
use super::retry::{self, RetryPolicy};
use super::spec::Spec;
use super::{capture, catchup, cleanup, copy, index, shadow, swap, verify};
use crate::db;
use crate::plan::{self, Plan, Strategy};
use crate::sql::{QualifiedName, literal};
use crate::state::{self, Phase};

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Target time per copy chunk.
    pub chunk_time: Duration,
    /// The most rows in one chunk.
    pub chunk_rows: i64,
    /// `lock_timeout` for every lock on the live table.
    pub lock_timeout: Duration,
    pub cutover_attempts: u32,
    /// Drop the old table right after the swap.
    pub finish: bool,
    /// Consent to a change that cannot be reverted.
    pub yes: bool,
    /// Concurrent index builds and verification workers.
    pub parallel: usize,
    /// Change-log entries per catch-up batch.
    pub catchup_batch: i64,
    /// Rows per verification range.
    pub verify_range_rows: i64,
    /// Compare the shadow with the original before the swap.
    pub verify: bool,
    /// Control APIs of the proxies to drain around each swap attempt.
    pub proxies: Vec<String>,
    /// How long a proxy may stay closed for one attempt (draining and swapping); the proxy
    /// reopens by itself after it.
    pub drain_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_time: Duration::from_millis(250),
            chunk_rows: 1_000_000,
            lock_timeout: Duration::from_millis(100),
            cutover_attempts: 30,
            finish: false,
            yes: false,
            parallel: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            catchup_batch: 5_000,
            verify_range_rows: 50_000,
            verify: true,
            proxies: Vec::new(),
            drain_timeout: Duration::from_secs(2),
        }
    }
}

/// Where a run reports what it does (the CLI prints; tests stay quiet).
pub trait Reporter: Send + Sync {
    fn phase(&self, _phase: Phase, _message: &str) {}
    fn progress(&self, _phase: Phase, _done: i64, _total: i64, _rows_per_second: f64) {}
    fn note(&self, _message: &str) {}
}

/// A reporter that says nothing.
pub struct Silent;
impl Reporter for Silent {}

/// Called as each phase starts (tests use it to write during every phase).
pub type PhaseHook = Arc<dyn Fn(Phase) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: i64,
    pub table: QualifiedName,
    pub strategy: Strategy,
    pub rows_copied: i64,
    pub copy_time: Duration,
    pub total_time: Duration,
    pub swap: Option<Swapped>,
    pub cutover_attempts: u32,
    /// The old table was dropped (`--finish`).
    pub finished: bool,
    /// Foreign keys left NOT VALID because validation failed after the swap.
    pub unvalidated: Vec<String>,
    /// How long the proxies held clients for the swap (with `--proxy`).
    pub clients_held: Option<Duration>,
}

/// The connection settings of every ghostwire session: named, and failing rather than
/// silently filtered by row-level security.
pub fn session_config(config: &Config, name: &str) -> Config {
    let mut c = config.clone();
    c.application_name(name);
    let options =
        c.get_options().map(|o| format!("{o} -c row_security=off")).unwrap_or_else(|| "-c row_security=off".into());
    c.options(&options);
    c
}

pub(super) struct Run<'a> {
    pub(super) config: Config,
    pub(super) control: Client,
    pub(super) opts: &'a Options,
    pub(super) reporter: &'a dyn Reporter,
    pub(super) hook: Option<PhaseHook>,
    pub(super) cancel: CancellationToken,
    pub(super) retry: RetryPolicy,
    pub(super) id: i64,
    pub(super) phase: Phase,
}

/// Runs `statement` online. Refusals (bad input, another migration) come before anything
/// is changed.
pub async fn migrate(
    config: &Config,
    statement: &str,
    opts: &Options,
    reporter: &dyn Reporter,
    hook: Option<PhaseHook>,
    cancel: CancellationToken,
) -> Result<Outcome, MigrateError> {
    let mut control = db::connect(&session_config(config, "ghostwire migrate")).await?;
    // Planning changes nothing; bad input is refused before the state schema even exists.
    let plan = plan::plan(&mut control, statement).await?;
    if !plan.revertible && !opts.yes {
        return Err(MigrateError::NeedsConsent(format!(
            "this change cannot be reverted ({}); pass --yes to run it anyway",
            plan.revert_notes.join("; ")
        )));
    }
    state::ensure_schema(&mut control).await.map_err(|e| MigrateError::Plan(e.into()))?;
    if !state::try_lock_table(&control, &plan.table).await.map_err(|e| MigrateError::Plan(e.into()))? {
        let pid = state::lock_holder(&control, &plan.table).await.ok().flatten().unwrap_or(0);
        return Err(MigrateError::Busy { table: plan.table.to_string(), pid });
    }
    if let Some(m) = state::active_migration(&control, &plan.table).await.map_err(|e| MigrateError::Plan(e.into()))? {
        return Err(MigrateError::Unfinished { table: m.table.to_string(), id: m.id, phase: m.phase, error: m.error });
    }
    let settings = json!({
        "chunk_time_ms": opts.chunk_time.as_millis() as u64, "chunk_rows": opts.chunk_rows,
        "lock_timeout_ms": opts.lock_timeout.as_millis() as u64, "cutover_attempts": opts.cutover_attempts,
        "finish": opts.finish,
    });
    let def = &plan.table_def;
    let id = state::insert_migration(
        &control,
        &def.name,
        def.oid,
        &plan.statement,
        plan.strategy.as_str(),
        def.estimated_rows,
        &settings,
    )
    .await
    .during(0, Phase::Planned, "recording the migration")?;
    control
        .batch_execute(&format!("SET application_name = {}", literal(&format!("ghostwire migrate #{id}"))))
        .await
        .during(id, Phase::Planned, "naming the session")?;
    let retry = RetryPolicy {
        lock_timeout: opts.lock_timeout,
        attempts: opts.cutover_attempts.max(1),
        ..RetryPolicy::default()
    };
    let mut run =
        Run { config: config.clone(), control, opts, reporter, hook, cancel, retry, id, phase: Phase::Planned };
    state::event(
        &run.control,
        id,
        Phase::Planned,
        "plan",
        &plan.summary,
        None,
        Some(json!({ "steps": plan.steps.len() })),
    )
    .await
    .during(id, Phase::Planned, "recording the plan")?;
    let result = run.execute(&plan).await;
    if let Err(e) = &result
        && !matches!(e, MigrateError::Aborted { .. })
    {
        let _ = state::set_error(&run.control, id, run.phase, &e.to_string()).await;
    }
    result
}

impl Run<'_> {
    fn session(&self) -> Config {
        session_config(&self.config, &format!("ghostwire migrate #{}", self.id))
    }

    async fn enter(&mut self, phase: Phase, message: &str) -> Result<(), MigrateError> {
        self.check_cancelled()?;
        self.phase = phase;
        state::set_phase(&self.control, self.id, phase, message).await.during(self.id, phase, "recording the phase")?;
        self.reporter.phase(phase, message);
        if let Some(hook) = &self.hook {
            hook(phase).await;
        }
        Ok(())
    }

    pub(super) fn check_cancelled(&self) -> Result<(), MigrateError> {
        if self.cancel.is_cancelled() {
            return Err(MigrateError::Aborted { id: self.id, table: String::new(), cleaned: false });
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

    async fn execute(&mut self, plan: &Plan) -> Result<Outcome, MigrateError> {
        let started = Instant::now();
        let mut outcome = Outcome {
            id: self.id,
            table: plan.table.clone(),
            strategy: plan.strategy,
            rows_copied: 0,
            copy_time: Duration::ZERO,
            total_time: Duration::ZERO,
            swap: None,
            cutover_attempts: 0,
            finished: false,
            unvalidated: Vec::new(),
            clients_held: None,
        };
        if plan.strategy == Strategy::Instant {
            self.enter(Phase::Cutover, "running the statement directly (catalog-only change)").await?;
            let t = Instant::now();
            retry::ddl(&self.control, &self.retry, "running the statement", &plan.parsed.text).await.during(
                self.id,
                Phase::Cutover,
                "running the statement",
            )?;
            self.event("statement", "statement run", Some(t.elapsed()), None).await;
            self.enter(Phase::Finished, "finished").await?;
            outcome.finished = true;
            outcome.total_time = started.elapsed();
            return Ok(outcome);
        }

        self.enter(Phase::Shadow, "building the shadow table with the change applied").await?;
        let spec = shadow::create(&self.control, plan, self.id, &self.retry).await?;
        let spec_json = serde_json::to_value(&spec).unwrap_or_default();
        state::set_spec(&self.control, self.id, &spec.work_schema, &spec.archive_schema, &spec_json).await.during(
            self.id,
            Phase::Shadow,
            "recording the spec",
        )?;

        self.enter(Phase::Capture, "installing the capture triggers").await?;
        capture::install(&self.control, &spec, &self.retry).await.during(
            self.id,
            Phase::Capture,
            "installing the capture triggers",
        )?;

        self.enter(Phase::Copy, "copying rows in keyset chunks").await?;
        let mut work = db::connect(&self.session()).await?;
        // A chunk and its checkpoint commit together, so an asynchronous commit lost in a
        // crash loses both: safe, and no flush wait per chunk.
        work.batch_execute("SET synchronous_commit = off").await.during(
            self.id,
            Phase::Copy,
            "preparing the copy session",
        )?;
        let t = Instant::now();
        outcome.rows_copied = self.copy(&mut work, &spec, plan.estimated_rows).await?;
        outcome.copy_time = t.elapsed();
        self.event("copy_done", &format!("copied {} rows", outcome.rows_copied), Some(outcome.copy_time), None).await;

        self.enter(Phase::Index, &format!("building {} index(es)", spec.deferred_indexes.len())).await?;
        let t = Instant::now();
        let built = index::build(&self.session(), &spec.deferred_indexes, self.opts.parallel, &self.cancel)
            .await
            .map_err(|e| match e {
                index::IndexError::Connect(c) => MigrateError::Connect(c),
                index::IndexError::Build { index, source } => MigrateError::Database {
                    id: self.id,
                    phase: Phase::Index,
                    context: format!("building index {index}"),
                    source,
                },
                index::IndexError::Worker(w) => MigrateError::Refused(w),
            })?;
        self.check_cancelled()?;
        let details =
            json!(built.iter().map(|(n, d)| json!({"index": n, "ms": d.as_secs_f64() * 1000.0})).collect::<Vec<_>>());
        self.event("index_done", &format!("built {} index(es)", built.len()), Some(t.elapsed()), Some(details)).await;

        self.enter(Phase::Catchup, "applying captured changes").await?;
        catchup::prepare(&work, &spec).await.during(self.id, Phase::Catchup, "preparing catch-up")?;
        self.catch_up(&work, &spec).await?;
        work.batch_execute(&format!("ANALYZE {}", spec.shadow().sql())).await.during(
            self.id,
            Phase::Catchup,
            "analyzing the shadow",
        )?;
        self.catch_up(&work, &spec).await?;

        if self.opts.verify {
            self.verify(&spec).await?;
        } else {
            self.event("verify_skipped", "verification skipped (--verify none)", None, None).await;
        }

        self.enter(Phase::Cutover, "swapping the tables").await?;
        let (swapped, attempts, held) = self.cut_over(&work, &spec).await?;
        outcome.swap = Some(swapped);
        outcome.clients_held = held;
        outcome.cutover_attempts = attempts;
        self.phase = Phase::Swapped;
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

    async fn verify(&mut self, spec: &Spec) -> Result<(), MigrateError> {
        self.enter(Phase::Verify, "comparing the original and the shadow").await?;
        let t = Instant::now();
        let report = verify::run(&self.session(), spec, self.opts.verify_range_rows, self.opts.parallel, &self.cancel)
            .await
            .map_err(|e| match e {
                verify::VerifyError::Connect(c) => MigrateError::Connect(c),
                verify::VerifyError::Database(d) => {
                    MigrateError::Database { id: self.id, phase: Phase::Verify, context: "verifying".into(), source: d }
                }
                verify::VerifyError::Worker(w) => MigrateError::Refused(w),
            })?;
        self.check_cancelled()?;
        let details = json!({"ranges": report.ranges, "rows": report.rows, "pending": report.pending,
                             "unexplained": report.unexplained.len(), "matched_by_key": report.matched_by_key});
        self.event(
            "verify_done",
            &format!("verified {} rows in {} ranges", report.rows, report.ranges),
            Some(t.elapsed()),
            Some(details),
        )
        .await;
        if !report.unexplained.is_empty() {
            let sample: Vec<String> =
                report.unexplained.iter().take(5).map(|k| format!("({})", k.join(", "))).collect();
            return Err(MigrateError::Mismatch {
                id: self.id,
                table: spec.original.to_string(),
                count: report.unexplained.len(),
                sample: sample.join(", "),
            });
        }

        Ok(())
    }

    async fn copy(&mut self, work: &mut Client, spec: &Spec, estimated: i64) -> Result<i64, MigrateError> {
        let mut sizer = copy::ChunkSizer::new(self.opts.chunk_time, self.opts.chunk_rows);
        let started = Instant::now();
        let mut done = 0i64;
        let mut last_report = Instant::now();
        let reporter = self.reporter;
        let total = copy::run(work, spec, None, &mut sizer, estimated, &self.cancel, |chunk| {
            done += chunk.rows;
            if last_report.elapsed() >= Duration::from_millis(500) {
                last_report = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
                reporter.progress(Phase::Copy, done, estimated.max(done), rate);
            }
        })
        .await
        .during(self.id, Phase::Copy, "copying rows")?;
        self.check_cancelled()?;
        let rate = total as f64 / started.elapsed().as_secs_f64().max(1e-3);
        self.reporter.progress(Phase::Copy, total, total, rate);
        Ok(total)
    }

    /// Applies change-log batches until a batch comes back short; returns the last batch's
    /// transaction id.
    pub(super) async fn catch_up(&self, work: &Client, spec: &Spec) -> Result<i64, MigrateError> {
        let mut applied = 0;
        loop {
            self.check_cancelled()?;
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

    /// Validates the foreign keys added NOT VALID during the swap; returns those that failed.
    async fn validate(&self, spec: &Spec) -> Vec<String> {
        let mut failed = Vec::new();
        for (what, sql) in swap::script(spec).validations {
            let t = Instant::now();
            match retry::ddl(&self.control, &self.retry, &format!("validating {what}"), &sql).await {
                Ok(()) => self.event("validate", &format!("validated {what}"), Some(t.elapsed()), None).await,
                Err(e) => {
                    let msg = format!("could not validate {what} ({e}); it stays NOT VALID");
                    self.reporter.note(&msg);
                    self.event("validate", &msg, Some(t.elapsed()), None).await;
                    failed.push(what);
                }
            }
        }
        failed
    }
}
