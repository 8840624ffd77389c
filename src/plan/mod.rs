//! `ghostwire plan`: what a statement would do, decided before anything is touched.
//!
//! [`plan`] parses the statement (PostgreSQL's parser, via pg_query), reads the table from
//! the catalog, asks the server to validate each subcommand against an empty probe table
//! (see [`probe`]), classifies each subcommand ([`classify`]) and gathers what a shadow-table
//! swap would have to carry over. It refuses, with [`PlanError::is_refusal`], anything
//! ghostwire cannot do safely.

mod alter_action;
mod classify;
pub mod expr;
mod index_plan;
pub mod index_statement;
pub mod parse;
pub mod privileges;
mod probe;
pub mod report;

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

pub use classify::{LockHold, LockMode, Revert, Step, Strategy, describe};
pub use parse::{Action, NewConstraint, ParseError, ParsedStatement, TableRef};
pub use probe::{ColumnType, ProbeOutcome};
pub use report::render;

use crate::catalog::{self, CatalogError, Key, Persistence, TableDef, TableKind, ViewKind};
use crate::sql::QualifiedName;

#[derive(Debug, Error)]
pub enum PlanError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The statement or table is not something ghostwire can change safely.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Catalog(CatalogError),
    #[error("the database failed while planning: {}", crate::connect::describe(.0))]
    Database(#[from] tokio_postgres::Error),
}

impl From<CatalogError> for PlanError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Query(q) => PlanError::Database(q),
            other => PlanError::Catalog(other),
        }
    }
}

impl PlanError {
    /// Bad input (as opposed to a failure to reach or query the database).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, PlanError::Database(_))
    }
}

/// An object the swap recreates or moves to the new table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CarriedObject {
    pub kind: &'static str,
    pub name: String,
}

/// What ghostwire would do with a statement.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub statement: String,
    pub table: QualifiedName,
    /// The most involved strategy among the steps; `copy` means the whole statement runs
    /// against a shadow table.
    pub strategy: Strategy,
    pub summary: String,
    pub steps: Vec<Step>,
    /// The key rows are copied and captured by (when a copy is needed).
    pub key: Option<Key>,
    pub estimated_rows: i64,
    pub table_bytes: i64,
    pub index_bytes: i64,
    pub total_bytes: i64,
    /// Extra disk the migration needs while it runs (the shadow table and its indexes).
    pub disk_needed_bytes: i64,
    /// Objects the swap carries over to the new table (copy only).
    pub carried_over: Vec<CarriedObject>,
    pub revertible: bool,
    pub revert_notes: Vec<String>,
    pub warnings: Vec<String>,
    /// What the connected role lacks; those that `block` make `migrate` refuse.
    pub privileges: Vec<privileges::MissingPrivilege>,
    /// The capture modes this table, server and role allow (when a copy is needed).
    pub capture: Vec<CaptureOption>,
    #[serde(skip)]
    pub parsed: ParsedStatement,
    #[serde(skip)]
    pub table_def: TableDef,
}

/// A way to capture the application's writes during the copy, and whether it can be used.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureOption {
    pub mode: &'static str,
    pub available: bool,
    /// Why not, each with its fix.
    pub why_not: Vec<String>,
}

/// The PostgreSQL majors ghostwire is tested on.
pub const OLDEST_MAJOR: i32 = 14;
pub const NEWEST_MAJOR: i32 = 18;

/// Plans `sql` against the database behind `client`. Changes nothing.
pub async fn plan(client: &mut Client, sql: &str) -> Result<Plan, PlanError> {
    plan_statement(client, sql, false).await
}

/// Plans again the statement of a migration that stopped: what it made itself (an index
/// under the statement's name) is not held against it.
pub async fn replan(client: &mut Client, sql: &str) -> Result<Plan, PlanError> {
    plan_statement(client, sql, true).await
}

async fn plan_statement(client: &mut Client, sql: &str, resuming: bool) -> Result<Plan, PlanError> {
    let parsed = parse::parse(sql)?;
    if parsed.is_index_statement() {
        return index_plan::plan(client, parsed, resuming).await;
    }
    let (oid, _) = catalog::resolve(client, parsed.table.schema.as_deref(), &parsed.table.name).await?;
    let def = catalog::inspect(client, oid).await?;
    let mut warnings = Vec::new();
    check_version(&def, &mut warnings)?;
    refuse_table(&def)?;
    for (i, sub) in parsed.subcommands.iter().enumerate() {
        if let Action::Unsupported { what } = &sub.action {
            return Err(PlanError::Refused(format!(
                "`{}`: {what} is not supported by ghostwire; run it directly if it is safe for your table",
                parsed.subcommand_text(i)
            )));
        }
    }
    if let Some(why) = privileges::can_probe(client).await? {
        return Err(PlanError::Refused(why));
    }
    let outcomes = probe::probe(client, &def, &parsed, resuming).await?;
    for (i, outcome) in outcomes.iter().enumerate() {
        if let ProbeOutcome::Rejected { message, reliable } = outcome {
            if *reliable {
                return Err(PlanError::Refused(format!(
                    "PostgreSQL rejects `{}`: {message}",
                    parsed.subcommand_text(i)
                )));
            }
            warnings.push(format!(
                "could not check `{}` in advance ({message}); PostgreSQL checks it when the migration runs",
                parsed.subcommand_text(i)
            ));
        }
    }
    let mut steps = Vec::with_capacity(parsed.subcommands.len());
    for (i, (sub, outcome)) in parsed.subcommands.iter().zip(&outcomes).enumerate() {
        let widening = match (&sub.action, outcome) {
            (Action::AlterType { column, .. }, ProbeOutcome::Accepted { new_type: Some(t), .. }) => {
                match def.column(column) {
                    Some(c) => Some(probe::widens(client, (c.type_oid, c.typmod), t).await?),
                    None => None,
                }
            }
            _ => None,
        };
        steps.push(classify::classify(&def, parsed.subcommand_text(i), &sub.action, outcome, widening));
    }
    refuse_dropped_columns_under_views(&def, &parsed)?;
    let strategy = steps.iter().map(|s| s.strategy).max().unwrap_or(Strategy::Instant);
    let copy = strategy == Strategy::Copy;
    if copy {
        refuse_for_copy(&def, &parsed)?;
    }
    let in_place = !copy && in_place_steps(&steps);
    if in_place
        && steps.iter().any(|s| s.strategy == Strategy::Instant)
        && steps.iter().any(|s| s.strategy == Strategy::Online)
    {
        warnings.push(
            "the catalog-only subcommands run first, each recipe after them: if existing rows violate a new constraint, \
             what the recipes made is removed but the catalog-only subcommands stay (run them as a statement of their \
             own to keep them apart)"
                .into(),
        );
    }
    if strategy == Strategy::Online && !in_place {
        warnings.push(
            "this online recipe runs through the shadow table (copy and swap): a new column's own constraints and \
             EXCLUDE constraints have no in-place recipe"
                .into(),
        );
    }
    for s in &steps {
        let old_name = match &s.action {
            Action::RenameColumn { from, .. } => Some(from),
            Action::DropColumn { column, .. } => Some(column),
            _ => None,
        };
        if let Some(name) = old_name {
            warnings.push(format!(
                "`{}`: running code that uses {} breaks the moment this runs; `ghostwire migrate --version-schema \
                 SCHEMA` lets old and new code run side by side until `ghostwire finish`",
                s.subcommand,
                crate::sql::ident(name)
            ));
        }
        if let Action::AddColumn { not_null: true, has_default: false, generated: false, identity: false, .. } =
            s.action
            && def.estimated_rows > 0
        {
            warnings.push(format!("`{}` fails if the table has any rows: give the column a DEFAULT", s.subcommand));
        }
    }
    let through_shadow = strategy != Strategy::Instant && !in_place;
    for i in def.indexes.iter().filter(|i| !i.is_valid) {
        warnings.push(format!(
            "index {} is invalid (left by a failed CREATE INDEX CONCURRENTLY or REINDEX CONCURRENTLY): it slows every \
             write and serves no query{}",
            crate::sql::display_ident(&i.name),
            if through_shadow {
                "; the offline ALTER would fail on it, and `migrate` asks for --invalid-indexes rebuild (build it \
                 valid on the new table) or --invalid-indexes drop (leave it out)"
            } else {
                ""
            }
        ));
    }
    let summary = if through_shadow {
        format!(
            "copy {} into a shadow table with the change applied, capture concurrent writes (triggers, or \
             a replication slot with --capture logical), keep it in step, and swap the two in one short transaction",
            def.name
        )
    } else if strategy == Strategy::Online {
        format!(
            "change {} in place, with no copy: each step under a short lock_timeout, retrying with jitter; scans \
             (VALIDATE, concurrent index builds) run while reads and writes go on, and data that violates the change \
             removes what was made",
            def.name
        )
    } else {
        format!("run the statement directly on {} under a short lock_timeout, retrying with jitter", def.name)
    };
    let privileges = privileges::check(client, &def, if through_shadow { Strategy::Copy } else { strategy }).await?;
    let revert_notes: Vec<String> = steps
        .iter()
        .filter(|s| !s.revert.revertible || s.revert.note.contains("must"))
        .map(|s| format!("{}: {}", describe(&s.action), s.revert.note))
        .collect();
    let capture = if strategy == Strategy::Copy || (through_shadow && def.key.is_some()) {
        let logical = crate::replication::slot::refusals(client, &def).await?;
        vec![
            CaptureOption { mode: "trigger", available: true, why_not: Vec::new() },
            CaptureOption { mode: "logical", available: logical.is_empty(), why_not: logical },
        ]
    } else {
        Vec::new()
    };
    Ok(Plan {
        capture,
        statement: parsed.text.clone(),
        table: def.name.clone(),
        strategy,
        summary,
        revertible: steps.iter().all(|s| s.revert.revertible),
        revert_notes,
        key: if through_shadow { def.key.clone() } else { None },
        estimated_rows: def.estimated_rows,
        table_bytes: def.table_bytes,
        index_bytes: def.index_bytes,
        total_bytes: def.total_bytes,
        disk_needed_bytes: if through_shadow { def.total_bytes } else { 0 },
        carried_over: if through_shadow { carried_over(&def) } else { Vec::new() },
        warnings,
        privileges,
        steps,
        parsed,
        table_def: def,
    })
}

/// Whether steps can all run in place, with no copy: catalog-only ones, and the online
/// recipes `migrate` runs in place (constraints added NOT VALID then validated, SET NOT
/// NULL through a validated check, UNIQUE/PRIMARY KEY through a concurrent index build,
/// VALIDATE CONSTRAINT, and the index statements).
pub fn in_place_steps(steps: &[classify::Step]) -> bool {
    steps.iter().all(|s| {
        s.strategy == Strategy::Instant
            || matches!(
                s.action,
                Action::AddConstraint {
                    constraint: parse::NewConstraint::Check | parse::NewConstraint::ForeignKey,
                    using_index: false,
                    ..
                } | Action::AddConstraint { index: Some(_), .. }
                    | Action::SetNotNull { .. }
                    | Action::ValidateConstraint { .. }
                    | Action::CreateIndex { .. }
                    | Action::DropIndex { .. }
                    | Action::Reindex { .. }
            )
    })
}

/// Refuses a server older than the oldest major ghostwire supports; warns on a newer one.
fn check_version(def: &TableDef, warnings: &mut Vec<String>) -> Result<(), PlanError> {
    match def.server_version_num / 10000 {
        major if major < OLDEST_MAJOR => {
            return Err(PlanError::Refused(format!(
                "PostgreSQL {major} is not supported: ghostwire runs on PostgreSQL {OLDEST_MAJOR} to {NEWEST_MAJOR}, \
                 each tested (PostgreSQL {major} is past its end of life; upgrade it first)"
            )));
        }
        major if major > NEWEST_MAJOR => warnings.push(format!(
            "PostgreSQL {major} is newer than any ghostwire was tested on ({OLDEST_MAJOR} to {NEWEST_MAJOR}); its catalog \
             may hold what this version cannot carry over: try it on a copy first"
        )),
        _ => {}
    }
    Ok(())
}

fn refuse_table(def: &TableDef) -> Result<(), PlanError> {
    let system = ["pg_catalog", "information_schema", "pg_toast"];
    let why = if system.contains(&def.name.schema.as_str()) || def.name.schema.starts_with("pg_toast") {
        "is a system catalog: its definition belongs to PostgreSQL"
    } else if def.kind == TableKind::Partitioned {
        "is partitioned; ghostwire does not change partitioned tables yet (alter the partitions one by one, or the parent directly if the change is catalog-only)"
    } else if def.is_partition {
        "is a partition; ghostwire does not change partitions yet"
    } else if def.has_inheritance {
        "takes part in table inheritance; ghostwire does not change inheritance parents or children"
    } else if def.persistence == Persistence::Temporary {
        "is a temporary table, visible only to its own session"
    } else {
        return Ok(());
    };
    Err(PlanError::Refused(format!("{} {why}", def.name)))
}

/// PostgreSQL refuses to drop a column a view reads unless CASCADE drops the view too.
fn refuse_dropped_columns_under_views(def: &TableDef, parsed: &ParsedStatement) -> Result<(), PlanError> {
    for sub in &parsed.subcommands {
        if let Action::DropColumn { column, cascade: false } = &sub.action
            && let Some(v) = def.views.iter().find(|v| v.reads_columns.contains(column))
        {
            return Err(PlanError::Refused(format!(
                "view {} reads column {column}: PostgreSQL refuses to drop it; change or drop the view first \
                 (or add CASCADE to drop the view with the column)",
                v.name
            )));
        }
    }
    Ok(())
}

/// Conditions a shadow-table copy needs.
fn refuse_for_copy(def: &TableDef, parsed: &ParsedStatement) -> Result<(), PlanError> {
    let Some(key) = &def.key else {
        return Err(PlanError::Refused(format!(
            "{} has neither a primary key nor a unique index on NOT NULL columns, and this change needs a \
             copy: ghostwire copies and captures rows by key. Add a primary key first.",
            def.name
        )));
    };
    let key_constraint = def.index(&key.index_name).and_then(|i| i.constraint.clone());
    for sub in &parsed.subcommands {
        match &sub.action {
            Action::DropColumn { column, .. } if key.columns.contains(column) => {
                return Err(PlanError::Refused(format!(
                    "the change drops column {column}, part of the key ({}) ghostwire copies by; \
                     change the key in a separate migration first",
                    key.index_name
                )));
            }
            Action::DropConstraint { name, .. } if Some(name) == key_constraint.as_ref() => {
                return Err(PlanError::Refused(format!(
                    "the change drops {name}, the key ghostwire copies by; change the key in a separate \
                     migration first"
                )));
            }
            _ => {}
        }
    }
    if let Some(v) = def.views.iter().find(|v| v.kind == ViewKind::Materialized) {
        return Err(PlanError::Refused(format!(
            "materialized view {} reads {}: ghostwire cannot carry it over to the new table yet; drop it \
             before the migration and recreate it after",
            v.name, def.name
        )));
    }
    if let Some(user) = def.row_type_users.first() {
        return Err(PlanError::Refused(format!(
            "{user} uses the row type of {}: it would keep pointing at the old table after the swap; \
             change it to not use the row type, or migrate without ghostwire",
            def.name
        )));
    }
    Ok(())
}

fn carried_over(def: &TableDef) -> Vec<CarriedObject> {
    let mut out = Vec::new();
    let mut add = |kind, name: String| out.push(CarriedObject { kind, name });
    for i in def.indexes.iter().filter(|i| i.is_valid) {
        add("index", i.name.clone());
    }
    for c in &def.constraints {
        let kind = match c.kind {
            catalog::ConstraintKind::ForeignKey => "foreign key",
            _ => "constraint",
        };
        add(kind, c.name.clone());
    }
    for f in &def.referencing_foreign_keys {
        add("referencing foreign key", format!("{} on {}", f.name, f.table));
    }
    for t in &def.triggers {
        add("trigger", t.name.clone());
    }
    for r in &def.rules {
        add("rule", r.name.clone());
    }
    for v in &def.views {
        add("view", v.name.to_string());
    }
    if def.row_security || def.force_row_security {
        add("row level security", if def.force_row_security { "enabled, forced" } else { "enabled" }.into());
    }
    for p in &def.policies {
        add("policy", p.name.clone());
    }
    for g in &def.grants {
        add("grant", format!("{} to {}", g.privilege, g.grantee));
    }
    for c in &def.columns {
        for g in &c.grants {
            add("column grant", format!("{} ({}) to {}", g.privilege, c.name, g.grantee));
        }
    }
    for p in &def.publications {
        add("publication", p.publication.clone());
    }
    if def.replica_identity != catalog::ReplicaIdentity::Default {
        add("replica identity", format!("{:?}", def.replica_identity).to_lowercase());
    }
    if def.comment.is_some() {
        add("comment", "table comment".into());
    }
    for o in &def.reloptions {
        add("storage parameter", o.clone());
    }
    for c in def.columns.iter().filter(|c| c.statistics_target.is_some()) {
        add("statistics target", c.name.clone());
    }
    for s in &def.statistics {
        add("extended statistics", s.name.to_string());
    }
    for s in &def.owned_sequences {
        add("sequence", s.name.to_string());
    }
    add("owner", def.owner.clone());
    out
}
