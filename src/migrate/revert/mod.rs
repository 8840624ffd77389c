//! The revert window (DESIGN.md §2.9): after the swap the old table is kept in step through
//! reverse capture, and `ghostwire revert TABLE` goes back to it without losing a write.
//!
//! revert: catch the old table up from the reverse log while the application writes (in
//! batches, each its own transaction), then swap back in one short transaction exactly as
//! the forward cut-over does: `lock_timeout` with jittered retries, the last reverse changes
//! under the lock, the snapshot-hazard check, proxies drained with `--proxy`, every
//! dependent object carried back (`swap_back`). A row that cannot be mapped back stops the
//! revert before its swap with the rows named; nothing live changes and the window stays
//! open. The phase is `reverting` meanwhile (a crash leaves it there; `revert` again goes
//! on, each step being idempotent), then `reverted`: the new table is kept in
//! `ghostwire_<id>_new` until `finish`.

pub mod apply;
pub mod capture;
pub mod mapping;
pub mod swap_back;

use std::time::{Duration, Instant};

use serde_json::json;
use thiserror::Error;
use tokio_postgres::Client;

use crate::migrate::proxies::Proxies;
use crate::migrate::retry::RetryPolicy;
use crate::migrate::snapshots::{self, Horizon};
use crate::migrate::spec::Spec;
use crate::state::{self, Migration, Phase};

#[derive(Debug, Error)]
pub enum RevertError {
    #[error("{}", crate::connect::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Refused(String),
    #[error(
        "revert of migration #{id} of {table} stopped before its swap: {count} row(s) written since the swap cannot go back to the old table: {rows}. Nothing live changed and the revert window stays open: correct those rows (or remove them) and run `ghostwire revert {table}` again, or `ghostwire finish {table}` to keep the new table"
    )]
    Unmappable { id: i64, table: String, count: usize, rows: String },
    #[error(
        "revert of migration #{id} of {table} could not swap back after {attempts} attempt(s) ({reason}); nothing live changed and the window stays open: run `ghostwire revert {table}` again, with a longer --lock-timeout or more --cutover-attempts"
    )]
    GaveUp { id: i64, table: String, attempts: u32, reason: String },
    #[error(
        "revert of migration #{id} of {table} stopped before its swap: {reason}. Nothing live changed and the window stays open: run `ghostwire revert {table}` again once the cause is gone"
    )]
    Critical { id: i64, table: String, reason: String },
}

/// How a revert runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub lock_timeout: Duration,
    pub attempts: u32,
    pub batch: i64,
    /// The throttle limits of the catch-up (replica lag, active sessions, the SQL check).
    pub settings: crate::migrate::live::Settings,
    /// The control API's state, when a `migrate --revert-window` runs the revert: its
    /// progress is shown there, and its pause holds the catch-up.
    pub live: Option<std::sync::Arc<crate::migrate::live::Live>>,
}

impl Options {
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy { lock_timeout: self.lock_timeout, attempts: self.attempts.max(1), ..RetryPolicy::default() }
    }

    fn show(&self, f: impl FnOnce(&mut crate::migrate::live::Progress)) {
        if let Some(live) = &self.live {
            live.update(f);
        }
    }
}

/// What a revert did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: i64,
    pub applied: i64,
    pub attempts: u32,
    pub lock_wait: Duration,
    pub lock_hold: Duration,
    pub unvalidated: Vec<String>,
}

fn refused(m: &Migration, why: &str) -> RevertError {
    RevertError::Refused(format!("migration #{} of {} cannot be reverted: {why}", m.id, m.table))
}

/// Reverts migration `m` (the caller holds the table's advisory lock on `control`, and a
/// second session `work` for the batches and the swap).
pub async fn revert(
    control: &Client,
    work: &Client,
    m: &Migration,
    opts: &Options,
    proxies: &Proxies<'_>,
) -> Result<Outcome, RevertError> {
    match m.phase {
        Phase::Swapped | Phase::Reverting | Phase::Reverted => {}
        p if p.before_swap() => {
            return Err(refused(
                m,
                "it has not swapped yet; `ghostwire abort` removes it and leaves the table as it was",
            ));
        }
        p => return Err(refused(m, &format!("it is {p}, so the old table is gone"))),
    }
    let spec: Spec =
        m.spec.clone().and_then(|v| serde_json::from_value(v).ok()).ok_or_else(|| refused(m, "its spec is missing"))?;
    if m.phase == Phase::Reverted {
        // Swapped back already (a run that stopped after the commit): the validations left.
        let unvalidated = validate(work, &swap_back::script(&spec), &opts.retry_policy()).await;
        let none = Duration::ZERO;
        return Ok(Outcome { id: m.id, applied: 0, attempts: 0, lock_wait: none, lock_hold: none, unvalidated });
    }
    if !capture::installed(control, m.id, &spec.original).await? {
        return Err(refused(
            m,
            "it has no revert window (it ran with --finish, its window was closed, or it predates revert windows); `ghostwire finish` drops the old table",
        ));
    }
    let mapping = mapping::Mapping::of(&spec).map_err(|why| refused(m, &why))?;
    let tables = apply::Tables::of(&spec);
    if m.phase == Phase::Swapped {
        state::event(control, m.id, m.phase, "revert", "revert requested", None, None).await?;
        state::set_phase(control, m.id, Phase::Reverting, "reverting: catching the old table up").await?;
    }
    apply::prepare(work, m.id).await?;
    let caught_up = Instant::now();
    let mut applied = 0;
    // Catch up while the application writes, until one batch is enough for what is left.
    opts.show(|p| p.phase = Phase::Reverting.as_str().into());
    loop {
        pace(control, m, opts).await?;
        let n = match apply::batch(work, &mapping, &tables, m.id, opts.batch).await? {
            Ok(n) => n,
            Err(rows) => return Err(unmappable(control, m, rows).await),
        };
        applied += n;
        metrics::counter!("ghostwire_revert_changes_applied_total").increment(n as u64);
        if let Ok(left) = apply::backlog(control, m.id).await {
            opts.show(|p| p.backlog = left);
        }
        crate::failpoint::hit("revert.batch");
        if n < opts.batch {
            break;
        }
    }
    let details = json!({"entries": applied});
    state::event(
        control,
        m.id,
        Phase::Reverting,
        "revert_catchup",
        &format!("applied {applied} reverse change(s)"),
        Some(ms(caught_up.elapsed())),
        Some(details),
    )
    .await?;
    let script = swap_back::script(&spec);
    let own: Vec<i32> = vec![
        control.query_one("SELECT pg_backend_pid()", &[]).await?.get(0),
        work.query_one("SELECT pg_backend_pid()", &[]).await?.get(0),
    ];
    let retry = opts.retry_policy();
    let mut reason = String::from("no attempt made");
    for attempt in 1..=opts.attempts.max(1) {
        loop {
            match apply::batch(work, &mapping, &tables, m.id, opts.batch).await? {
                Ok(n) if n < opts.batch => break,
                Ok(_) => continue,
                Err(rows) => return Err(unmappable(control, m, rows).await),
            }
        }
        let last = Horizon::now(work).await?;
        let gated = Instant::now();
        let drained = match proxies.drain().await {
            Ok(d) => d,
            Err(e) => {
                reason = format!("a proxy did not drain in time ({e})");
                attempt_event(control, m, attempt, &reason, None).await;
                crate::migrate::retry::pause_unless_closed(control, retry.pause(attempt)).await;
                continue;
            }
        };
        let result = attempt_swap(work, &spec, &mapping, &tables, &script, &retry, &last, &own).await;
        if drained.is_some() {
            proxies.open().await;
        }
        let stall = drained.map(|_| gated.elapsed());
        match result? {
            Attempt::Swapped { lock_wait, lock_hold } => {
                let msg = format!(
                    "revert attempt {attempt}: swapped back; lock waited {:.1} ms, held {:.1} ms{}",
                    ms(lock_wait),
                    ms(lock_hold),
                    stall.map(|d| format!("; clients held {:.1} ms", ms(d))).unwrap_or_default()
                );
                let mut details = json!({"attempt": attempt, "outcome": "swapped", "lock_wait_ms": ms(lock_wait), "lock_hold_ms": ms(lock_hold)});
                if let Some(d) = stall {
                    details["stall_ms"] = json!(ms(d));
                }
                state::event(
                    control,
                    m.id,
                    Phase::Reverting,
                    "revert_attempt",
                    &msg,
                    Some(ms(lock_hold)),
                    Some(details),
                )
                .await?;
                metrics::histogram!("ghostwire_lock_wait_seconds").record(lock_wait.as_secs_f64());
                metrics::histogram!("ghostwire_lock_hold_seconds").record(lock_hold.as_secs_f64());
                opts.show(|p| {
                    p.phase = Phase::Reverted.as_str().into();
                    p.backlog = 0;
                });
                let unvalidated = validate(work, &script, &retry).await;
                return Ok(Outcome { id: m.id, applied, attempts: attempt, lock_wait, lock_hold, unvalidated });
            }
            Attempt::NotGranted(r) => {
                reason = r;
                attempt_event(control, m, attempt, &reason, None).await;
                crate::migrate::retry::pause_unless_closed(control, retry.pause(attempt)).await;
            }
            Attempt::Unmappable(rows) => return Err(unmappable(control, m, rows).await),
        }
    }
    // The window stays open, with no revert under way.
    state::set_phase(control, m.id, Phase::Swapped, "swapped; a revert could not swap back").await?;
    Err(RevertError::GaveUp { id: m.id, table: m.table.to_string(), attempts: opts.attempts.max(1), reason })
}

/// Waits while a throttle signal is over its limit (a signal that cannot be read holds the
/// catch-up back); a critical limit stops the revert.
async fn pace(control: &Client, m: &Migration, opts: &Options) -> Result<(), RevertError> {
    use crate::migrate::throttle::{self, Verdict};
    let mut held: Option<(String, Instant)> = None;
    loop {
        let settings = opts.live.as_ref().map(|l| l.settings()).unwrap_or_else(|| opts.settings.clone());
        let paused = opts.live.as_ref().is_some_and(|l| l.paused());
        let signals = throttle::read(control, &settings, Ok(0), paused, None).await;
        match throttle::judge(&settings, &signals) {
            Verdict::Go => {
                opts.show(|p| p.throttled = None);
                if let Some((reason, since)) = held {
                    let msg =
                        format!("revert catch-up resumed after {:.1} s ({reason})", since.elapsed().as_secs_f64());
                    state::event(control, m.id, Phase::Reverting, "throttle", &msg, Some(ms(since.elapsed())), None)
                        .await?;
                }
                return Ok(());
            }
            Verdict::Throttle(reason) => {
                if held.as_ref().is_none_or(|(r, _)| r != &reason) {
                    tracing::info!("revert catch-up throttled: {reason}");
                    opts.show(|p| p.throttled = Some(reason.clone()));
                    let msg = format!("revert catch-up throttled: {reason}");
                    state::event(control, m.id, Phase::Reverting, "throttle", &msg, None, None).await?;
                    held = Some((reason, Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Verdict::Critical(reason) => {
                let msg = format!("revert stopped: {reason}");
                state::event(control, m.id, Phase::Reverting, "revert_stopped", &msg, None, None).await?;
                state::set_phase(control, m.id, Phase::Swapped, "swapped; a revert stopped at a critical limit")
                    .await?;
                return Err(RevertError::Critical { id: m.id, table: m.table.to_string(), reason });
            }
        }
    }
}

enum Attempt {
    Swapped { lock_wait: Duration, lock_hold: Duration },
    NotGranted(String),
    Unmappable(Vec<apply::Unmappable>),
}

#[allow(clippy::too_many_arguments)]
async fn attempt_swap(
    work: &Client,
    spec: &Spec,
    mapping: &mapping::Mapping,
    tables: &apply::Tables,
    script: &crate::migrate::swap::Script,
    retry: &RetryPolicy,
    last: &Horizon,
    own: &[i32],
) -> Result<Attempt, RevertError> {
    let prepared = Prepared::prepare(work).await?;
    work.batch_execute(&format!(
        "BEGIN; {}; SELECT pg_catalog.set_config('synchronous_commit', 'on', true) WHERE current_setting('synchronous_commit') = 'off'",
        retry.set_local()
    ))
    .await?;
    let asked = Instant::now();
    if let Err(e) = work.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", spec.original.sql())).await {
        work.batch_execute("ROLLBACK").await?;
        if crate::migrate::retry::is_lock_conflict(&e) {
            return Ok(Attempt::NotGranted(format!("the lock was not granted within {:?}", retry.lock_timeout)));
        }
        return Err(e.into());
    }
    let lock_wait = asked.elapsed();
    let granted = Instant::now();
    let result = under_lock(work, &prepared, spec, mapping, tables, script, last, own).await;
    match result {
        Ok(None) => {
            work.batch_execute("COMMIT").await?;
            let lock_hold = granted.elapsed();
            crate::failpoint::hit("revert.committed");
            // Idle since the commit (its triggers went with the swap back). Dropped after it:
            // a transaction that drops a table scans the whole buffer pool as it commits
            // (4 ms of a 14 ms lock hold with 1 GB of shared buffers). `finish` drops it too.
            if let Err(e) = work.batch_execute(&capture::drop_log_sql(spec.migration_id)).await {
                tracing::warn!(
                    "revert: the reverse log is left for `ghostwire finish` to remove: {}",
                    crate::connect::describe(&e)
                );
            }
            Ok(Attempt::Swapped { lock_wait, lock_hold })
        }
        Ok(Some(held)) => {
            work.batch_execute("ROLLBACK").await?;
            Ok(held)
        }
        Err(e) => {
            work.batch_execute("ROLLBACK").await?;
            if crate::migrate::retry::is_lock_conflict(&e) {
                return Ok(Attempt::NotGranted(format!("a lock was not granted within {:?}", retry.lock_timeout)));
            }
            if apply::is_row_fault(&e) {
                let reason = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
                return Ok(Attempt::Unmappable(vec![apply::Unmappable {
                    key: "(the last changes)".into(),
                    column: None,
                    reason,
                }]));
            }
            Err(e.into())
        }
    }
}

/// The queries run under the revert's lock, parsed before it is asked for.
struct Prepared {
    hazards: snapshots::HazardCheck,
    identity: tokio_postgres::Statement,
    phase: state::PhaseRecord,
}

impl Prepared {
    async fn prepare(work: &Client) -> Result<Prepared, tokio_postgres::Error> {
        Ok(Prepared {
            hazards: snapshots::HazardCheck::prepare(work).await?,
            identity: work.prepare(crate::migrate::swap::IDENTITY_SEQUENCES_SQL).await?,
            phase: state::PhaseRecord::prepare(work).await?,
        })
    }
}

/// Under the lock: the last reverse changes, the hazard check, the swap back. `Some`: it
/// did not go ahead.
#[allow(clippy::too_many_arguments)]
async fn under_lock(
    work: &Client,
    prepared: &Prepared,
    spec: &Spec,
    mapping: &mapping::Mapping,
    tables: &apply::Tables,
    script: &crate::migrate::swap::Script,
    last: &Horizon,
    own: &[i32],
) -> Result<Option<Attempt>, tokio_postgres::Error> {
    work.batch_execute(&apply::apply_sql(mapping, tables, spec.migration_id, None)).await?;
    crate::failpoint::hit("revert.locked");
    let sessions = prepared.hazards.run(work, last, own).await?;
    if !sessions.is_empty() {
        let named: Vec<String> =
            sessions.iter().map(|s| format!("pid {} ({:.0} s)", s.pid, s.transaction_seconds)).collect();
        return Ok(Some(Attempt::NotGranted(format!(
            "sessions hold snapshots older than the last reverse changes: {}",
            named.join(", ")
        ))));
    }
    for section in [&script.before_move, &script.moves, &script.after_move] {
        for sql in section {
            work.batch_execute(sql).await?;
        }
    }
    swap_back::identity_sequences(work, &prepared.identity, spec).await?;
    for sql in &script.optional {
        work.batch_execute("SAVEPOINT ghostwire_optional").await?;
        match work.batch_execute(sql).await {
            Ok(()) => work.batch_execute("RELEASE SAVEPOINT ghostwire_optional").await?,
            Err(e) => {
                tracing::warn!("revert: could not run {sql}: {}", crate::connect::describe(&e));
                work.batch_execute("ROLLBACK TO SAVEPOINT ghostwire_optional").await?;
            }
        }
    }
    // The phase moves with the swap, in its transaction: a crash leaves one or the other.
    let message = "reverted: the old table is live again; the new table is kept until finish";
    prepared.phase.run(work, spec.migration_id, Phase::Reverted, message).await?;
    crate::failpoint::hit("revert.before_commit");
    Ok(None)
}

/// Validates the foreign keys added NOT VALID (writes go on meanwhile), one after the other
/// under the lock timeout, retried; returns those that could not be.
async fn validate(work: &Client, script: &crate::migrate::swap::Script, retry: &RetryPolicy) -> Vec<String> {
    let done = crate::migrate::validate::in_order(work, retry, script.validations.clone()).await;
    done.into_iter().filter_map(|v| v.error.map(|e| format!("{}: {e}", v.validation.what))).collect()
}

async fn attempt_event(control: &Client, m: &Migration, attempt: u32, reason: &str, took: Option<Duration>) {
    let details = json!({"attempt": attempt, "outcome": "not_swapped", "reason": reason});
    let msg = format!("revert attempt {attempt}: {reason}");
    if let Err(e) =
        state::event(control, m.id, Phase::Reverting, "revert_attempt", &msg, took.map(ms), Some(details)).await
    {
        tracing::warn!("could not record a revert attempt: {}", crate::connect::describe(&e));
    }
}

async fn unmappable(control: &Client, m: &Migration, rows: Vec<apply::Unmappable>) -> RevertError {
    let named: Vec<String> = rows
        .iter()
        .map(|r| match &r.column {
            Some(c) => format!("key {} column {}: {}", r.key, crate::sql::display_ident(c), r.reason),
            None => format!("key {}: {}", r.key, r.reason),
        })
        .collect();
    let details = json!({"rows": named});
    let msg = format!("revert stopped: {} row(s) cannot go back", rows.len());
    let _ = state::event(control, m.id, Phase::Reverting, "revert_refused", &msg, None, Some(details)).await;
    // The window stays open: back to swapped.
    let _ =
        state::set_phase(control, m.id, Phase::Swapped, "swapped; a revert stopped on rows that cannot go back").await;
    RevertError::Unmappable { id: m.id, table: m.table.to_string(), count: rows.len(), rows: named.join("; ") }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
