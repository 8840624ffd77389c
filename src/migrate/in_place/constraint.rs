//! CHECK and FOREIGN KEY constraints added `NOT VALID` then validated, and `SET NOT NULL`
//! through a validated CHECK. A constraint the user wrote `NOT VALID` is added and left so.
//! Data that violates a constraint is found by its validation: the constraint is dropped
//! again, and the run stops naming it with an example row.

use std::time::Instant;

use serde_json::json;
use tokio_postgres::Client;

use super::{Done, insert_event};
use crate::migrate::error::{Context as _, MigrateError};
use crate::migrate::retry::{self, LockTimes};
use crate::migrate::run::Run;
use crate::sql::{QualifiedName, ident};
use crate::state::Phase;

async fn constraint_names(client: &Client, table: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query("SELECT conname::text FROM pg_catalog.pg_constraint WHERE conrelid = $1::text::regclass", &[&table])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Whether constraint `name` of `table` exists, and is validated.
pub(super) async fn constraint_state(
    client: &Client,
    table: &str,
    name: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT convalidated FROM pg_catalog.pg_constraint WHERE conrelid = $1::text::regclass AND conname = $2",
            &[&table, &name],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

impl Run<'_> {
    /// `ADD CONSTRAINT … CHECK / FOREIGN KEY`: NOT VALID (a short lock, retried), then validated.
    pub(super) async fn add_constraint(
        &mut self,
        table: &QualifiedName,
        step: &str,
        subcommand: &str,
        not_valid: bool,
        done: &Done,
    ) -> Result<(), MigrateError> {
        let sql_table = table.sql();
        let added = done.name("constraint_added", step, "constraint");
        let present = match &added {
            Some(name) => constraint_state(&self.control, &sql_table, name).await.during(
                self.id,
                self.phase,
                "looking for the constraint",
            )?,
            None => None,
        };
        let name = match (added, present) {
            (Some(name), Some(_)) => name,
            _ => {
                self.enter(Phase::Cutover, &format!("adding NOT VALID: {subcommand}")).await?;
                let text = if not_valid { subcommand.to_owned() } else { format!("{subcommand} NOT VALID") };
                let (name, times) = self.add_not_valid(table, step, &text).await?;
                crate::failpoint::hit("in_place.added");
                self.reporter.note(&format!(
                    "added {name} NOT VALID (lock held {:.1} ms, {} attempt(s))",
                    times.held.as_secs_f64() * 1000.0,
                    times.attempts
                ));
                name
            }
        };
        if not_valid {
            return Ok(());
        }
        self.validate_added(table, step, &name, &format!("constraint {name}")).await
    }

    /// Adds a constraint (`text`, a subcommand) and records its name, found by comparing the
    /// table's constraints before and after, in the same transaction.
    async fn add_not_valid(
        &self,
        table: &QualifiedName,
        step: &str,
        text: &str,
    ) -> Result<(String, LockTimes), MigrateError> {
        let (client, id, phase) = (&self.control, self.id, self.phase);
        let sql_table = table.sql();
        let (sql_table, text) = (sql_table.as_str(), text);
        let ((name, event), times) =
            retry::transaction(&self.control, &self.retry, "adding the constraint NOT VALID", move || async move {
                let before = constraint_names(client, sql_table).await?;
                client.batch_execute(&format!("ALTER TABLE {sql_table} {text}")).await?;
                let after = constraint_names(client, sql_table).await?;
                let name = after.into_iter().find(|n| !before.contains(n)).unwrap_or_default();
                let details = json!({"step": step, "constraint": name});
                let event =
                    insert_event(client, id, phase, "constraint_added", &format!("added {name} NOT VALID"), &details)
                        .await?;
                Ok((name, event))
            })
            .await
            .during(self.id, self.phase, "adding the constraint NOT VALID")?;
        super::finish_event(&self.control, event, &times).await;
        if name.is_empty() {
            return Err(MigrateError::Refused(format!("the constraint of `{text}` was not found after adding it")));
        }
        Ok((name, times))
    }

    /// `VALIDATE CONSTRAINT` (it scans without blocking writes), recorded as an event.
    /// PostgreSQL's error is returned for the caller to judge.
    async fn run_validate(
        &mut self,
        table: &QualifiedName,
        step: &str,
        name: &str,
    ) -> Result<Result<(), tokio_postgres::Error>, MigrateError> {
        self.enter(Phase::Verify, &format!("validating {name} (reads and writes go on)")).await?;
        let t = Instant::now();
        let validate = format!("ALTER TABLE {} VALIDATE CONSTRAINT {}", table.sql(), ident(name));
        let result = retry::ddl(&self.control, &self.retry, "validating the constraint", &validate).await;
        if result.is_ok() {
            let details = json!({"step": step, "constraint": name});
            self.event("constraint_validated", &format!("validated {name}"), Some(t.elapsed()), Some(details)).await;
        }
        Ok(result)
    }

    /// `VALIDATE CONSTRAINT` as the user asked it.
    pub(super) async fn validate_constraint(
        &mut self,
        table: &QualifiedName,
        step: &str,
        name: &str,
    ) -> Result<(), MigrateError> {
        self.run_validate(table, step, name).await?.during(self.id, self.phase, "validating the constraint")
    }

    /// Validates a constraint this run added; violating rows remove it. `shown` names it in
    /// the error (`constraint qty_nonneg`, `NOT NULL on column note`).
    async fn validate_added(
        &mut self,
        table: &QualifiedName,
        step: &str,
        name: &str,
        shown: &str,
    ) -> Result<(), MigrateError> {
        let t = Instant::now();
        let e = match self.run_validate(table, step, name).await? {
            Ok(()) => return Ok(()),
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("23")) => e,
            Err(e) => return Err(e).during(self.id, self.phase, "validating the constraint"),
        };
        // ghostwire's own helper check is not the user's business: say what it means.
        let helper = name.starts_with(&format!("ghostwire_{}_", self.id));
        let mut example = match e.as_db_error() {
            _ if helper => "the column holds NULLs".to_owned(),
            Some(d) => format!("{}{}", d.message(), d.detail().map(|x| format!(" ({x})")).unwrap_or_default()),
            None => e.to_string(),
        };
        let sql_table = table.sql();
        if let Some(row) = failing_row(&self.control, &sql_table, name).await {
            example.push_str(&format!("; for example the row {row}"));
        }
        let drop = format!("ALTER TABLE {sql_table} DROP CONSTRAINT IF EXISTS {}", ident(name));
        retry::ddl(&self.control, &self.retry, "removing the constraint", &drop).await.during(
            self.id,
            self.phase,
            "removing the constraint that existing rows violate",
        )?;
        self.violated(table, shown, example, t).await
    }

    /// `SET NOT NULL` without a scan under ACCESS EXCLUSIVE: `CHECK (col IS NOT NULL) NOT
    /// VALID`, validated, then `SET NOT NULL` (proved by the check) and the check dropped in
    /// one short transaction.
    pub(super) async fn set_not_null(
        &mut self,
        table: &QualifiedName,
        step: &str,
        column: &str,
        done: &Done,
    ) -> Result<(), MigrateError> {
        if done.find("not_null_set", step).is_some() {
            return Ok(());
        }
        let sql_table = table.sql();
        let helper = format!("ghostwire_{}_{}_not_null", self.id, step.replace('.', "_"));
        let present = constraint_state(&self.control, &sql_table, &helper).await.during(
            self.id,
            self.phase,
            "looking for the constraint",
        )?;
        if present.is_none() {
            self.enter(Phase::Cutover, &format!("adding CHECK ({} IS NOT NULL) NOT VALID", ident(column))).await?;
            let text = format!("ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID", ident(&helper), ident(column));
            self.add_not_valid(table, step, &text).await?;
        }
        if present != Some(true) {
            self.validate_added(
                table,
                step,
                &helper,
                &format!("NOT NULL on column {}", crate::sql::display_ident(column)),
            )
            .await?;
        }
        self.enter(Phase::Cutover, &format!("SET NOT NULL on {} (proved by the validated check)", ident(column)))
            .await?;
        let sql = format!(
            "ALTER TABLE {sql_table} ALTER COLUMN {} SET NOT NULL; ALTER TABLE {sql_table} DROP CONSTRAINT {}",
            ident(column),
            ident(&helper)
        );
        let message = format!("{} SET NOT NULL", ident(column));
        let times = self
            .recorded("setting NOT NULL", &sql, "not_null_set", &message, json!({"step": step, "column": column}))
            .await?;
        self.reporter.note(&format!(
            "{message} (lock held {:.1} ms, {} attempt(s))",
            times.held.as_secs_f64() * 1000.0,
            times.attempts
        ));
        Ok(())
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
