//! What a running migration is made of, persisted in `ghostwire.migrations.spec` so that
//! cut-over, abort, finish (and resume) work from the database alone.

use serde::{Deserialize, Serialize};

use crate::catalog::TableDef;
use crate::sql::{QualifiedName, ident};

/// One column of the copy key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyColumn {
    /// Name in the original table (and in the change log).
    pub name: String,
    /// Its type in the original, as SQL (`integer`, `"Sales".code`).
    pub type_sql: String,
    /// Its collation when not the type's default, as SQL (`pg_catalog."C"`).
    pub collation: Option<String>,
    /// Name in the shadow table.
    pub shadow_name: String,
    pub shadow_type_sql: String,
    /// SQL giving the shadow's key value, evaluated where the original key columns are in
    /// scope under the table's own name: `"id"`, `CAST("id" AS bigint)`, a USING expression.
    pub to_shadow: String,
    /// Whether `to_shadow` keeps the key order (so key ranges match on both sides).
    pub order_preserving: bool,
}

/// Where one shadow column's values come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ColumnMap {
    pub shadow: String,
    pub shadow_type_sql: String,
    /// SQL over the original row; `None`: not copied (a new column takes its default, a
    /// stored generated column is computed).
    pub source: Option<String>,
    /// Whether verification compares it (copied, and deterministically so).
    pub compare: bool,
}

/// An index or index-backed constraint built after the copy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeferredIndex {
    pub name: String,
    /// The statement that builds it on the shadow table: a plain `CREATE [UNIQUE] INDEX`, so
    /// that several builds can run at once (`ALTER TABLE … ADD PRIMARY KEY` would lock the
    /// table against the other builds).
    pub sql: String,
    /// For a primary key or unique constraint: the constraint's name and the statement that
    /// makes the built index that constraint (`… USING INDEX`, quick), run after the builds.
    #[serde(default)]
    pub attach: Option<(String, String)>,
    /// The original index's tablespace, when not the database's default.
    #[serde(default)]
    pub tablespace: Option<String>,
}

/// A foreign key of the new table, added at cut-over as NOT VALID and validated after.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ForeignKey {
    pub name: String,
    /// `pg_get_constraintdef` text, without a trailing NOT VALID.
    pub definition: String,
    /// Validate after the swap (false when the original was deliberately NOT VALID).
    pub validate: bool,
    pub comment: Option<String>,
}

/// The persisted description of a migration through a shadow table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub migration_id: i64,
    pub original: QualifiedName,
    pub original_oid: u32,
    /// Holds the shadow table (under the original's name) until the swap.
    pub work_schema: String,
    /// Receives the old table at the swap.
    pub archive_schema: String,
    pub statement: String,
    pub key: Vec<KeyColumn>,
    /// The shadow's key index (built first in the index phase).
    pub key_index: String,
    pub columns: Vec<ColumnMap>,
    /// Copying into a GENERATED ALWAYS identity column.
    pub overriding_system_value: bool,
    pub deferred_indexes: Vec<DeferredIndex>,
    pub foreign_keys: Vec<ForeignKey>,
    /// NOT VALID checks (enforced on every insert, so kept off the shadow while old rows are
    /// copied), added NOT VALID at cut-over: `(name, definition without NOT VALID)`.
    pub deferred_checks: Vec<(String, String)>,
    /// Columns of the original that the new table no longer has.
    pub dropped_columns: Vec<String>,
    /// Columns whose type changed.
    pub retyped_columns: Vec<String>,
    /// The original table as it was when the migration started.
    pub table: TableDef,
}

/// Names of everything a migration creates, derived from its id.
pub fn work_schema(id: i64) -> String {
    format!("ghostwire_{id}")
}

pub fn archive_schema(id: i64) -> String {
    format!("ghostwire_{id}_old")
}

impl Spec {
    pub fn shadow(&self) -> QualifiedName {
        QualifiedName::new(&self.work_schema, &self.original.name)
    }

    pub fn archived(&self) -> QualifiedName {
        QualifiedName::new(&self.archive_schema, &self.original.name)
    }

    pub fn log_table(&self) -> QualifiedName {
        log_table(self.migration_id)
    }

    /// Quoted original key column names, comma separated.
    pub fn key_list(&self) -> String {
        self.key.iter().map(|k| ident(&k.name)).collect::<Vec<_>>().join(", ")
    }

    /// Quoted shadow key column names, comma separated.
    pub fn shadow_key_list(&self) -> String {
        self.key.iter().map(|k| ident(&k.shadow_name)).collect::<Vec<_>>().join(", ")
    }

    /// The copied columns: (quoted shadow column list, source expressions list).
    pub fn copy_lists(&self) -> (String, String) {
        let copied: Vec<&ColumnMap> = self.columns.iter().filter(|c| c.source.is_some()).collect();
        let targets = copied.iter().map(|c| ident(&c.shadow)).collect::<Vec<_>>().join(", ");
        let sources = copied
            .iter()
            .map(|c| format!("({})", c.source.as_deref().unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(", ");
        (targets, sources)
    }

    /// `OVERRIDING SYSTEM VALUE ` when needed, else empty.
    pub fn overriding(&self) -> &'static str {
        if self.overriding_system_value { "OVERRIDING SYSTEM VALUE " } else { "" }
    }

    /// Typed parameters for a key tuple passed as text: `($1::text::integer, $2::text::text)`.
    pub fn key_params(&self, first: usize, shadow: bool) -> String {
        let types: Vec<&str> =
            self.key.iter().map(|k| if shadow { k.shadow_type_sql.as_str() } else { k.type_sql.as_str() }).collect();
        crate::sql::text_params(first, &types)
    }

    /// The original key columns rendered as text, in key order: `ARRAY["a"::text, "b"::text]`.
    pub fn key_as_text(&self, prefix: &str) -> String {
        let names: Vec<&str> = self.key.iter().map(|k| k.name.as_str()).collect();
        crate::sql::text_array(prefix, &names)
    }

    /// A single integer key column: ranges can be stepped by value instead of walked.
    pub fn integer_key(&self) -> bool {
        self.key.len() == 1 && matches!(self.key[0].type_sql.as_str(), "bigint" | "integer" | "smallint")
    }

    /// Whether the key's order is the same on both sides.
    pub fn key_order_preserved(&self) -> bool {
        self.key.iter().all(|k| k.order_preserving)
    }
}

pub fn log_table(id: i64) -> QualifiedName {
    QualifiedName::new("ghostwire", format!("changes_{id}"))
}

/// The capture trigger and function names of a migration, per event.
pub fn trigger_name(id: i64, event: &str) -> String {
    format!("ghostwire_{id}_{event}")
}

pub fn trigger_function(id: i64, event: &str) -> QualifiedName {
    QualifiedName::new("ghostwire", format!("capture_{id}_{event}"))
}

pub const CAPTURE_EVENTS: [&str; 4] = ["insert", "update", "delete", "truncate"];
