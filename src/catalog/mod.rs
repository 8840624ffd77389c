//! A typed picture of one table, read from `pg_catalog` in a single read-only transaction.
//!
//! [`inspect`] returns everything a shadow-table swap must carry over (DESIGN.md §2 step 2):
//! columns, the copy key, indexes, constraints, foreign keys in both directions, triggers,
//! rules, dependent views, row-level security, grants, publications, replica identity,
//! comments, storage options, statistics, owner and owned sequences, plus size estimates.
//!
//! Definitions (`pg_get_indexdef`, `pg_get_constraintdef`, …) are read with
//! `search_path = pg_catalog`, so every name in them is schema-qualified and they can be
//! replayed verbatim from any session.

mod dependents;
mod read;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::sql::QualifiedName;
pub use read::{inspect, resolve};

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("table {0} does not exist (check the name, the schema and the search_path of this connection)")]
    TableNotFound(String),
    #[error("{name} is a {kind}, not a table; ghostwire changes ordinary and partitioned tables only")]
    NotATable { name: String, kind: String },
    #[error("could not read the catalog: {}", crate::connect::describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// What kind of relation the table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    Ordinary,
    Partitioned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Persistence {
    Permanent,
    Unlogged,
    Temporary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    Always,
    ByDefault,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    /// `format_type` output, e.g. `character varying(20)`.
    pub type_name: String,
    pub type_oid: u32,
    pub typmod: i32,
    /// The collation, when it is not the type's default.
    pub collation: Option<String>,
    pub default: Option<String>,
    pub not_null: bool,
    /// The expression of a stored generated column.
    pub generated: Option<String>,
    pub identity: Option<IdentityKind>,
    pub comment: Option<String>,
    /// `ALTER COLUMN … SET STATISTICS` target, when set.
    pub statistics_target: Option<i32>,
    /// `ALTER COLUMN … SET (…)` attribute options (`n_distinct=-0.5`).
    #[serde(default)]
    pub options: Vec<String>,
    pub grants: Vec<Grant>,
}

/// How rows are identified for keyset copying and change capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    PrimaryKey,
    /// A unique index on NOT NULL columns, used when there is no primary key.
    UniqueIndex,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Key {
    pub kind: KeyKind,
    pub index_name: String,
    pub columns: Vec<String>,
    pub attnums: Vec<i16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub definition: String,
    pub is_primary: bool,
    pub is_unique: bool,
    /// Not DEFERRABLE: uniqueness holds at every statement.
    pub is_immediate: bool,
    /// Valid and ready (not a failed or in-progress CREATE INDEX CONCURRENTLY).
    pub is_valid: bool,
    /// The constraint this index implements (primary key, unique, exclusion), if any.
    pub constraint: Option<String>,
    /// Table columns by attnum; 0 marks an expression.
    pub attnums: Vec<i16>,
    pub has_predicate: bool,
    pub is_clustered: bool,
    pub is_replica_identity: bool,
    pub tablespace: Option<String>,
    pub comment: Option<String>,
    pub bytes: i64,
    /// `ALTER INDEX … ALTER COLUMN n SET STATISTICS v` of its expression columns: (n, v).
    #[serde(default)]
    pub column_statistics: Vec<(i16, i32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConstraintKind {
    Check,
    ForeignKey,
    PrimaryKey,
    Unique,
    Exclusion,
    Trigger,
    NotNull,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Constraint {
    pub name: String,
    pub kind: ConstraintKind,
    /// `pg_get_constraintdef` output, e.g. `CHECK ((amount > 0)) NOT VALID`.
    pub definition: String,
    pub validated: bool,
    pub deferrable: bool,
    pub initially_deferred: bool,
    pub attnums: Vec<i16>,
    /// For foreign keys: the table referenced.
    pub references: Option<QualifiedName>,
    pub comment: Option<String>,
}

/// A foreign key on another table that references this one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingForeignKey {
    pub table: QualifiedName,
    pub name: String,
    pub definition: String,
    pub validated: bool,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trigger {
    pub name: String,
    pub definition: String,
    /// `O` origin/local (enabled), `D` disabled, `R` replica, `A` always.
    pub enabled: String,
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub definition: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewKind {
    View,
    Materialized,
}

/// A view that depends on the table, directly or through other views. Listed in an order
/// in which they can be created (a view after everything it reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DependentView {
    pub name: QualifiedName,
    pub kind: ViewKind,
    pub definition: String,
    pub owner: String,
    pub options: Vec<String>,
    pub comment: Option<String>,
    pub grants: Vec<Grant>,
    /// Columns of the inspected table this view reads directly (empty when it depends only
    /// through other views).
    pub reads_columns: Vec<String>,
    /// 1 for views reading the table itself, 2 for views reading those, …
    pub depth: i32,
    /// Other dependent views this one reads.
    pub reads_views: Vec<QualifiedName>,
    /// Triggers on the view (INSTEAD OF …), as `pg_get_triggerdef` gives them.
    pub triggers: Vec<Trigger>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub permissive: bool,
    /// `ALL`, `SELECT`, `INSERT`, `UPDATE` or `DELETE`.
    pub command: String,
    /// Role names; `public` for everyone.
    pub roles: Vec<String>,
    pub using: Option<String>,
    pub with_check: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// A role name, or `PUBLIC`.
    pub grantee: String,
    pub privilege: String,
    pub grantable: bool,
    pub grantor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicationMembership {
    pub publication: String,
    /// A column list, when the publication publishes only some columns.
    pub columns: Option<Vec<String>>,
    pub row_filter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "index")]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtendedStatistics {
    pub name: QualifiedName,
    pub definition: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnedSequence {
    pub name: QualifiedName,
    pub column: String,
    /// The sequence behind an identity column (rather than a serial default).
    pub identity: bool,
}

/// Everything known about one table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableDef {
    pub oid: u32,
    pub name: QualifiedName,
    pub kind: TableKind,
    pub is_partition: bool,
    /// Has inheritance parents or children (other than partitions).
    pub has_inheritance: bool,
    pub persistence: Persistence,
    pub owner: String,
    pub tablespace: Option<String>,
    pub access_method: Option<String>,
    pub columns: Vec<Column>,
    pub key: Option<Key>,
    pub indexes: Vec<Index>,
    pub constraints: Vec<Constraint>,
    pub referencing_foreign_keys: Vec<IncomingForeignKey>,
    pub triggers: Vec<Trigger>,
    pub rules: Vec<Rule>,
    pub views: Vec<DependentView>,
    pub row_security: bool,
    pub force_row_security: bool,
    pub policies: Vec<Policy>,
    pub grants: Vec<Grant>,
    pub publications: Vec<PublicationMembership>,
    pub replica_identity: ReplicaIdentity,
    pub comment: Option<String>,
    pub reloptions: Vec<String>,
    pub toast_reloptions: Vec<String>,
    pub statistics: Vec<ExtendedStatistics>,
    pub owned_sequences: Vec<OwnedSequence>,
    /// Objects that use the table's row type (functions, columns of other tables); a swap
    /// cannot move them to the new table.
    pub row_type_users: Vec<String>,
    /// `reltuples`, or an estimate from the table size when it was never analyzed.
    pub estimated_rows: i64,
    pub table_bytes: i64,
    pub index_bytes: i64,
    pub total_bytes: i64,
    pub server_version_num: i32,
}

impl TableDef {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn column_by_attnum(&self, attnum: i16) -> Option<&Column> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }

    pub fn constraint(&self, name: &str) -> Option<&Constraint> {
        self.constraints.iter().find(|c| c.name == name)
    }

    pub fn index(&self, name: &str) -> Option<&Index> {
        self.indexes.iter().find(|i| i.name == name)
    }
}
