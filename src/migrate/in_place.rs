//! Changes with no copy: a catalog-only statement run directly, and online recipes run in
//! place (issue 18, first part): a statement whose
//! subcommands are catalog-only or `ADD CONSTRAINT … CHECK` / `… FOREIGN KEY` changes the
//! table through short locks only:
//!
//! 1. the catalog-only subcommands, in one `ALTER TABLE` under `--lock-timeout` (retried);
//! 2. each constraint added `NOT VALID` (a short lock on the table, and for a foreign key on
//!    the table it references, retried), then `VALIDATE CONSTRAINT` (SHARE UPDATE EXCLUSIVE:
//!    reads and writes go on while it scans).
//!
//! Data that violates a constraint is found by its validation: the constraint is dropped
//! again, and the run stops naming it with PostgreSQL's example row. A constraint the user
//! wrote `NOT VALID` is added and left so. Each step is an event with its duration.

use std::time::Instant;

use serde_json::json;
use tokio_postgres::Client;

use super::error::{Context as _, MigrateError};
use super::retry;
use super::run::Run;
use crate::plan::parse::Action;
use crate::plan::{Plan, Strategy};
use crate::sql::ident;
use crate::state::Phase;

/// Whether `plan` runs in place: online, and every subcommand either catalog-only or a
/// CHECK or FOREIGN KEY constraint.
pub fn runs_in_place(plan: &Plan) -> bool {
    plan.strategy == Strategy::Online && crate::plan::in_place_steps(&plan.steps)
}

async fn constraint_names(client: &Client, table: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query("SELECT conname::text FROM pg_catalog.pg_constraint WHERE conrelid = $1::text::regclass", &[&table])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

impl Run<'_> {
    /// A catalog-only statement: run as it is, under the lock timeout, retried.
    pub(super) async fn run_directly(&mut self, plan: &Plan) -> Result<(), MigrateError> {
        self.enter(Phase::Cutover, "running the statement directly (catalog-only change)").await?;
        let t = Instant::now();
        retry::ddl(&self.control, &self.retry, "running the statement", &plan.parsed.text).await.during(
            self.id,
            Phase::Cutover,
            "running the statement",
        )?;
        self.event("statement", "statement run", Some(t.elapsed()), None).await;
        self.enter(Phase::Finished, "finished").await
    }

    /// Runs `plan` in place (see the module); the migration ends `finished`.
    pub(super) async fn in_place(&mut self, plan: &Plan) -> Result<(), MigrateError> {
        let table = plan.table.sql();
        let instant: Vec<&str> =
            plan.steps.iter().filter(|s| s.strategy == Strategy::Instant).map(|s| s.subcommand.as_str()).collect();
        if !instant.is_empty() {
            self.enter(Phase::Cutover, "running the catalog-only subcommands").await?;
            let t = Instant::now();
            let sql = format!("ALTER TABLE {table} {}", instant.join(", "));
            retry::ddl(&self.control, &self.retry, "running the catalog-only subcommands", &sql).await.during(
                self.id,
                Phase::Cutover,
                "running the catalog-only subcommands",
            )?;
            self.event("statement", &format!("ran {}", instant.join(", ")), Some(t.elapsed()), None).await;
        }
        for step in plan.steps.iter().filter(|s| s.strategy != Strategy::Instant) {
            let Action::AddConstraint { not_valid, .. } = &step.action else { continue };
            self.enter(Phase::Cutover, &format!("adding NOT VALID: {}", step.subcommand)).await?;
            let before =
                constraint_names(&self.control, &table).await.during(self.id, self.phase, "listing constraints")?;
            let text = if *not_valid { step.subcommand.clone() } else { format!("{} NOT VALID", step.subcommand) };
            let t = Instant::now();
            retry::ddl(
                &self.control,
                &self.retry,
                "adding the constraint NOT VALID",
                &format!("ALTER TABLE {table} {text}"),
            )
            .await
            .during(self.id, self.phase, "adding the constraint NOT VALID")?;
            let after =
                constraint_names(&self.control, &table).await.during(self.id, self.phase, "listing constraints")?;
            let Some(name) = after.into_iter().find(|n| !before.contains(n)) else {
                return Err(MigrateError::Refused(format!(
                    "the constraint of `{}` was not found after adding it",
                    step.subcommand
                )));
            };
            self.event(
                "constraint_added",
                &format!("added {name} NOT VALID"),
                Some(t.elapsed()),
                Some(json!({"constraint": name})),
            )
            .await;
            if *not_valid {
                continue;
            }
            self.enter(Phase::Verify, &format!("validating {name} (reads and writes go on)")).await?;
            let t = Instant::now();
            let validate = format!("ALTER TABLE {table} VALIDATE CONSTRAINT {}", ident(&name));
            match retry::ddl(&self.control, &self.retry, "validating the constraint", &validate).await {
                Ok(()) => {
                    self.event("constraint_validated", &format!("validated {name}"), Some(t.elapsed()), None).await;
                }
                Err(e) if e.code().is_some_and(|c| c.code().starts_with("23")) => {
                    let mut example = e
                        .as_db_error()
                        .map(|d| {
                            format!("{}{}", d.message(), d.detail().map(|x| format!(" ({x})")).unwrap_or_default())
                        })
                        .unwrap_or_else(|| e.to_string());
                    if let Some(row) = failing_row(&self.control, &table, &name).await {
                        example.push_str(&format!("; for example the row {row}"));
                    }
                    let drop = format!("ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {}", ident(&name));
                    retry::ddl(&self.control, &self.retry, "removing the constraint", &drop).await.during(
                        self.id,
                        self.phase,
                        "removing the constraint that existing rows violate",
                    )?;
                    let message = format!("existing rows violate {name}: {example}; the constraint was removed");
                    self.event("constraint_violated", &message, Some(t.elapsed()), None).await;
                    crate::state::set_phase(&self.control, self.id, Phase::Aborted, &message).await.during(
                        self.id,
                        self.phase,
                        "recording the violation",
                    )?;
                    return Err(MigrateError::Violated {
                        id: self.id,
                        table: plan.table.to_string(),
                        constraint: name,
                        example,
                    });
                }
                Err(e) => return Err(e).during(self.id, self.phase, "validating the constraint"),
            }
        }
        self.enter(Phase::Finished, "finished (in place, no copy)").await
    }
}

/// A row violating the CHECK constraint `name` (PostgreSQL's VALIDATE does not show one),
/// as the row's text.
async fn failing_row(client: &Client, table: &str, name: &str) -> Option<String> {
    let def: String = client
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_catalog.pg_constraint
              WHERE conrelid = $1::text::regclass AND conname = $2 AND contype = 'c'",
            &[&table, &name],
        )
        .await
        .ok()?
        .get(0);
    let check = def.strip_prefix("CHECK ")?;
    let expr = check.strip_suffix(" NOT VALID").unwrap_or(check);
    let sql = format!("SELECT t::text FROM {table} t WHERE NOT {expr} LIMIT 1");
    client.query_opt(&sql, &[]).await.ok()?.map(|r| r.get(0))
}
