//! Asking PostgreSQL itself whether a subcommand is valid and whether it rewrites the table.
//!
//! Each subcommand runs, as the user wrote it, against an empty temporary table shaped like
//! the original (`LIKE … INCLUDING DEFAULTS, CONSTRAINTS, GENERATED, IDENTITY, STORAGE,
//! COMPRESSION`), in a transaction that is always rolled back. A new relfilenode afterwards
//! means PostgreSQL rewrote the table for it, which is exactly its own rule (volatile
//! defaults, domains with constraints, non-coercible type changes, time zone dependent
//! casts, …). The original is only read (`LIKE` takes ACCESS SHARE, under a short
//! lock_timeout); nothing is left behind.

use serde::Serialize;
use tokio_postgres::Client;

use super::parse::{Action, NewConstraint, ParsedStatement};
use crate::catalog::TableDef;
use crate::sql::ident;

/// A column type as PostgreSQL resolved it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnType {
    pub oid: u32,
    pub typmod: i32,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum ProbeOutcome {
    /// The probe table cannot stand in for this subcommand (it names foreign keys, indexes,
    /// triggers, … that the probe lacks).
    Skipped,
    Accepted {
        rewrites: bool,
        /// For ALTER COLUMN … TYPE: the column's new type.
        new_type: Option<ColumnType>,
    },
    /// PostgreSQL rejected the subcommand. `reliable` is false when an earlier subcommand
    /// was skipped, so the rejection may come from the probe rather than the statement.
    Rejected { message: String, reliable: bool },
}

/// Whether the probe table can stand in for `action`.
fn probeable(action: &Action) -> bool {
    match action {
        Action::AddColumn { constraints, .. } => !constraints.contains(&NewConstraint::ForeignKey),
        Action::DropColumn { .. }
        | Action::SetDefault { .. }
        | Action::DropDefault { .. }
        | Action::AlterType { .. }
        | Action::SetNotNull { .. }
        | Action::DropNotNull { .. }
        | Action::SetExpression { .. }
        | Action::DropExpression { .. }
        | Action::RenameColumn { .. } => true,
        Action::AddConstraint { constraint, using_index, .. } => {
            !using_index && !matches!(constraint, NewConstraint::ForeignKey)
        }
        Action::Metadata { column, .. } => column.is_some(),
        _ => false,
    }
}

/// Runs the probe; one outcome per subcommand. Errors are connection or setup failures.
pub async fn probe(
    client: &mut Client,
    table: &TableDef,
    stmt: &ParsedStatement,
    resuming: bool,
) -> Result<Vec<ProbeOutcome>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'; SET LOCAL statement_timeout = '30s'").await?;
    // Named like the original so that table-qualified column references in expressions
    // resolve; the temporary schema is searched first in this session.
    let probe = format!("pg_temp.{}", ident(&table.name.name));
    tx.batch_execute(&format!(
        "CREATE TEMPORARY TABLE {probe} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS \
         INCLUDING GENERATED INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMPRESSION)",
        table.name.sql()
    ))
    .await?;
    let relfilenode =
        tx.prepare(&format!("SELECT relfilenode FROM pg_catalog.pg_class WHERE oid = '{probe}'::regclass")).await?;
    let column_type = tx
        .prepare(&format!(
            "SELECT atttypid, atttypmod, pg_catalog.format_type(atttypid, atttypmod)
               FROM pg_catalog.pg_attribute
              WHERE attrelid = '{probe}'::regclass AND attname = $1 AND NOT attisdropped"
        ))
        .await?;
    let mut outcomes = Vec::with_capacity(stmt.subcommands.len());
    let mut skipped_before = false;
    for (i, sub) in stmt.subcommands.iter().enumerate() {
        if !probeable(&sub.action) {
            skipped_before = true;
            outcomes.push(ProbeOutcome::Skipped);
            continue;
        }
        let before: u32 = tx.query_one(&relfilenode, &[]).await?.get(0);
        tx.batch_execute("SAVEPOINT ghostwire_probe").await?;
        // A resumed migration may have added its named constraint already (NOT VALID, its
        // validation cut short): the probe's copy of the table goes without it, as the
        // table was when the migration was planned.
        if let (true, Action::AddConstraint { name: Some(name), .. }) = (resuming, &sub.action) {
            tx.batch_execute(&format!("ALTER TABLE {probe} DROP CONSTRAINT IF EXISTS {}", ident(name))).await?;
        }
        match tx.batch_execute(&stmt.single(i, &probe)).await {
            Ok(()) => {
                let after: u32 = tx.query_one(&relfilenode, &[]).await?.get(0);
                let new_type = match &sub.action {
                    Action::AlterType { column, .. } => tx
                        .query_opt(&column_type, &[column])
                        .await?
                        .map(|r| ColumnType { oid: r.get(0), typmod: r.get(1), name: r.get(2) }),
                    _ => None,
                };
                tx.batch_execute("RELEASE SAVEPOINT ghostwire_probe").await?;
                outcomes.push(ProbeOutcome::Accepted { rewrites: before != after, new_type });
            }
            Err(e) => {
                let message = match e.as_db_error() {
                    Some(db) => db.message().to_owned(),
                    None => return Err(e),
                };
                tx.batch_execute("ROLLBACK TO SAVEPOINT ghostwire_probe").await?;
                outcomes.push(ProbeOutcome::Rejected { message, reliable: !skipped_before });
            }
        }
    }
    tx.rollback().await?;
    Ok(outcomes)
}

/// Whether changing a column from `from` to `to` loses no information, asked of the server:
/// the same type with a wider or unlimited modifier, or an implicit cast into a type without
/// a modifier (integer → bigint, varchar(n) → text). `text → varchar(10)` or
/// `numeric(10,2) → numeric(10,0)` narrow: their old values cannot be restored.
pub async fn widens(client: &Client, from: (u32, i32), to: &ColumnType) -> Result<bool, tokio_postgres::Error> {
    if from.0 == to.oid {
        return Ok(to.typmod == -1 || (from.1 != -1 && to.typmod >= from.1));
    }
    let row = client
        .query_opt(
            "SELECT castcontext::text FROM pg_catalog.pg_cast WHERE castsource = $1 AND casttarget = $2",
            &[&from.0, &to.oid],
        )
        .await?;
    Ok(to.typmod == -1 && row.is_some_and(|r| r.get::<_, String>(0) == "i"))
}
