//! Classifying each subcommand: its strategy, the locks it takes run plainly versus through
//! ghostwire, and whether it can be reverted without loss.

use serde::Serialize;

use super::parse::{Action, NewConstraint};
use super::probe::ProbeOutcome;
use crate::catalog::TableDef;

/// How a subcommand is carried out, from cheapest to most involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Catalog-only: runs directly with a short lock_timeout and retries.
    Instant,
    /// A known safe recipe (NOT VALID + VALIDATE, CREATE INDEX CONCURRENTLY, …).
    Online,
    /// Needs the shadow table: copy, capture, swap.
    Copy,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Instant => "instant",
            Strategy::Online => "online",
            Strategy::Copy => "copy",
        }
    }
}

/// PostgreSQL table lock modes, weakest to strongest (the ones ALTER TABLE takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LockMode {
    ShareUpdateExclusive,
    Share,
    ShareRowExclusive,
    AccessExclusive,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::ShareUpdateExclusive => "SHARE UPDATE EXCLUSIVE",
            LockMode::Share => "SHARE",
            LockMode::ShareRowExclusive => "SHARE ROW EXCLUSIVE",
            LockMode::AccessExclusive => "ACCESS EXCLUSIVE",
        }
    }

    /// What the lock stops, in an operator's terms.
    pub fn blocks(self) -> &'static str {
        match self {
            LockMode::ShareUpdateExclusive => "blocks other schema changes and VACUUM; reads and writes continue",
            LockMode::Share | LockMode::ShareRowExclusive => "blocks writes; reads continue",
            LockMode::AccessExclusive => "blocks all reads and writes",
        }
    }
}

/// A lock and how long it is held.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LockHold {
    pub mode: LockMode,
    /// What determines how long it is held, in words.
    pub held_for: String,
    /// Estimated seconds the lock is held, when it scales with the table.
    pub estimated_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Revert {
    pub revertible: bool,
    pub note: String,
}

/// The plan for one subcommand.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// The subcommand as the user wrote it.
    pub subcommand: String,
    pub action: Action,
    pub strategy: Strategy,
    pub reason: String,
    /// Running the subcommand as a plain ALTER TABLE.
    pub naive: LockHold,
    /// Running it through ghostwire.
    pub ghostwire: LockHold,
    pub revert: Revert,
    pub probe: ProbeOutcome,
}

/// Throughput assumptions for lock-time estimates (measured on PostgreSQL 15: a 294 MB table
/// with its indexes rewrote in 4.8 s; sequential scans run several times faster).
const REWRITE_BYTES_PER_SEC: f64 = 60e6;
const SCAN_BYTES_PER_SEC: f64 = 300e6;

fn seconds(bytes: i64, rate: f64) -> Option<f64> {
    Some(((bytes as f64 / rate) * 100.0).round() / 100.0)
}

/// A short human name for an action, e.g. `ALTER COLUMN amount TYPE`.
pub fn describe(action: &Action) -> String {
    match action {
        Action::AddColumn { column, .. } => format!("ADD COLUMN {column}"),
        Action::DropColumn { column, .. } => format!("DROP COLUMN {column}"),
        Action::SetDefault { column } => format!("ALTER COLUMN {column} SET DEFAULT"),
        Action::DropDefault { column } => format!("ALTER COLUMN {column} DROP DEFAULT"),
        Action::AlterType { column, .. } => format!("ALTER COLUMN {column} TYPE"),
        Action::SetNotNull { column } => format!("ALTER COLUMN {column} SET NOT NULL"),
        Action::DropNotNull { column } => format!("ALTER COLUMN {column} DROP NOT NULL"),
        Action::SetExpression { column } => format!("ALTER COLUMN {column} SET EXPRESSION"),
        Action::DropExpression { column } => format!("ALTER COLUMN {column} DROP EXPRESSION"),
        Action::AddConstraint { constraint, .. } => format!("ADD {}", constraint_name(*constraint)),
        Action::ValidateConstraint { name } => format!("VALIDATE CONSTRAINT {name}"),
        Action::DropConstraint { name, .. } => format!("DROP CONSTRAINT {name}"),
        Action::AlterConstraint { name } => format!("ALTER CONSTRAINT {name}"),
        Action::RenameColumn { from, to } => format!("RENAME COLUMN {from} TO {to}"),
        Action::RenameConstraint { from, to } => format!("RENAME CONSTRAINT {from} TO {to}"),
        Action::Metadata { what, column: Some(c) } => format!("ALTER COLUMN {c} {what}"),
        Action::CreateIndex { name, unique, .. } => {
            let unique = if *unique { "UNIQUE " } else { "" };
            format!("CREATE {unique}INDEX{}", name.as_ref().map(|n| format!(" {n}")).unwrap_or_default())
        }
        Action::DropIndex { name, .. } => format!("DROP INDEX {name}"),
        Action::Reindex { name, .. } => format!("REINDEX INDEX {name}"),
        Action::Metadata { what, column: None } | Action::Rewrite { what } | Action::Unsupported { what } => {
            what.clone()
        }
    }
}

fn constraint_name(c: NewConstraint) -> &'static str {
    match c {
        NewConstraint::Check => "CHECK constraint",
        NewConstraint::NotNull => "NOT NULL constraint",
        NewConstraint::ForeignKey => "FOREIGN KEY",
        NewConstraint::Unique => "UNIQUE constraint",
        NewConstraint::PrimaryKey => "PRIMARY KEY",
        NewConstraint::Exclusion => "EXCLUDE constraint",
    }
}

/// Classifies one subcommand. `widening` tells, for a type change the probe resolved,
/// whether the new type loses no information.
pub fn classify(
    def: &TableDef,
    subcommand: &str,
    action: &Action,
    probe: &ProbeOutcome,
    widening: Option<bool>,
) -> Step {
    use Strategy::*;
    let rewrite = seconds(def.total_bytes, REWRITE_BYTES_PER_SEC);
    let scan = seconds(def.table_bytes, SCAN_BYTES_PER_SEC);
    let hold = |mode, held_for: &str, est| LockHold { mode, held_for: held_for.into(), estimated_seconds: est };
    let brief = |mode| {
        hold(
            mode,
            "a moment (catalog only); but while it waits for running transactions, every later query on the table waits behind it",
            None,
        )
    };
    let brief_gw = |mode| {
        hold(mode, "a moment, under a short lock_timeout with retries, so it never holds up traffic for long", None)
    };
    let rewritten = hold(LockMode::AccessExclusive, "the whole rewrite of the table and its indexes", rewrite);
    let swap = hold(LockMode::AccessExclusive, "the swap only (milliseconds); the copy runs beside live traffic", None);
    let yes = |note: &str| Revert { revertible: true, note: note.into() };
    let no = |note: &str| Revert { revertible: false, note: note.into() };
    let rewrites = match probe {
        ProbeOutcome::Accepted { rewrites, .. } => Some(*rewrites),
        _ => None,
    };
    let ae = LockMode::AccessExclusive;
    let build = seconds(def.table_bytes, SCAN_BYTES_PER_SEC / 3.0);

    let (strategy, reason, naive, ghostwire, revert) = match action {
        Action::AddColumn { not_null, has_default, constraints, generated, identity, .. } => {
            let rewrites = rewrites.unwrap_or(*has_default || *generated || *identity);
            if rewrites {
                let why = if *generated {
                    "a stored generated column is computed for every row"
                } else if *identity {
                    "an identity column is filled for every row"
                } else {
                    "its default is volatile (or its type has constraints), so PostgreSQL rewrites every row"
                };
                (Copy, why.to_owned(), rewritten, swap, yes("drop the new column"))
            } else if constraints
                .iter()
                .any(|c| matches!(c, NewConstraint::Unique | NewConstraint::PrimaryKey | NewConstraint::Exclusion))
            {
                (
                    Copy,
                    "the new column's index is built through the shadow table".into(),
                    rewritten,
                    swap,
                    yes("drop the new column"),
                )
            } else if !constraints.is_empty() {
                let naive = hold(ae, "a full scan to check the new column's constraints", scan);
                let gw = hold(
                    LockMode::ShareUpdateExclusive,
                    "the VALIDATE scan; the column and NOT VALID constraint are added in a brief lock",
                    scan,
                );
                (
                    Online,
                    "the column is added instantly; its constraints as NOT VALID, then VALIDATE".into(),
                    naive,
                    gw,
                    yes("drop the new column"),
                )
            } else {
                let mut reason = "catalog-only: the default is stored once, not written to every row".to_owned();
                if *not_null && !*has_default {
                    reason = "catalog-only, but NOT NULL without a DEFAULT fails if the table has any rows".into();
                }
                (Instant, reason, brief(ae), brief_gw(ae), yes("drop the new column"))
            }
        }
        Action::DropColumn { .. } => (
            Instant,
            "catalog-only: the column is hidden, its space reclaimed by later writes".into(),
            brief(ae),
            brief_gw(ae),
            no("the column's data is gone once it is dropped"),
        ),
        Action::SetDefault { .. } | Action::DropDefault { .. } => (
            Instant,
            "catalog-only: affects future inserts".into(),
            brief(ae),
            brief_gw(ae),
            yes("restore the old default"),
        ),
        Action::AlterType { using, .. } => {
            let revert = match (widening, using) {
                (Some(true), None) => yes("values written after the swap must still fit the old type"),
                (Some(false), _) | (None, None) => no("narrowing or converting: the old values cannot be restored"),
                (_, Some(_)) => no("converted with USING: ghostwire cannot invert the expression"),
            };
            match rewrites {
                Some(false) => (
                    Instant,
                    "binary-coercible: PostgreSQL changes the catalog without rewriting".into(),
                    brief(ae),
                    brief_gw(ae),
                    revert,
                ),
                _ => (
                    Copy,
                    "the type change rewrites every row and rebuilds the indexes".into(),
                    rewritten,
                    swap,
                    revert,
                ),
            }
        }
        Action::SetNotNull { column } => {
            if def.column(column).is_some_and(|c| c.not_null) {
                (Instant, "the column is already NOT NULL".into(), brief(ae), brief_gw(ae), yes("DROP NOT NULL"))
            } else {
                (
                    Online,
                    "through a CHECK (… IS NOT NULL) NOT VALID, VALIDATE, then SET NOT NULL without a scan".into(),
                    hold(ae, "a full scan for NULLs", scan),
                    hold(LockMode::ShareUpdateExclusive, "the VALIDATE scan; SET NOT NULL itself is brief", scan),
                    yes("DROP NOT NULL"),
                )
            }
        }
        Action::DropNotNull { .. } => {
            (Instant, "catalog-only".into(), brief(ae), brief_gw(ae), yes("SET NOT NULL again (needs a scan)"))
        }
        Action::SetExpression { .. } => (
            Copy,
            "the new expression is computed for every row".into(),
            rewritten,
            swap,
            yes("restore the old expression"),
        ),
        Action::DropExpression { .. } => (
            Instant,
            "catalog-only: the stored values stay".into(),
            brief(ae),
            brief_gw(ae),
            no("the generation expression is gone"),
        ),
        Action::AddConstraint { constraint, not_valid, using_index, .. } => match constraint {
            NewConstraint::Check | NewConstraint::NotNull if *not_valid => (
                Instant,
                "NOT VALID: only new rows are checked".into(),
                brief(ae),
                brief_gw(ae),
                yes("drop the constraint"),
            ),
            NewConstraint::Check | NewConstraint::NotNull => (
                Online,
                "added NOT VALID, then VALIDATE scans without blocking writes".into(),
                hold(ae, "a full scan to check every row", scan),
                hold(LockMode::ShareUpdateExclusive, "the VALIDATE scan; adding it NOT VALID is brief", scan),
                yes("drop the constraint"),
            ),
            NewConstraint::ForeignKey if *not_valid => (
                Instant,
                "NOT VALID: only new rows are checked".into(),
                brief(LockMode::ShareRowExclusive),
                brief_gw(LockMode::ShareRowExclusive),
                yes("drop the constraint"),
            ),
            NewConstraint::ForeignKey => (
                Online,
                "added NOT VALID, then VALIDATE scans without blocking writes".into(),
                hold(LockMode::ShareRowExclusive, "a full scan of this table, on both tables (writes blocked)", scan),
                hold(
                    LockMode::ShareUpdateExclusive,
                    "the VALIDATE scan (SHARE ROW EXCLUSIVE only briefly, to add it)",
                    scan,
                ),
                yes("drop the constraint"),
            ),
            NewConstraint::Unique | NewConstraint::PrimaryKey if *using_index => (
                Instant,
                "uses an existing index".into(),
                brief(ae),
                brief_gw(ae),
                yes("drop the constraint (the index goes with it)"),
            ),
            NewConstraint::Unique | NewConstraint::PrimaryKey => (
                Online,
                "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT … USING INDEX".into(),
                hold(ae, "the whole index build", seconds(def.table_bytes, SCAN_BYTES_PER_SEC / 3.0)),
                hold(
                    LockMode::ShareUpdateExclusive,
                    "the concurrent index build; attaching the constraint is brief",
                    None,
                ),
                yes("drop the constraint"),
            ),
            NewConstraint::Exclusion => (
                Copy,
                "exclusion constraints have no concurrent build; the index is built on the shadow table".into(),
                hold(ae, "the whole index build", seconds(def.table_bytes, SCAN_BYTES_PER_SEC / 3.0)),
                swap,
                yes("drop the constraint"),
            ),
        },
        Action::ValidateConstraint { .. } => (
            Online,
            "VALIDATE already scans without blocking reads or writes".into(),
            hold(LockMode::ShareUpdateExclusive, "the validation scan", scan),
            hold(LockMode::ShareUpdateExclusive, "the validation scan", scan),
            yes("nothing to undo"),
        ),
        Action::DropConstraint { .. } => (
            Instant,
            "catalog-only".into(),
            brief(ae),
            brief_gw(ae),
            yes("re-add the constraint (it is validated again)"),
        ),
        Action::AlterConstraint { .. } => {
            (Instant, "catalog-only".into(), brief(ae), brief_gw(ae), yes("alter it back"))
        }
        Action::RenameColumn { .. } => (Instant, "catalog-only".into(), brief(ae), brief_gw(ae), yes("rename it back")),
        Action::RenameConstraint { .. } => {
            (Instant, "catalog-only".into(), brief(ae), brief_gw(ae), yes("rename it back"))
        }
        Action::Metadata { what, .. } => {
            let mode = match what.as_str() {
                "SET STATISTICS" | "storage parameters" | "column options" => LockMode::ShareUpdateExclusive,
                "ENABLE/DISABLE TRIGGER" => LockMode::ShareRowExclusive,
                _ => ae,
            };
            (Instant, "catalog-only".into(), brief(mode), brief_gw(mode), yes("set it back"))
        }
        Action::Rewrite { what } => {
            (Copy, format!("{what} rewrites the whole table"), rewritten, swap, yes("swap back"))
        }
        Action::CreateIndex { .. } => (
            Online,
            "CREATE INDEX CONCURRENTLY: two scans of the table while reads and writes go on; a failed build is \
             dropped again"
                .into(),
            hold(LockMode::Share, "the whole index build", build),
            hold(LockMode::ShareUpdateExclusive, "the concurrent build (it first waits for older transactions)", build),
            yes("DROP INDEX CONCURRENTLY"),
        ),
        Action::DropIndex { .. } => (
            Online,
            "DROP INDEX CONCURRENTLY: waits for the queries using the index instead of blocking new ones".into(),
            brief(ae),
            hold(LockMode::ShareUpdateExclusive, "the concurrent drop", None),
            yes("CREATE INDEX CONCURRENTLY again (a full build)"),
        ),
        Action::Reindex { .. } => (
            Online,
            "REINDEX INDEX CONCURRENTLY: a new index built beside the old one, then swapped in; a failed rebuild's \
             `_ccnew` index is dropped again"
                .into(),
            hold(LockMode::Share, "the whole rebuild (queries using the index wait too)", build),
            hold(LockMode::ShareUpdateExclusive, "the concurrent rebuild", build),
            yes("nothing to undo"),
        ),
        Action::Unsupported { what } => (Copy, format!("{what} is not supported"), rewritten, swap, no("unsupported")),
    };
    Step {
        subcommand: subcommand.to_owned(),
        action: action.clone(),
        strategy,
        reason,
        naive,
        ghostwire,
        revert,
        probe: probe.clone(),
    }
}
