//! Phase `capture`: every write to the table from now on has its keys in the change log
//! `ghostwire.changes_<id>` (an UPDATE that changes the key: the old and the new one; a
//! TRUNCATE: a marker), so copy, catch-up, verification and the cut-over read one log
//! whichever way it is filled (DESIGN.md §4):
//!
//! - [`trigger`]: statement-level AFTER triggers with transition tables, in the
//!   application's own transactions;
//! - [`logical`]: a replication slot and pgoutput, streamed by ghostwire's own client and
//!   written to the log by a task of the run; no work on the application's write path.

pub mod logical;
pub mod trigger;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

pub use trigger::{drop_log_sql, drop_triggers_sql, install, installed};

/// What the user asked for (`--capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    #[default]
    Trigger,
    Logical,
    /// Logical where the server, the role and the table allow it, else triggers.
    Auto,
}

/// How a migration captures the application's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Trigger,
    Logical,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Trigger => "trigger",
            Mode::Logical => "logical",
        }
    }

    /// The mode a migration was started with.
    pub fn of(m: &crate::state::Migration) -> Mode {
        match m.capture.as_str() {
            "logical" => Mode::Logical,
            _ => Mode::Trigger,
        }
    }
}

/// `CREATE TABLE IF NOT EXISTS` for the change log: an ordering id, the TRUNCATE marker and
/// the key columns as the original has them (no lock on the live table). With triggers the
/// log is the only record of a write, so it is an ordinary table. With logical capture it is
/// UNLOGGED: its rows would otherwise go to the WAL, which the slot's walsender decodes
/// (only to discard them, as not published), and that work is most of what logical capture
/// costs a busy server; a crash of the server empties it, which the run detects and answers
/// by copying again (`logical::log_intact`).
pub fn log_table_sql(spec: &super::spec::Spec, mode: Mode) -> String {
    let columns: Vec<String> = spec
        .key
        .iter()
        .map(|k| match &k.collation {
            Some(c) => format!("{} {} COLLATE {c}", crate::sql::ident(&k.name), k.type_sql),
            None => format!("{} {}", crate::sql::ident(&k.name), k.type_sql),
        })
        .collect();
    log_table_ddl(&spec.log_table(), mode == Mode::Logical, &columns)
}

/// `CREATE [UNLOGGED] TABLE IF NOT EXISTS` for a change log `log` of key `columns` (each
/// `name type [COLLATE c]`).
pub fn log_table_ddl(log: &crate::sql::QualifiedName, unlogged: bool, columns: &[String]) -> String {
    format!(
        "CREATE {}TABLE IF NOT EXISTS {} (ghostwire_seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         ghostwire_truncated boolean NOT NULL DEFAULT false, {})",
        if unlogged { "UNLOGGED " } else { "" },
        log.sql(),
        columns.join(", ")
    )
}

/// Change-log entries waiting, estimated from the log's sequence bounds (two index probes,
/// however long the log: it is asked before every copy chunk).
pub async fn backlog(client: &Client, id: i64) -> Result<i64, tokio_postgres::Error> {
    log_backlog(client, &super::spec::log_table(id)).await
}

/// Entries waiting in the change log `log`.
pub async fn log_backlog(client: &Client, log: &crate::sql::QualifiedName) -> Result<i64, tokio_postgres::Error> {
    let sql = format!("SELECT coalesce(max(ghostwire_seq) - min(ghostwire_seq) + 1, 0) FROM {}", log.sql());
    Ok(client.query_one(&sql, &[]).await?.get(0))
}
