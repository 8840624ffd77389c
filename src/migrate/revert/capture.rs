//! Reverse capture: from the swap on, every write to the new table logs the keys it touched
//! in `ghostwire.revert_changes_<id>`, exactly as forward trigger capture does (keys only,
//! so it can never make an application write fail), so that `revert` can bring the old
//! table up to date. Installed inside the swap's transaction, under the lock it holds.
//!
//! Triggers whatever mode the forward capture used: a logical stream would need a ghostwire
//! process alive for the whole window, or a slot pinning every byte of WAL written during
//! it; the triggers need neither.

use crate::migrate::capture::trigger::dollar_quoted;
use crate::migrate::spec::{CAPTURE_EVENTS, Spec};
use crate::sql::{QualifiedName, ident};

use super::mapping::Mapping;

pub fn log_table(id: i64) -> QualifiedName {
    QualifiedName::new("ghostwire", format!("revert_changes_{id}"))
}

fn trigger_name(id: i64, event: &str) -> String {
    format!("ghostwire_{id}_revert_{event}")
}

fn trigger_function(id: i64, event: &str) -> QualifiedName {
    QualifiedName::new("ghostwire", format!("revert_{id}_{event}"))
}

/// The statements that start reverse capture on the new table (now at the table's name)
/// and keep the old table's own triggers from firing while a revert writes to it. Run in
/// the swap's transaction, after the move.
pub fn install_sql(spec: &Spec, mapping: &Mapping) -> Vec<String> {
    let id = spec.migration_id;
    let log = log_table(id).sql();
    let table = spec.original.sql();
    let columns: Vec<String> = mapping
        .key
        .iter()
        .map(|k| match &k.collation {
            Some(c) => format!("{} {} COLLATE {c}", ident(&k.new), k.new_type),
            None => format!("{} {}", ident(&k.new), k.new_type),
        })
        .collect();
    let keys = mapping.new_key_list();
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS {log} (ghostwire_seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         ghostwire_truncated boolean NOT NULL DEFAULT false, {})",
        columns.join(", ")
    )];
    for event in CAPTURE_EVENTS {
        let body = match event {
            "insert" => format!("INSERT INTO {log} ({keys}) SELECT {keys} FROM ghostwire_new;"),
            "update" => format!(
                "INSERT INTO {log} ({keys}) SELECT {keys} FROM ghostwire_new UNION SELECT {keys} FROM ghostwire_old;"
            ),
            "delete" => format!("INSERT INTO {log} ({keys}) SELECT {keys} FROM ghostwire_old;"),
            _ => format!("INSERT INTO {log} (ghostwire_truncated) VALUES (true);"),
        };
        out.push(format!(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
             SET search_path = pg_catalog, pg_temp AS {}",
            trigger_function(id, event).sql(),
            dollar_quoted(&format!("BEGIN {body} RETURN NULL; END"))
        ));
        let (when, referencing) = match event {
            "insert" => ("INSERT", "REFERENCING NEW TABLE AS ghostwire_new "),
            "update" => ("UPDATE", "REFERENCING OLD TABLE AS ghostwire_old NEW TABLE AS ghostwire_new "),
            "delete" => ("DELETE", "REFERENCING OLD TABLE AS ghostwire_old "),
            _ => ("TRUNCATE", ""),
        };
        out.push(format!(
            "CREATE TRIGGER {} AFTER {when} ON {table} {referencing}FOR EACH STATEMENT EXECUTE FUNCTION {}()",
            ident(&trigger_name(id, event)),
            trigger_function(id, event).sql()
        ));
        out.push(format!("ALTER TABLE {table} ENABLE ALWAYS TRIGGER {}", ident(&trigger_name(id, event))));
    }
    if spec.table.triggers.iter().any(|t| t.enabled != "D") {
        out.push(format!("ALTER TABLE {} DISABLE TRIGGER USER", spec.archived().sql()));
    }
    out
}

/// Drops the reverse capture triggers from `table` (the new table, wherever it is now).
pub fn drop_triggers_sql(id: i64, table: &QualifiedName) -> String {
    CAPTURE_EVENTS
        .iter()
        .map(|e| format!("DROP TRIGGER IF EXISTS {} ON {}", ident(&trigger_name(id, e)), table.sql()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Drops the reverse log and its trigger functions (after the triggers are gone).
pub fn drop_log_sql(id: i64) -> String {
    let mut sql = format!("DROP TABLE IF EXISTS {};", log_table(id).sql());
    for e in CAPTURE_EVENTS {
        sql.push_str(&format!(" DROP FUNCTION IF EXISTS {}();", trigger_function(id, e).sql()));
    }
    sql
}

/// Whether reverse capture is on the table `table` now names.
pub async fn installed(
    client: &tokio_postgres::Client,
    id: i64,
    table: &QualifiedName,
) -> Result<bool, tokio_postgres::Error> {
    let names: Vec<String> = CAPTURE_EVENTS.iter().map(|e| trigger_name(id, e)).collect();
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = ANY($2)",
            &[&table.sql(), &names],
        )
        .await?;
    Ok(row.get::<_, i64>(0) == CAPTURE_EVENTS.len() as i64)
}
