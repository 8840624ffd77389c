//! The batches: one short transaction each, its checkpoint committed with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement as Prepared};
use tokio_util::sync::CancellationToken;

use super::statement::{self, Kind};
use super::target::Target;
use super::{BackfillError, Options, STRATEGY};
use crate::connect::{self, Params as Config};
use crate::operate::holdback::{Holdback, Turn};
use crate::operate::throttle::{self, Verdict};
use crate::operate::{ChunkSizer, Live, Reporter, retry};
use crate::sql::{QualifiedName, with_keys};
use crate::state::{self, Migration, Phase};

/// What drives a backfill from outside: its reporter, Ctrl-C, and the live state the
/// control API shares.
pub struct Context<'a> {
    pub reporter: &'a dyn Reporter,
    pub cancel: CancellationToken,
    pub live: Arc<Live>,
}

/// What a backfill did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub id: i64,
    pub table: String,
    pub kind: Kind,
    /// Rows the statement changed, over every run of this backfill.
    pub rows_changed: i64,
    /// Batches this run committed.
    pub batches: i64,
    pub seconds: f64,
    /// The longest a batch's transaction ran (its row locks were held at most this long).
    pub longest_batch_ms: f64,
    /// Batches rolled back and retried smaller (a lock or statement timeout, a deadlock).
    pub retries: u32,
    pub throttled_seconds: f64,
    pub resumed: bool,
}

/// Runs `sql` in batches.
pub async fn backfill(config: &Config, sql: &str, opts: &Options, ctx: &Context<'_>) -> Result<Outcome, BackfillError> {
    let parsed = statement::parse(sql)?;
    let mut control = connect::connect(&session(config, "ghostwire backfill")).await?;
    let target = Target::of(&mut control, parsed).await?;
    state::ensure_schema(&mut control).await.map_err(BackfillError::db("creating the ghostwire schema"))?;
    claim(&control, &target.table, None).await?;
    let end: Option<Vec<String>> = control
        .query_opt(&target.last_key_sql(), &[])
        .await
        .map_err(BackfillError::db("reading the table's last key"))?
        .map(|r| r.get(0));
    let settings = opts.to_json();
    let spec = serde_json::to_value(&target).unwrap_or_default();
    let id = state::insert_migration(
        &control,
        &target.table,
        target.oid,
        &target.statement.text,
        STRATEGY,
        target.estimated_rows,
        &settings,
    )
    .await
    .map_err(BackfillError::db("recording the backfill"))?;
    control
        .execute("UPDATE ghostwire.migrations SET copy_end = $2, spec = $3 WHERE id = $1", &[&id, &end, &spec])
        .await
        .map_err(BackfillError::db("recording the backfill"))?;
    let what = format!(
        "{} in batches over ({}), up to the key {}",
        target.statement.kind.as_str(),
        target.key.join(", "),
        end.as_ref().map(|e| e.join(", ")).unwrap_or_else(|| "(the table is empty)".into())
    );
    state::set_phase(&control, id, Phase::Backfill, &what)
        .await
        .map_err(BackfillError::db("recording the backfill"))?;
    ctx.reporter.phase(Phase::Backfill, &what);
    let run = Runner::new(config, control, id, target, opts, ctx);
    run.go(end).await
}

/// Goes on with an unfinished backfill after its last committed batch.
pub async fn resume(
    config: &Config,
    m: &Migration,
    opts: &Options,
    ctx: &Context<'_>,
) -> Result<Outcome, BackfillError> {
    let control = connect::connect(&session(config, "ghostwire backfill")).await?;
    let target: Target = m
        .spec
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| BackfillError::Refused(format!("backfill #{} has no spec to resume from", m.id)))?;
    claim(&control, &target.table, Some(m.id)).await?;
    let message = format!("resumed after {} row(s)", m.rows_copied);
    state::set_phase(&control, m.id, Phase::Backfill, &message)
        .await
        .map_err(BackfillError::db("recording the resume"))?;
    ctx.reporter.phase(Phase::Backfill, &message);
    let run = Runner::new(config, control, m.id, target, opts, ctx).resuming(m.checkpoint.clone(), m.rows_copied);
    run.go(m.copy_end.clone()).await
}

/// Ends an unfinished backfill that no process runs (one that runs is asked to stop).
pub async fn abort(control: &Client, m: &Migration) -> Result<bool, tokio_postgres::Error> {
    if state::lock_holder(control, &m.table).await?.is_some() {
        state::request_abort(control, m.id).await?;
        return Ok(false);
    }
    let message = format!("aborted after {} row(s); the batches done stay done", m.rows_copied);
    state::set_phase(control, m.id, Phase::Aborted, &message).await?;
    Ok(true)
}

fn session(config: &Config, name: &str) -> Config {
    config.named(name).with_setting("row_security", "off")
}

/// Takes the table's advisory lock for the run, or says who has it; refuses a table with
/// another unfinished run (`resuming`: the backfill being resumed is not another).
async fn claim(control: &Client, table: &QualifiedName, resuming: Option<i64>) -> Result<(), BackfillError> {
    // The session of a run that just ended (the statement before, in `apply`) may hold the
    // lock a moment longer.
    let grace = std::time::Duration::from_secs(3);
    let held = !state::lock_table_within(control, table, grace).await.map_err(BackfillError::db("locking the run"))?;
    if held {
        let pid = state::lock_holder(control, table).await.ok().flatten();
        return Err(BackfillError::Refused(format!(
            "another ghostwire run works on {table}{}; wait for it or stop it",
            pid.map(|p| format!(" (server pid {p})")).unwrap_or_default()
        )));
    }
    let active = state::active_migration(control, table).await.map_err(BackfillError::db("reading the state"))?;
    match active {
        Some(m) if Some(m.id) != resuming && m.strategy == STRATEGY => Err(BackfillError::Refused(format!(
            "backfill #{} of {table} is unfinished: `ghostwire resume {table}` goes on with it, `ghostwire abort \
             {table}` ends it",
            m.id
        ))),
        Some(m) if Some(m.id) != resuming => Err(BackfillError::Refused(format!(
            "migration #{} of {table} is unfinished (phase {}): finish, revert or abort it first",
            m.id, m.phase
        ))),
        _ => Ok(()),
    }
}

/// The batch's statements, prepared once on the batch session.
struct Statements {
    upper_first: Prepared,
    upper_after: Prepared,
    batch_first: Prepared,
    batch_after: Prepared,
    checkpoint: Prepared,
}

struct Runner<'a> {
    config: Config,
    control: Client,
    id: i64,
    target: Target,
    opts: &'a Options,
    ctx: &'a Context<'a>,
    checkpoint: Option<Vec<String>>,
    rows: i64,
    resumed: bool,
    holdback: Holdback,
}

/// Worth another, smaller attempt: a lock or statement timeout, a deadlock, a conflict.
fn retryable(e: &tokio_postgres::Error) -> bool {
    retry::is_lock_conflict(e) || e.code() == Some(&SqlState::QUERY_CANCELED)
}

impl<'a> Runner<'a> {
    fn new(config: &Config, control: Client, id: i64, target: Target, opts: &'a Options, ctx: &'a Context<'a>) -> Self {
        Runner {
            config: config.clone(),
            control,
            id,
            target,
            opts,
            ctx,
            checkpoint: None,
            rows: 0,
            resumed: false,
            holdback: Holdback::default(),
        }
    }

    /// Goes on after the last committed batch (`checkpoint`), `rows` already changed.
    fn resuming(self, checkpoint: Option<Vec<String>>, rows: i64) -> Self {
        Runner { checkpoint, rows, resumed: true, ..self }
    }

    fn table(&self) -> String {
        self.target.table.to_string()
    }

    async fn event(&self, kind: &str, message: &str, took: Option<Duration>, details: Option<serde_json::Value>) {
        let ms = took.map(|d| d.as_secs_f64() * 1e3);
        if let Err(e) = state::event(&self.control, self.id, Phase::Backfill, kind, message, ms, details).await {
            tracing::warn!("could not record a backfill event: {}", connect::describe(&e));
        }
    }

    /// `e`, recorded on the run (its phase kept: resumable).
    async fn recorded(&self, e: BackfillError) -> BackfillError {
        let _ = state::set_error(&self.control, self.id, Phase::Backfill, &e.to_string()).await;
        e
    }

    async fn fail(&self, what: &str, cause: String) -> BackfillError {
        let (id, table, rows) = (self.id, self.table(), self.rows);
        self.recorded(BackfillError::Failed { id, table, rows, what: what.into(), cause }).await
    }

    async fn stop(&self, reason: String) -> BackfillError {
        let (id, table, rows) = (self.id, self.table(), self.rows);
        self.recorded(BackfillError::Stopped { id, table, rows, reason }).await
    }

    async fn prepare(&self, work: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            upper_first: work.prepare(&self.target.upper_sql(false)).await?,
            upper_after: work.prepare(&self.target.upper_sql(true)).await?,
            batch_first: work.prepare(&self.target.batch_sql(false)).await?,
            batch_after: work.prepare(&self.target.batch_sql(true)).await?,
            checkpoint: work
                .prepare(
                    "UPDATE ghostwire.migrations SET checkpoint = $2::text[], rows_copied = rows_copied + $3,
                            updated_at = now() WHERE id = $1",
                )
                .await?,
        })
    }

    /// Waits while a throttle signal is over its limit; Err when one is over its critical
    /// limit or the run is to stop.
    async fn pace(&mut self) -> Result<(), BackfillError> {
        loop {
            self.stop_requested().await?;
            let settings = self.ctx.live.settings();
            let signals = throttle::read(&self.control, &settings, Ok(0), self.ctx.live.paused(), None).await;
            match throttle::judge(&settings, &signals) {
                Verdict::Go => {
                    if let Some(turn) = self.holdback.release() {
                        self.show_turn(turn).await;
                    }
                    return Ok(());
                }
                Verdict::Critical(reason) => {
                    self.event("critical", &reason, None, None).await;
                    return Err(self.stop(reason).await);
                }
                Verdict::Throttle(reason) => {
                    if let Some(turn) = self.holdback.hold(&reason) {
                        self.show_turn(turn).await;
                    }
                    self.ctx.live.wait_for_change(Duration::from_millis(250)).await;
                }
            }
        }
    }

    async fn show_turn(&self, turn: Turn) {
        let (kind, message, took, details) = turn.event();
        self.event(kind, &message, took, details).await;
        turn.show(&self.control, self.id, &self.ctx.live, self.ctx.reporter).await;
    }

    /// Err when Ctrl-C, the control API or `ghostwire abort` asked the run to stop.
    async fn stop_requested(&self) -> Result<(), BackfillError> {
        if self.ctx.cancel.is_cancelled() {
            return Err(self.stop("interrupted".into()).await);
        }
        let asked =
            self.ctx.live.abort_requested() || state::abort_requested(&self.control, self.id).await.unwrap_or(false);
        if asked {
            let message = format!("aborted after {} row(s); the batches done stay done", self.rows);
            let _ = state::set_phase(&self.control, self.id, Phase::Aborted, &message).await;
            self.ctx.reporter.note(&message);
            return Err(BackfillError::Aborted { id: self.id, table: self.table(), rows: self.rows });
        }
        Ok(())
    }

    async fn go(mut self, end: Option<Vec<String>>) -> Result<Outcome, BackfillError> {
        let started = Instant::now();
        let (mut batches, mut retries, mut longest, mut waited) = (0i64, 0u32, Duration::ZERO, Duration::ZERO);
        if let Some(end) = end.filter(|e| self.checkpoint.as_ref() != Some(e)) {
            let name = format!("ghostwire backfill #{}", self.id);
            let work = connect::connect(&session(&self.config, &name)).await?;
            work.batch_execute("SET synchronous_commit = off")
                .await
                .map_err(BackfillError::db("preparing the batch session"))?;
            let st = match self.prepare(&work).await {
                Ok(st) => st,
                Err(e) => return Err(self.fail("preparing the batches", connect::describe(&e)).await),
            };
            let settings = self.ctx.live.settings();
            let mut sizer = ChunkSizer::new(settings.chunk_time(), settings.chunk_rows);
            let (mut walked, mut failures) = (0i64, 0u32);
            let mut last_event = Instant::now();
            let pauses = retry::RetryPolicy { lock_timeout: self.opts.lock_timeout, ..Default::default() };
            let total = self.target.estimated_rows.max(1);
            loop {
                self.pace().await?;
                let s = self.ctx.live.settings();
                (sizer.target, sizer.max_rows) = (s.chunk_time(), s.chunk_rows);
                sizer.rows = sizer.rows.min(sizer.max_rows);
                let skip = sizer.rows - 1;
                let found = match &self.checkpoint {
                    None => work.query_opt(&st.upper_first, &with_keys(vec![&skip], &[&end])).await,
                    Some(lo) => work.query_opt(&st.upper_after, &with_keys(vec![&skip], &[lo, &end])).await,
                };
                let (upper, last) = match found {
                    Ok(Some(row)) => (row.get::<_, Vec<String>>(0), false),
                    Ok(None) => (end.clone(), true),
                    Err(e) => return Err(self.fail("finding the next batch's last key", connect::describe(&e)).await),
                };
                let t = Instant::now();
                let result = self.batch(&work, &st, &upper).await;
                let took = t.elapsed();
                match result {
                    Ok(n) => {
                        failures = 0;
                        batches += 1;
                        longest = longest.max(took);
                        self.rows += n;
                        walked += if last { 0 } else { sizer.rows };
                        sizer.observe(if last { 0 } else { sizer.rows }, took);
                        self.checkpoint = Some(upper);
                        metrics::counter!("ghostwire_backfill_rows_total").increment(n as u64);
                        metrics::histogram!("ghostwire_backfill_batch_seconds").record(took.as_secs_f64());
                    }
                    Err(e) if retryable(&e) && failures + 1 < self.opts.attempts => {
                        failures += 1;
                        retries += 1;
                        waited += took;
                        sizer.rows = (sizer.rows / 2).max(1);
                        let why = connect::describe(&e);
                        let message = format!("batch rolled back ({why}); retrying with {} keys", sizer.rows);
                        self.event("batch_retry", &message, Some(took), None).await;
                        self.ctx.reporter.note(&message);
                        retry::pause_unless_closed(&work, pauses.pause(failures)).await;
                        continue;
                    }
                    Err(e) => return Err(self.fail("running a batch", connect::describe(&e)).await),
                }
                let rate = walked as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let shown = if last { total } else { walked.min(total) };
                self.ctx.reporter.progress(Phase::Backfill, shown, total, rate);
                self.ctx.live.update(|p| {
                    p.rows_copied = shown;
                    p.rows_estimated = total;
                    p.rows_changed = self.rows;
                    p.rows_per_second = rate;
                    p.chunk_rows = sizer.rows;
                    p.eta_seconds = (rate > 0.0).then(|| (total - shown).max(0) as f64 / rate);
                });
                if last_event.elapsed() >= Duration::from_secs(10) {
                    last_event = Instant::now();
                    let details = json!({"batches": batches, "rows": self.rows, "batch_keys": sizer.rows});
                    self.event(
                        "progress",
                        &format!("{} row(s) changed in {batches} batch(es)", self.rows),
                        None,
                        Some(details),
                    )
                    .await;
                }
                if last {
                    break;
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let details = json!({"batches": batches, "rows": self.rows, "retries": retries,
                             "longest_batch_ms": longest.as_secs_f64() * 1e3, "throttled_s": self.holdback.total().as_secs_f64()});
        let message = format!("backfill done: {} row(s) changed, {batches} batch(es) in this run", self.rows);
        self.event("backfill_done", &message, Some(started.elapsed()), Some(details)).await;
        let _ = self
            .control
            .execute(
                "UPDATE ghostwire.migrations SET lock_wait_ms = coalesce(lock_wait_ms, 0) + $2,
                        lock_hold_ms = greatest(coalesce(lock_hold_ms, 0), $3) WHERE id = $1",
                &[&self.id, &(waited.as_secs_f64() * 1e3), &(longest.as_secs_f64() * 1e3)],
            )
            .await;
        state::set_phase(&self.control, self.id, Phase::Finished, &message)
            .await
            .map_err(BackfillError::db("recording the end of the backfill"))?;
        Ok(Outcome {
            id: self.id,
            table: self.table(),
            kind: self.target.statement.kind,
            rows_changed: self.rows,
            batches,
            seconds,
            longest_batch_ms: longest.as_secs_f64() * 1e3,
            retries,
            throttled_seconds: self.holdback.total().as_secs_f64(),
            resumed: self.resumed,
        })
    }

    /// One batch up to `upper` and its checkpoint, in one transaction: the rows it changed.
    async fn batch(&self, work: &Client, st: &Statements, upper: &Vec<String>) -> Result<i64, tokio_postgres::Error> {
        let result = async {
            work.batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '{}ms'",
                self.opts.lock_timeout.as_millis().max(1),
                self.opts.statement_timeout.as_millis().max(1)
            ))
            .await?;
            let n = match &self.checkpoint {
                None => work.execute(&st.batch_first, &with_keys(vec![], &[upper])).await?,
                Some(lo) => work.execute(&st.batch_after, &with_keys(vec![], &[lo, upper])).await?,
            } as i64;
            crate::failpoint::hit("backfill.batch");
            work.execute(&st.checkpoint, &[&self.id, upper, &n]).await?;
            work.batch_execute("COMMIT").await?;
            crate::failpoint::hit("backfill.committed");
            Ok(n)
        }
        .await;
        if result.is_err() {
            let _ = work.batch_execute("ROLLBACK").await;
        }
        result
    }
}
