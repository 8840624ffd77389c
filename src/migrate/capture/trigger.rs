//! Phase `capture`, trigger mode: every write to the table logs the keys it touched.
//!
//! A change-log table `ghostwire.changes_<id>` holds keys only (an UPDATE that changes the
//! key logs the old and the new one; a TRUNCATE logs a marker). Statement-level AFTER
//! triggers with transition tables fill it, one per event; they are SECURITY DEFINER so the
//! application's roles need no rights on schema `ghostwire`, and ENABLE ALWAYS so writes by
//! logical replication apply workers are captured too. The triggers are committed before
//! the first row is copied: every later write is logged, every earlier one is seen by the copy.

use tokio_postgres::Client;

use super::super::retry::{RetryPolicy, ddl};
use super::super::spec::{CAPTURE_EVENTS, Spec, trigger_function, trigger_name};
use crate::sql::{QualifiedName, ident};

/// `body` between dollar quotes whose tag does not occur in it.
fn dollar_quoted(body: &str) -> String {
    let mut tag = String::from("ghostwire");
    while body.contains(&format!("${tag}$")) {
        tag.push('_');
    }
    format!("${tag}${body}${tag}$")
}

/// The names one set of capture triggers goes by: the trigger and its function, per event.
/// Forward capture and the revert window's reverse capture each have their own.
pub struct Names {
    pub trigger: fn(i64, &str) -> String,
    pub function: fn(i64, &str) -> QualifiedName,
}

/// Forward capture's names.
pub const FORWARD: Names = Names { trigger: trigger_name, function: trigger_function };

/// The trigger functions logging the columns `keys` of each event's rows into `log`.
pub fn functions_sql(names: &Names, id: i64, log: &QualifiedName, keys: &str) -> String {
    let log = log.sql();
    let mut sql = String::new();
    for event in CAPTURE_EVENTS {
        let body = match event {
            "insert" => format!("INSERT INTO {log} ({keys}) SELECT {keys} FROM ghostwire_new;"),
            "update" => {
                format!(
                    "INSERT INTO {log} ({keys}) SELECT {keys} FROM ghostwire_new UNION SELECT {keys} FROM ghostwire_old;"
                )
            }
            "delete" => format!("INSERT INTO {log} ({keys}) SELECT {keys} FROM ghostwire_old;"),
            _ => format!("INSERT INTO {log} (ghostwire_truncated) VALUES (true);"),
        };
        sql.push_str(&format!(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
             SET search_path = pg_catalog, pg_temp AS {};\n",
            (names.function)(id, event).sql(),
            dollar_quoted(&format!("BEGIN {body} RETURN NULL; END"))
        ));
    }
    sql
}

/// The change log, its trigger functions (no lock on the live table).
pub fn log_sql(spec: &Spec) -> String {
    let mut sql = super::log_table_sql(spec, super::Mode::Trigger);
    sql.push_str(";\n");
    sql.push_str(&functions_sql(&FORWARD, spec.migration_id, &spec.log_table(), &spec.key_list()));
    sql
}

/// The triggers on `table`, ENABLE ALWAYS (SHARE ROW EXCLUSIVE on it, briefly).
pub fn triggers_sql(names: &Names, id: i64, table: &QualifiedName) -> String {
    let table_sql = table.sql();
    let mut sql = String::new();
    for event in CAPTURE_EVENTS {
        let (when, referencing) = match event {
            "insert" => ("INSERT", "REFERENCING NEW TABLE AS ghostwire_new "),
            "update" => ("UPDATE", "REFERENCING OLD TABLE AS ghostwire_old NEW TABLE AS ghostwire_new "),
            "delete" => ("DELETE", "REFERENCING OLD TABLE AS ghostwire_old "),
            _ => ("TRUNCATE", ""),
        };
        sql.push_str(&format!(
            "CREATE TRIGGER {} AFTER {when} ON {table_sql} {referencing}FOR EACH STATEMENT EXECUTE FUNCTION {}();\n",
            ident(&(names.trigger)(id, event)),
            (names.function)(id, event).sql()
        ));
    }
    let always: Vec<String> =
        CAPTURE_EVENTS.iter().map(|e| format!("ENABLE ALWAYS TRIGGER {}", ident(&(names.trigger)(id, e)))).collect();
    sql.push_str(&format!("ALTER TABLE {table_sql} {}", always.join(", ")));
    sql
}

/// The forward capture triggers on `table`.
pub fn trigger_sql(spec: &Spec, table: &QualifiedName) -> String {
    triggers_sql(&FORWARD, spec.migration_id, table)
}

/// `DROP TRIGGER IF EXISTS …` for the triggers of `names` on `table`.
pub fn drop_named_triggers_sql(names: &Names, id: i64, table: &QualifiedName) -> String {
    CAPTURE_EVENTS
        .iter()
        .map(|e| format!("DROP TRIGGER IF EXISTS {} ON {}", ident(&(names.trigger)(id, e)), table.sql()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `DROP TRIGGER IF EXISTS …` for the capture triggers on `table`.
pub fn drop_triggers_sql(id: i64, table: &QualifiedName) -> String {
    drop_named_triggers_sql(&FORWARD, id, table)
}

/// ` DROP FUNCTION IF EXISTS …` for the trigger functions of `names`.
pub fn drop_functions_sql(names: &Names, id: i64) -> String {
    CAPTURE_EVENTS.iter().map(|e| format!(" DROP FUNCTION IF EXISTS {}();", (names.function)(id, e).sql())).collect()
}

/// Removes the change log and the trigger functions (after the triggers are gone).
pub fn drop_log_sql(id: i64) -> String {
    let mut sql = format!(
        "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {};",
        super::super::spec::log_table(id).sql(),
        super::logical::intact_table(id).sql()
    );
    sql.push_str(&drop_functions_sql(&FORWARD, id));
    sql
}

/// Creates the change log and installs the triggers on the original table. Idempotent: a
/// resumed run finds them there (they are created in one transaction: all or none).
pub async fn install(client: &Client, spec: &Spec, retry: &RetryPolicy) -> Result<(), tokio_postgres::Error> {
    super::super::retry::in_transaction(client, &log_sql(spec)).await?;
    if installed(client, spec).await? {
        return Ok(());
    }
    ddl(client, retry, "installing the capture triggers", &trigger_sql(spec, &spec.original)).await
}

/// Whether all the capture triggers are on the original table.
pub async fn installed(client: &Client, spec: &Spec) -> Result<bool, tokio_postgres::Error> {
    named_installed(client, &FORWARD, spec.migration_id, &spec.original).await
}

/// Whether all the triggers of `names` are on `table`.
pub async fn named_installed(
    client: &Client,
    names: &Names,
    id: i64,
    table: &QualifiedName,
) -> Result<bool, tokio_postgres::Error> {
    let names: Vec<String> = CAPTURE_EVENTS.iter().map(|e| (names.trigger)(id, e)).collect();
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = ANY($2)",
            &[&table.sql(), &names],
        )
        .await?;
    Ok(row.get::<_, i64>(0) == names.len() as i64)
}
