//! Changes with no copy (DESIGN.md §5, "in place"): a catalog-only statement run directly,
//! and the online recipes, each a sequence of short locks:
//!
//! - `ADD CONSTRAINT … CHECK` / `… FOREIGN KEY`: added `NOT VALID`, then `VALIDATE`
//!   (SHARE UPDATE EXCLUSIVE: reads and writes go on while it scans) — [`constraint`];
//! - `SET NOT NULL`: a `CHECK (col IS NOT NULL) NOT VALID`, validated, then `SET NOT NULL`
//!   (PostgreSQL 12+ proves it from the check, without a scan) and the check dropped;
//! - `ADD CONSTRAINT … UNIQUE` / `PRIMARY KEY`: the index built concurrently, then the
//!   constraint attached `USING INDEX` — [`index`];
//! - `CREATE INDEX`, `DROP INDEX`, `REINDEX INDEX`: always concurrently, on a session of
//!   their own that is watched for progress and for the transactions it waits on —
//!   [`concurrently`]. A failed build leaves no invalid index behind.
//!
//! Every change under a table lock runs under `--lock-timeout` with jittered retries, and
//! records its event (with its lock wait and hold) in the same transaction, so a run that
//! stopped anywhere knows on resume what is done ([`Done`]); a concurrent build records its
//! index's name before it starts. `abort` removes what a stopped run made ([`remove`]).

mod concurrently;
mod constraint;
mod index;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::Client;

use super::error::{Context as _, MigrateError};
use super::retry::{self, LockTimes};
use super::run::Run;
use crate::plan::parse::{Action, NewConstraint};
use crate::plan::{Plan, Strategy};
use crate::sql::{QualifiedName, ident};
use crate::state::{self, Migration, Phase};

/// Whether `plan` runs in place: online, and every subcommand catalog-only or one of the
/// recipes above.
pub fn runs_in_place(plan: &Plan) -> bool {
    plan.strategy == Strategy::Online && crate::plan::in_place_steps(&plan.steps)
}

/// Whether this run changes the table in place: it can, and `Options::through_shadow` (for
/// benchmarks) did not ask for the copy.
pub fn chosen(plan: &Plan, opts: &super::engine::Options) -> bool {
    runs_in_place(plan) && (!opts.through_shadow || plan.parsed.is_index_statement())
}

/// Refuses, before anything is recorded, a `CREATE INDEX` whose name an invalid index
/// already has, unless `--yes` consents to replacing it.
pub fn consent_needed(plan: &Plan, yes: bool) -> Option<String> {
    let Some(Action::CreateIndex { name: Some(name), .. }) = plan.steps.first().map(|s| &s.action) else {
        return None;
    };
    let invalid = plan.table_def.indexes.iter().any(|i| &i.name == name && !i.is_valid);
    (invalid && !yes).then(|| {
        format!(
            "index {} already exists and is invalid (a failed CREATE INDEX CONCURRENTLY): pass --yes to drop it \
             (concurrently) and build it again",
            crate::sql::display_ident(name)
        )
    })
}

/// What earlier runs of a migration did: its events that name an in-place step.
#[derive(Debug, Default)]
pub(super) struct Done(Vec<(String, Value)>);

impl Done {
    async fn load(client: &Client, id: i64) -> Result<Done, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT kind, details FROM ghostwire.events
                  WHERE migration_id = $1 AND details ->> 'step' IS NOT NULL ORDER BY id",
                &[&id],
            )
            .await?;
        Ok(Done(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
    }

    /// The details of the last event `kind` of step `step`.
    fn find(&self, kind: &str, step: &str) -> Option<&Value> {
        self.0.iter().rev().find(|(k, d)| k == kind && d["step"].as_str() == Some(step)).map(|(_, d)| d)
    }

    /// The name an event `kind` of step `step` recorded under `field`.
    fn name(&self, kind: &str, step: &str, field: &str) -> Option<String> {
        self.find(kind, step).and_then(|d| d[field].as_str()).map(str::to_owned)
    }
}

fn lock_times_json(t: &LockTimes) -> Value {
    json!({"attempts": t.attempts, "lock_wait_ms": ms(t.waited), "lock_held_ms": ms(t.held)})
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Inserts an event, returning its id (for [`finish_event`]).
async fn insert_event(
    client: &Client,
    id: i64,
    phase: Phase,
    kind: &str,
    message: &str,
    details: &Value,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "INSERT INTO ghostwire.events (migration_id, phase, kind, message, details)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[&id, &phase.as_str(), &kind, &message, details],
        )
        .await?;
    Ok(row.get(0))
}

/// Adds the lock times to an event once its transaction committed.
async fn finish_event(client: &Client, event: i64, times: &LockTimes) {
    let result = client
        .execute(
            "UPDATE ghostwire.events SET duration_ms = $2, details = details || $3 WHERE id = $1",
            &[&event, &ms(times.waited + times.held), &lock_times_json(times)],
        )
        .await;
    if let Err(e) = result {
        tracing::warn!("could not record an event's lock times: {e}");
    }
}

impl Run<'_> {
    /// A catalog-only statement: run as it is, under the lock timeout, retried.
    pub(super) async fn run_directly(&mut self, plan: &Plan) -> Result<(), MigrateError> {
        self.enter(Phase::Cutover, "running the statement directly (catalog-only change)").await?;
        let t = Instant::now();
        let run = retry::ddl(&self.control, &self.retry, "running the statement", &plan.parsed.text);
        self.with_proxies_drained(run).await.during(self.id, Phase::Cutover, "running the statement")?;
        self.event("statement", "statement run", Some(t.elapsed()), None).await;
        self.enter(Phase::Finished, "finished").await
    }

    /// Runs `statements` in one transaction under the lock timeout (retried), with the event
    /// `kind` (whose details name the step) recorded in the same transaction.
    async fn recorded(
        &self,
        what: &str,
        statements: &str,
        kind: &str,
        message: &str,
        details: Value,
    ) -> Result<LockTimes, MigrateError> {
        let (client, id, phase) = (&self.control, self.id, self.phase);
        let (details, statements) = (&details, statements);
        let (event, times) = retry::transaction(&self.control, &self.retry, what, move || async move {
            client.batch_execute(statements).await?;
            insert_event(client, id, phase, kind, message, details).await
        })
        .await
        .during(self.id, self.phase, what)?;
        finish_event(&self.control, event, &times).await;
        Ok(times)
    }

    /// Runs `plan` in place (see the module); the migration ends `finished`. A resumed run
    /// skips what the events say is done.
    pub(super) async fn in_place(&mut self, plan: &Plan) -> Result<(), MigrateError> {
        let done = Done::load(&self.control, self.id).await.during(self.id, self.phase, "reading the events")?;
        let table = plan.table.clone();
        let instant: Vec<(usize, &str)> = plan
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.strategy == Strategy::Instant)
            .map(|(i, s)| (i, s.subcommand.as_str()))
            .collect();
        if !instant.is_empty() && done.find("statement", "instant").is_none() {
            self.enter(Phase::Cutover, "running the catalog-only subcommands").await?;
            let texts: Vec<&str> = instant.iter().map(|(_, t)| *t).collect();
            let sql = format!("ALTER TABLE {} {}", table.sql(), texts.join(", "));
            let message = format!("ran {}", texts.join(", "));
            // Which subcommands they were: a resumed run plans only the others.
            let positions: Vec<usize> = instant.iter().map(|(i, _)| *i).collect();
            let details = json!({"step": "instant", "ran": texts.join(", "), "subcommands": positions});
            let run = self.recorded("running the catalog-only subcommands", &sql, "statement", &message, details);
            self.with_proxies_drained(run).await?;
        }
        for (i, step) in plan.steps.iter().enumerate().filter(|(_, s)| s.strategy != Strategy::Instant) {
            // A resumed run's plan may hold only the statement's remaining subcommands: each
            // step keeps the position it had in the statement, under which its events are.
            let key = self.step_positions.as_ref().and_then(|p| p.get(i)).copied().unwrap_or(i).to_string();
            match &step.action {
                Action::AddConstraint {
                    constraint: NewConstraint::Check | NewConstraint::ForeignKey,
                    not_valid,
                    ..
                } => self.add_constraint(&table, &key, &step.subcommand, *not_valid, &done).await?,
                Action::AddConstraint { index: Some(index), name, .. } => {
                    self.add_index_constraint(plan, &key, index, name.as_deref(), &done).await?
                }
                Action::SetNotNull { column } => self.set_not_null(&table, &key, column, &done).await?,
                Action::ValidateConstraint { name } => self.validate_constraint(&table, &key, name).await?,
                Action::CreateIndex { .. } => {
                    if !self.create_index(plan, &key, &done).await? {
                        return self.enter(Phase::Finished, "finished: the index already exists").await;
                    }
                }
                Action::DropIndex { .. } => self.drop_index(plan).await?,
                Action::Reindex { .. } => self.reindex(plan).await?,
                _ => {
                    return Err(MigrateError::Refused(format!(
                        "`{}` has no in-place recipe; please report this statement",
                        step.subcommand
                    )));
                }
            }
        }
        self.enter(Phase::Finished, "finished (in place, no copy)").await
    }

    /// Data that violates a new constraint: what made it is removed (by `undo`, recorded),
    /// the migration is recorded `aborted`, and the run stops naming the constraint and an
    /// example row.
    async fn violated(
        &mut self,
        table: &QualifiedName,
        constraint: &str,
        example: String,
        started: Instant,
    ) -> Result<(), MigrateError> {
        // The statement's other steps go too, so the table is as it was (but for catalog-only
        // subcommands that ran first, which are named).
        let done = Done::load(&self.control, self.id).await.during(self.id, self.phase, "reading the events")?;
        let undone = undo(&self.control, &done, table, &self.retry).await.during(
            self.id,
            self.phase,
            "removing what the statement's other steps made",
        )?;
        let mut example = example;
        if !undone.is_empty() {
            example.push_str(&format!("; also removed: {}", undone.join(", ")));
        }
        if let Some(ran) = done.find("statement", "instant") {
            let what = ran["ran"].as_str().unwrap_or("the catalog-only subcommands");
            example.push_str(&format!("; {what} had already run and stay"));
        }
        let message = format!("existing rows violate {constraint}: {example}");
        self.event("constraint_violated", &message, Some(started.elapsed()), None).await;
        state::set_phase(&self.control, self.id, Phase::Aborted, &message).await.during(
            self.id,
            self.phase,
            "recording the violation",
        )?;
        Err(MigrateError::Violated {
            id: self.id,
            table: table.to_string(),
            constraint: constraint.to_owned(),
            example,
        })
    }
}

/// For `abort` of an in-place run that stopped: removes what it made (see [`undo`]) and a
/// drop or rebuild it left halfway (a `REINDEX`'s `_ccnew` index dropped). Returns what it
/// removed.
pub async fn remove(
    client: &Client,
    m: &Migration,
    retry: &retry::RetryPolicy,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let done = Done::load(client, m.id).await?;
    let mut removed = undo(client, &done, &m.table, retry).await?;
    removed.extend(index::remove_leftovers(client, m).await?);
    Ok(removed)
}

/// Takes back what the in-place steps of a migration made (`done`, its events), newest first, as its events
/// record them: the constraints it added or attached are dropped, a NOT NULL it set is
/// dropped, the indexes it started building are dropped concurrently. The catalog-only
/// subcommands it ran stay (they are the user's statement, not ghostwire's scaffolding).
async fn undo(
    client: &Client,
    done: &Done,
    table: &QualifiedName,
    retry: &retry::RetryPolicy,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut removed = Vec::new();
    for (kind, details) in done.0.iter().rev() {
        match kind.as_str() {
            "constraint_added" | "constraint_attached" => {
                let Some(name) = details["constraint"].as_str() else { continue };
                if constraint::constraint_state(client, &table.sql(), name).await?.is_some() {
                    let sql = format!("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", table.sql(), ident(name));
                    retry::ddl(client, retry, "removing a constraint the run added", &sql).await?;
                    removed.push(format!("constraint {name}"));
                }
            }
            "not_null_set" => {
                let Some(column) = details["column"].as_str() else { continue };
                let sql = format!("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL", table.sql(), ident(column));
                retry::ddl(client, retry, "dropping a NOT NULL the run set", &sql).await?;
                removed.push(format!("NOT NULL on {column}"));
            }
            "index_build_started" => {
                let Some(name) = details["index"].as_str() else { continue };
                let index = QualifiedName::new(&table.schema, name);
                if index::exists(client, &index).await?.is_some() {
                    index::drop_concurrently(client, &index).await?;
                    removed.push(format!("index {name}"));
                }
            }
            _ => {}
        }
    }
    Ok(removed)
}

/// The statement a resumed in-place migration plans again, when its catalog-only
/// subcommands ran already (they cannot be planned twice: the column they added is there):
/// the statement without them, and the position in the statement of each subcommand left.
/// None: plan the whole statement.
pub async fn remaining_statement(
    client: &Client,
    m: &Migration,
) -> Result<Option<(String, Vec<usize>)>, tokio_postgres::Error> {
    let done = Done::load(client, m.id).await?;
    let Some(ran) = done.find("statement", "instant").and_then(|d| d["subcommands"].as_array()) else {
        return Ok(None);
    };
    let ran: Vec<usize> = ran.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect();
    let Ok(parsed) = crate::plan::parse::parse(&m.statement) else { return Ok(None) };
    let Some(first) = parsed.subcommands.first() else { return Ok(None) };
    let left: Vec<usize> = (0..parsed.subcommands.len()).filter(|i| !ran.contains(i)).collect();
    if left.is_empty() {
        return Ok(None);
    }
    let texts: Vec<&str> = left.iter().map(|&i| parsed.subcommand_text(i)).collect();
    Ok(Some((format!("{}{}", &parsed.text[..first.span.start], texts.join(", ")), left)))
}

/// A resumed in-place `DROP INDEX` whose index is gone: the run that stopped dropped it.
pub async fn drop_already_done(client: &Client, m: &Migration) -> Result<bool, tokio_postgres::Error> {
    let Ok(parsed) = crate::plan::parse::parse(&m.statement) else { return Ok(false) };
    let Some(Action::DropIndex { schema, name, .. }) = parsed.subcommands.first().map(|s| &s.action) else {
        return Ok(false);
    };
    let index = QualifiedName::new(schema.as_deref().unwrap_or(&m.table.schema), name);
    Ok(index::exists(client, &index).await?.is_none())
}
