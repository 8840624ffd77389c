//! Entry points of the engine: [`migrate`] starts a migration (or resumes the unfinished one
//! of the same statement, with consent), [`resume`] continues one from its last checkpoint
//! in whatever phase it stopped. Both refuse, before changing anything, what they cannot do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use crate::connect::Params as Config;
use tokio_util::sync::CancellationToken;

use super::cutover::Swapped;
use super::error::{Context as _, MigrateError};
use super::live::Live;
pub use super::options::{InvalidIndexes, Options, sample_every};
use super::reconnect::Ride;
use super::run::Run;
use super::spec::{self, Spec};
use crate::connect;
use crate::plan::{self, Strategy};
use crate::sql::{QualifiedName, literal};
use crate::state::{self, Migration, Phase};

pub use crate::operate::{Reporter, Silent};

/// Called as each phase starts (tests use it to write during every phase).
pub type PhaseHook = Arc<dyn Fn(Phase) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What drives a run from outside: its reporter, a test hook, Ctrl-C, and the live state
/// the control API shares.
pub struct Context<'a> {
    pub reporter: &'a dyn Reporter,
    pub hook: Option<PhaseHook>,
    /// Stops the run at the next safe point, leaving it resumable.
    pub cancel: CancellationToken,
    pub live: Arc<Live>,
}

impl<'a> Context<'a> {
    pub fn new(reporter: &'a dyn Reporter, opts: &Options) -> Context<'a> {
        Context {
            reporter,
            hook: None,
            cancel: CancellationToken::new(),
            live: Live::new(opts.settings.clone(), opts.postpone_cutover),
        }
    }

    pub fn with_hook(mut self, hook: Option<PhaseHook>) -> Self {
        self.hook = hook;
        self
    }
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: i64,
    pub table: QualifiedName,
    pub strategy: Strategy,
    /// Rows in the shadow table, copied by this run and by any before it.
    pub rows_copied: i64,
    /// Rows this run's copy phase copied, in `copy_time` (zero when it had no copy to do).
    pub rows_this_run: i64,
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
    /// The phase this run started in (not `planned` when it resumed).
    pub resumed_from: Option<Phase>,
    /// What a rehearsal measured (`--rehearse`; nothing was swapped).
    pub rehearsal: Option<super::rehearsal::Report>,
    /// The version schema a rename or drop was expanded into (`--version-schema`).
    pub version_schema: Option<String>,
}

impl Outcome {
    /// A migration found already past what this run was to do.
    pub fn already(id: i64, table: QualifiedName, rows_copied: i64, finished: bool) -> Outcome {
        Outcome {
            id,
            table,
            strategy: Strategy::Copy,
            rows_copied,
            rows_this_run: 0,
            copy_time: Duration::ZERO,
            total_time: Duration::ZERO,
            swap: None,
            cutover_attempts: 0,
            finished,
            unvalidated: Vec::new(),
            clients_held: None,
            resumed_from: None,
            rehearsal: None,
            version_schema: None,
        }
    }
}

/// The connection settings of every ghostwire session: named, and failing rather than
/// silently filtered by row-level security.
pub fn session_config(config: &Config, name: &str) -> Config {
    config.named(name).with_setting("row_security", "off")
}

fn state_err(e: tokio_postgres::Error) -> MigrateError {
    MigrateError::Plan(e.into())
}

/// How long a held table lock is waited for before the run is refused: the server session
/// of a ghostwire process that just died keeps the lock until the server notices.
const LOCK_GRACE: Duration = Duration::from_secs(3);

/// Takes the table's advisory lock for this session, or says who holds it.
async fn lock_table(control: &Client, table: &QualifiedName) -> Result<(), MigrateError> {
    if state::lock_table_within(control, table, LOCK_GRACE).await.map_err(state_err)? {
        return Ok(());
    }
    let pid = state::lock_holder(control, table).await.ok().flatten().unwrap_or(0);
    Err(MigrateError::Busy { table: table.to_string(), pid })
}

/// `--version-schema`: builds the schema and records the migration, waiting for `finish`.
async fn expand_version(
    control: &Client,
    change: &super::version_schema::Change,
    schema: &str,
    opts: &Options,
    started: std::time::Instant,
) -> Result<Outcome, MigrateError> {
    let retry = super::retry::RetryPolicy {
        lock_timeout: opts.lock_timeout,
        attempts: opts.cutover_attempts.max(1),
        ..Default::default()
    };
    let id = super::version_schema::expand(control, change, schema, &retry).await?;
    let mut outcome = Outcome::already(id, change.table.clone(), 0, false);
    outcome.strategy = Strategy::Instant;
    outcome.version_schema = Some(schema.to_owned());
    outcome.total_time = started.elapsed();
    Ok(outcome)
}

/// Statements compared as the parser sees them (spacing and a trailing `;` do not matter).
fn same_statement(a: &str, b: &str) -> bool {
    let norm = |s: &str| pg_query::normalize(s).unwrap_or_else(|_| s.split_whitespace().collect::<Vec<_>>().join(" "));
    norm(a) == norm(b)
}

/// Runs `statement` online. Refusals (bad input, another migration) come before anything
/// is changed. An unfinished migration of the same statement is resumed with `opts.yes`.
pub async fn migrate(
    config: &Config,
    statement: &str,
    opts: &Options,
    ctx: &Context<'_>,
) -> Result<Outcome, MigrateError> {
    let started = std::time::Instant::now();
    let mut control = connect::connect(&session_config(config, "ghostwire migrate")).await?;
    control.batch_execute(DURABLE).await.map_err(state_err)?;
    // Planning changes nothing; bad input is refused before the state schema even exists.
    // A table rename, which `plan` refuses, can go through a version schema.
    if let Some(schema) = &opts.version_schema
        && let Some(change) = super::version_schema::Change::table_rename(&mut control, statement).await?
    {
        state::ensure_schema(&mut control).await.map_err(state_err)?;
        lock_table(&control, &change.table).await?;
        if let Some(m) = state::active_migration(&control, &change.table).await.map_err(state_err)? {
            return Err(MigrateError::Unfinished {
                table: m.table.to_string(),
                id: m.id,
                phase: m.phase,
                error: m.error,
            });
        }
        return expand_version(&control, &change, schema, opts, started).await;
    }
    let plan = plan::plan(&mut control, statement).await?;
    let mut missing = plan.privileges.clone();
    missing.extend(plan::privileges::check_limits(&control, &opts.settings).await.map_err(state_err)?);
    if let Some(why) = plan::privileges::refusal(&missing) {
        return Err(MigrateError::Refused(why));
    }
    if !plan.revertible && !opts.yes {
        return Err(MigrateError::NeedsConsent(format!(
            "this change cannot be reverted ({}); pass --yes to run it anyway",
            plan.revert_notes.join("; ")
        )));
    }
    if opts.rehearse && plan.strategy == Strategy::Instant {
        return Err(MigrateError::Refused(
            "this change is catalog-only: it copies nothing and takes its lock once, so there is nothing to rehearse \
             (`ghostwire plan` says what it does)"
                .into(),
        ));
    }
    let invalid: Vec<&str> = plan.table_def.indexes.iter().filter(|i| !i.is_valid).map(|i| i.name.as_str()).collect();
    if let Some(why) = super::in_place::consent_needed(&plan, opts.yes) {
        return Err(MigrateError::NeedsConsent(why));
    }
    let in_place = super::in_place::chosen(&plan, opts);
    if plan.strategy != Strategy::Instant && !in_place && opts.version_schema.is_none() && !invalid.is_empty() {
        match opts.invalid_indexes {
            None => {
                return Err(MigrateError::Refused(format!(
                    "{} has invalid index(es) {} (left by a failed CREATE INDEX CONCURRENTLY or REINDEX CONCURRENTLY; the \
                     offline ALTER would fail on them): pass --invalid-indexes rebuild to build them on the new table \
                     (where the data allows), or --invalid-indexes drop to leave them out",
                    plan.table,
                    invalid.join(", ")
                )));
            }
            Some(InvalidIndexes::Rebuild) => ctx
                .reporter
                .note(&format!("invalid index(es) {} are built again, valid, on the new table", invalid.join(", "))),
            Some(InvalidIndexes::Drop) => ctx.reporter.note(&format!(
                "invalid index(es) {} are left out of the new table (the old table keeps them until finish)",
                invalid.join(", ")
            )),
        }
    }
    let capture = capture_mode(&control, &plan, opts, ctx).await?;
    state::ensure_schema(&mut control).await.map_err(state_err)?;
    lock_table(&control, &plan.table).await?;
    if let Some(m) = state::active_migration(&control, &plan.table).await.map_err(state_err)?
        && opts.rehearse
    {
        return Err(MigrateError::Refused(format!(
            "migration #{} of {} is unfinished (phase {}): a rehearsal runs only beside no other migration of the \
             table; resume or abort that one first",
            m.id, m.table, m.phase
        )));
    }
    if let Some(m) = state::active_migration(&control, &plan.table).await.map_err(state_err)? {
        if same_statement(&m.statement, &plan.statement) && m.phase.before_swap() {
            if opts.yes {
                let ride =
                    Ride { config, id: m.id, table: m.table.clone(), opts, ctx, started, resumed_from: Some(m.phase) };
                return ride.out(continue_migration(config, control, m, opts, ctx).await).await;
            }
            return Err(MigrateError::NeedsConsent(format!(
                "migration #{} of {} with this statement is unfinished (phase {}): pass --yes to resume it, or run \
                 `ghostwire resume {}`",
                m.id, m.table, m.phase, m.table
            )));
        }
        return Err(MigrateError::Unfinished { table: m.table.to_string(), id: m.id, phase: m.phase, error: m.error });
    }
    if let Some(schema) = &opts.version_schema {
        let change = super::version_schema::Change::from_plan(&plan)?;
        return expand_version(&control, &change, schema, opts, started).await;
    }
    let settings = json!({
        "chunk_time_ms": opts.settings.chunk_time_ms, "chunk_rows": opts.settings.chunk_rows,
        "lock_timeout_ms": opts.lock_timeout.as_millis() as u64, "cutover_attempts": opts.cutover_attempts,
        "finish": opts.finish, "jobs": opts.parallel, "verify": opts.verify, "rehearsal": opts.rehearse,
        "sample": opts.sample.filter(|_| opts.rehearse),
        "invalid_indexes": opts.invalid_indexes.map(InvalidIndexes::as_str),
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
    name_session(&control, id).await?;
    control
        .execute("UPDATE ghostwire.migrations SET capture = $2 WHERE id = $1", &[&id, &capture.as_str()])
        .await
        .during(id, Phase::Planned, "recording the capture mode")?;
    state::event(&control, id, Phase::Planned, "plan", &plan.summary, None, Some(json!({ "steps": plan.steps.len() })))
        .await
        .during(id, Phase::Planned, "recording the plan")?;
    let mut run = Run::new(config, control, opts, ctx, id, plan.table.clone(), plan.strategy);
    run.capture = capture;
    let result = run.drive(Phase::Shadow, Some(&plan), None, None).await;
    let result = run.finish_up(result).await;
    drop(run); // its sessions end before any reconnection
    Ride { config, id, table: plan.table.clone(), opts, ctx, started, resumed_from: None }.out(result).await
}

/// The capture mode of a new run: `--capture logical` is refused (before anything changes)
/// where the server, the role or the table do not allow it; `auto` falls back to triggers
/// there, saying why. A change that copies nothing captures nothing.
async fn capture_mode(
    control: &Client,
    plan: &plan::Plan,
    opts: &Options,
    ctx: &Context<'_>,
) -> Result<super::capture::Mode, MigrateError> {
    use super::capture::{Choice, Mode};
    if opts.capture == Choice::Trigger || plan.strategy == Strategy::Instant || opts.version_schema.is_some() {
        return Ok(Mode::Trigger);
    }
    // `plan` asked the server already (it lists the modes for every change with a copy).
    let why = match plan.capture.iter().find(|c| c.mode == "logical") {
        Some(c) => c.why_not.clone(),
        None => crate::replication::slot::refusals(control, &plan.table_def).await.map_err(state_err)?,
    };
    if why.is_empty() {
        return Ok(Mode::Logical);
    }
    if opts.capture == Choice::Auto {
        ctx.reporter
            .note(&format!("capturing with triggers: logical capture is not possible here ({})", why.join("; ")));
        return Ok(Mode::Trigger);
    }
    Err(MigrateError::Refused(format!("--capture logical is not possible here: {}", why.join("; "))))
}

/// Names the control session after the migration, and makes its commits durable before
/// they return: with a server default of `synchronous_commit = off`, a crash could lose a
/// phase the run has moved past (the state stays consistent, the running process would not).
async fn name_session(control: &Client, id: i64) -> Result<(), MigrateError> {
    control
        .batch_execute(&format!("SET application_name = {}; {DURABLE}", literal(&format!("ghostwire migrate #{id}"))))
        .await
        .during(id, Phase::Planned, "naming the session")
}

/// Raises `synchronous_commit` to `on` for the session when it is `off` (a stronger setting
/// is kept).
pub(super) const DURABLE: &str = "SELECT pg_catalog.set_config('synchronous_commit', 'on', false) WHERE current_setting('synchronous_commit') = 'off'";

/// Continues the unfinished migration of `table` (`orders`, `public.orders`,
/// `"Sales"."Order Items"`) from where it stopped.
pub async fn resume(config: &Config, table: &str, opts: &Options, ctx: &Context<'_>) -> Result<Outcome, MigrateError> {
    let started = std::time::Instant::now();
    let mut control = connect::connect(&session_config(config, "ghostwire resume")).await?;
    let (schema, name) = plan::parse::table_name(table).map_err(|e| MigrateError::Refused(e.to_string()))?;
    if !state::schema_exists(&control).await.map_err(state_err)? {
        return Err(MigrateError::Refused(format!(
            "no ghostwire migration has run in this database (looking for {table})"
        )));
    }
    state::ensure_schema(&mut control).await.map_err(state_err)?;
    let limits = plan::privileges::check_limits(&control, &opts.settings).await.map_err(state_err)?;
    if let Some(why) = plan::privileges::refusal(&limits) {
        return Err(MigrateError::Refused(why));
    }
    let found = state::find_active(&control, schema.as_deref(), &name).await.map_err(state_err)?;
    let m = found.map_err(MigrateError::Refused)?;
    lock_table(&control, &m.table).await?;
    // Read again under the lock: a runner that just finished has moved it on.
    let m = state::migration(&control, m.id)
        .await
        .map_err(state_err)?
        .ok_or_else(|| MigrateError::Refused("the migration vanished".into()))?;
    let ride = Ride { config, id: m.id, table: m.table.clone(), opts, ctx, started, resumed_from: Some(m.phase) };
    ride.out(continue_migration(config, control, m, opts, ctx).await).await
}

/// Goes on with migration `m` from where its state says it is (the caller holds the
/// table's lock on `control`).
pub(super) async fn continue_migration(
    config: &Config,
    mut control: Client,
    mut m: Migration,
    opts: &Options,
    ctx: &Context<'_>,
) -> Result<Outcome, MigrateError> {
    if m.phase.is_done() {
        return Err(MigrateError::Refused(format!("migration #{} of {} is already {}", m.id, m.table, m.phase)));
    }
    if matches!(m.phase, Phase::Reverting | Phase::Reverted) {
        return Err(MigrateError::Refused(format!(
            "migration #{} of {} is {}: `ghostwire revert {}` goes on with a revert, `ghostwire finish {}` ends it",
            m.id, m.table, m.phase, m.table, m.table
        )));
    }
    name_session(&control, m.id).await?;
    super::capturing::copy_over_if_log_lost(&control, &mut m, ctx.reporter).await?;
    let spec: Option<Spec> = m.spec.clone().and_then(|v| serde_json::from_value(v).ok());
    let strategy = match m.strategy.as_str() {
        "instant" => Strategy::Instant,
        "online" => Strategy::Online,
        _ => Strategy::Copy,
    };
    // Where to pick up, and whether what that needs is still there.
    let mut step_positions = None;
    let (from, plan) = match (&spec, m.phase) {
        (None, _)
            if strategy == Strategy::Online
                && super::in_place::drop_already_done(&control, &m).await.map_err(state_err)? =>
        {
            let message = "finished: the index was dropped by the run that stopped";
            state::set_phase(&control, m.id, Phase::Finished, message).await.map_err(state_err)?;
            return Ok(Outcome::already(m.id, m.table.clone(), 0, true));
        }
        (None, _) => {
            // Nothing built yet, a shadow that never got its spec, or a change in place (whose
            // events say what is done): start over from the plan.
            let remaining = if strategy == Strategy::Online {
                super::in_place::remaining_statement(&control, &m).await.map_err(state_err)?
            } else {
                None
            };
            let plan = match remaining {
                Some((statement, positions)) => {
                    step_positions = Some(positions);
                    plan::replan(&mut control, &statement).await?
                }
                None => plan::replan(&mut control, &m.statement).await?,
            };
            control
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS {} CASCADE",
                    crate::sql::ident(&spec::work_schema(m.id))
                ))
                .await
                .during(m.id, m.phase, "removing a half-built shadow")?;
            (Phase::Shadow, Some(plan))
        }
        // A run stopped while installing the capture installs it again (idempotent): the
        // change log may not exist yet.
        (Some(_), Phase::Planned | Phase::Shadow | Phase::Capture) => (Phase::Capture, None),
        (Some(s), phase) => {
            check_resumable(&control, &m, s).await?;
            // Verification runs beside the last index builds: from there, the builds left
            // end first, and verification starts over.
            (if phase == Phase::Verify { Phase::Index } else { phase }, None)
        }
    };
    state::event(&control, m.id, m.phase, "resume", &format!("resuming in phase {from}"), None, None).await.during(
        m.id,
        m.phase,
        "recording the resume",
    )?;
    ctx.reporter.note(&format!("resuming migration #{} of {} in phase {from}", m.id, m.table));
    let (rehearsal, sample) = (m.settings["rehearsal"].as_bool(), m.settings["sample"].as_f64());
    let mut run = Run::new(config, control, opts, ctx, m.id, m.table.clone(), strategy);
    run.rows_before = m.rows_copied;
    run.step_positions = step_positions;
    // The capture resumes as it was started, whatever `--capture` says now.
    run.capture = super::capture::Mode::of(&m);
    // A rehearsal resumes as one, and a real run as a real one, whatever the flags say now.
    run.rehearse = rehearsal.unwrap_or(false);
    run.sample_every = if run.rehearse { sample_every(sample) } else { None };
    // The choice made when the migration started holds for a shadow built again.
    if let Some(choice) = m.settings["invalid_indexes"].as_str() {
        run.rebuild_invalid = choice == InvalidIndexes::Rebuild.as_str();
    }
    let result = run.drive(from, plan.as_ref(), spec, Some(&m)).await;
    run.finish_up(result).await
}

/// A migration can go on only if what it built is still there.
async fn check_resumable(client: &Client, m: &Migration, s: &Spec) -> Result<(), MigrateError> {
    let gone = |what: String| {
        MigrateError::Refused(format!(
            "migration #{} of {} cannot be resumed: {what}. Run `ghostwire abort {}` to clean up and start again",
            m.id, m.table, m.table
        ))
    };
    let exists = |name: String| async move {
        client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name]).await.map(|r| r.get::<_, bool>(0))
    };
    if m.phase == Phase::Swapped {
        return Ok(());
    }
    if m.phase >= Phase::Copy && !exists(s.shadow().sql()).await.map_err(state_err)? {
        return Err(gone(format!("its shadow table {} is gone (dropped by hand?)", s.shadow())));
    }
    if m.phase >= Phase::Capture {
        if !exists(s.log_table().sql()).await.map_err(state_err)? {
            return Err(gone(format!("its change log {} is gone, so writes since then are lost to it", s.log_table())));
        }
        let mode = super::capture::Mode::of(m);
        if m.phase > Phase::Capture
            && mode == super::capture::Mode::Trigger
            && !super::capture::installed(client, s).await.map_err(state_err)?
        {
            return Err(gone(format!("its capture triggers on {} are gone, so writes were not recorded", s.original)));
        }
        if m.phase > Phase::Capture && mode == super::capture::Mode::Logical {
            super::capture::logical::check_slot(client, m.id).await.map_err(|e| gone(e.to_string()))?;
        }
    }
    Ok(())
}
