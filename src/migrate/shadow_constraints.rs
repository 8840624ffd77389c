//! The shadow's foreign keys and NOT VALID checks, taken off for the copy: recorded in the
//! spec, dropped, and added again at the swap (NOT VALID checks hold for new rows only, and
//! the copy inserts old ones; foreign keys would check every copied row).

use std::collections::HashMap;

use tokio_postgres::Client;

use super::shadow::{ShadowColumn, constraint_names_used};
use super::spec::ForeignKey;
use crate::catalog::{ConstraintKind, TableDef};
use crate::plan::Plan;
use crate::sql::ident;

/// The new table's foreign keys: those the statement left on the shadow (recorded, then
/// dropped so the copy does not check every row), plus the original's that it did not touch
/// and whose columns all remain.
pub(super) async fn foreign_keys(
    client: &Client,
    def: &TableDef,
    shadow_sql: &str,
    before: &HashMap<i16, String>,
    columns: &[ShadowColumn],
    plan: &Plan,
) -> Result<Vec<ForeignKey>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for (name, definition, validated) in take_constraints(client, shadow_sql, "contype = 'f'").await? {
        let original = def.constraint(&name);
        out.push(ForeignKey {
            definition,
            validate: original.is_none_or(|c| c.validated) || validated,
            comment: original.and_then(|c| c.comment.clone()),
            name,
        });
    }
    let touched = constraint_names_used(plan);
    let remaining: Vec<&String> =
        before.iter().filter(|(n, _)| columns.iter().any(|c| c.attnum == **n)).map(|(_, name)| name).collect();
    for c in def.constraints.iter().filter(|c| c.kind == ConstraintKind::ForeignKey) {
        if touched.contains(&c.name) || out.iter().any(|f| f.name == c.name) {
            continue;
        }
        let columns_remain =
            c.attnums.iter().all(|n| def.column_by_attnum(*n).is_some_and(|col| remaining.contains(&&col.name)));
        if columns_remain {
            out.push(ForeignKey {
                name: c.name.clone(),
                definition: strip_not_valid(&c.definition),
                validate: c.validated,
                comment: c.comment.clone(),
            });
        }
    }
    Ok(out)
}

/// Records and drops the shadow's NOT VALID checks: they hold for new rows only, and the
/// copy inserts old ones.
pub(super) async fn defer_unvalidated_checks(
    client: &Client,
    shadow_sql: &str,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let taken = take_constraints(client, shadow_sql, "contype = 'c' AND NOT convalidated").await?;
    Ok(taken.into_iter().map(|(name, definition, _)| (name, definition)).collect())
}

/// Drops the shadow's constraints matching `filter` (SQL over `pg_constraint`, no user
/// input); returns each one's name, definition (without `NOT VALID`) and whether it was
/// validated.
pub(super) async fn take_constraints(
    client: &Client,
    shadow_sql: &str,
    filter: &str,
) -> Result<Vec<(String, String, bool)>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT conname::text, pg_get_constraintdef(oid), convalidated FROM pg_constraint
                  WHERE conrelid = $1::text::regclass AND {filter} ORDER BY conname"
            ),
            &[&shadow_sql],
        )
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.get(0);
        client.batch_execute(&format!("ALTER TABLE {shadow_sql} DROP CONSTRAINT {}", ident(&name))).await?;
        out.push((name, strip_not_valid(&r.get::<_, String>(1)), r.get(2)));
    }
    Ok(out)
}

pub(super) fn strip_not_valid(definition: &str) -> String {
    definition.strip_suffix(" NOT VALID").unwrap_or(definition).to_owned()
}
