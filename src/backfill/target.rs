//! The table a backfill changes: found in the catalog, its key chosen, and the statement
//! checked against it on the server (prepared, never run) before anything changes.

use tokio_postgres::Client;

use super::statement::Statement;
use super::{BackfillError, Kind};
use crate::catalog::{self, CatalogError, TableKind};
use crate::sql::{QualifiedName, ident};

/// What the batches need to know about the table; stored with the run for `resume`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub table: QualifiedName,
    pub oid: u32,
    pub statement: Statement,
    /// The key's columns and their types (`format_type`, schema-qualified where needed).
    pub key: Vec<String>,
    pub key_types: Vec<String>,
    /// `ONLY` when the statement says so.
    pub only: bool,
    pub estimated_rows: i64,
}

fn refused(why: String) -> BackfillError {
    BackfillError::Refused(why)
}

impl Target {
    /// Resolves the statement's table and checks the statement against it.
    pub async fn of(client: &mut Client, statement: Statement) -> Result<Target, BackfillError> {
        let (oid, table) =
            catalog::resolve(&*client, statement.schema.as_deref(), &statement.table).await.map_err(|e| match e {
                CatalogError::Query(cause) => BackfillError::Database { what: "finding the table".into(), cause },
                other => refused(other.to_string()),
            })?;
        let def = catalog::inspect(client, oid).await.map_err(|e| match e {
            CatalogError::Query(cause) => BackfillError::Database { what: "reading the table".into(), cause },
            other => refused(other.to_string()),
        })?;
        if !matches!(def.kind, TableKind::Ordinary | TableKind::Partitioned) {
            return Err(refused(format!("{table} is not an ordinary or partitioned table")));
        }
        let Some(key) = def.key.as_ref() else {
            return Err(refused(format!(
                "{table} has no primary key or unique index on NOT NULL columns to walk in batches; add one \
                 (`ghostwire migrate \"ALTER TABLE {table} ADD PRIMARY KEY (…)\"` builds it without blocking writes)"
            )));
        };
        let mut key_types = Vec::new();
        for k in &key.columns {
            let c = def
                .columns
                .iter()
                .find(|c| &c.name == k)
                .ok_or_else(|| refused(format!("key column {k} not found")))?;
            key_types.push(c.type_name.clone());
        }
        if statement.kind == Kind::Update {
            for a in &statement.assignments {
                if !def.columns.iter().any(|c| c.name == a.column) {
                    return Err(refused(format!("{table} has no column {}", ident(&a.column))));
                }
                if key.columns.contains(&a.column) {
                    return Err(refused(format!(
                        "the statement changes {}, part of the key the batches walk ({}): a batch could move a row \
                         past the others; change the key with `ghostwire migrate` first, or update it in one statement",
                        ident(&a.column),
                        key.index_name
                    )));
                }
            }
        }
        let only = statement.target.trim_start().to_ascii_uppercase().starts_with("ONLY");
        let target = Target {
            table,
            oid,
            statement,
            key: key.columns.clone(),
            key_types,
            only,
            estimated_rows: def.estimated_rows,
        };
        // The server parses and plans every batch's shape now: a bad column or type is a
        // refusal here, not a failure after the first batches.
        for after in [false, true] {
            client.prepare(&target.batch_sql(after)).await.map_err(|e| {
                refused(format!("the statement does not run on {}: {}", target.table, crate::connect::describe(&e)))
            })?;
        }
        Ok(target)
    }

    pub fn batch_sql(&self, after: bool) -> String {
        self.statement.batch_sql(&self.key, &self.key_types, after)
    }

    fn from(&self) -> String {
        format!("{}{}", if self.only { "ONLY " } else { "" }, self.table.sql())
    }

    fn key_list(&self) -> String {
        self.key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ")
    }

    fn key_text(&self) -> String {
        crate::sql::text_array("", &self.key)
    }

    fn key_params(&self, first: usize) -> String {
        crate::sql::text_params(first, &self.key_types)
    }

    /// The largest key now, as text (None: the table is empty).
    pub fn last_key_sql(&self) -> String {
        let desc: Vec<String> = self.key.iter().map(|k| format!("{} DESC", ident(k))).collect();
        format!("SELECT {} FROM {} ORDER BY {} LIMIT 1", self.key_text(), self.from(), desc.join(", "))
    }

    /// The key `$1` rows after the lower bound (`$2…`, when `after`) and not past the end
    /// (the parameters after those).
    pub fn upper_sql(&self, after: bool) -> String {
        let n = self.key.len();
        let keys = self.key_list();
        let mut filter = String::new();
        let end_at = if after {
            filter.push_str(&format!("({keys}) > {} AND ", self.key_params(2)));
            2 + n
        } else {
            2
        };
        filter.push_str(&format!("({keys}) <= {}", self.key_params(end_at)));
        format!("SELECT {} FROM {} WHERE {filter} ORDER BY {keys} OFFSET $1 LIMIT 1", self.key_text(), self.from())
    }
}
