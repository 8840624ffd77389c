//! Reverse capture: from the swap on, every write to the new table logs the keys it touched
//! in `ghostwire.revert_changes_<id>`, exactly as forward trigger capture does (keys only,
//! so it can never make an application write fail), so that `revert` can bring the old
//! table up to date. The log and its functions are made just before the swap; the triggers
//! are installed inside the swap's transaction, under the lock it holds.
//!
//! Triggers whatever mode the forward capture used: a logical stream would need a ghostwire
//! process alive for the whole window, or a slot pinning every byte of WAL written during
//! it; the triggers need neither.

use crate::migrate::capture::trigger::{self, Names};
use crate::migrate::spec::Spec;
use crate::sql::{QualifiedName, ident};

use super::mapping::Mapping;

pub fn log_table(id: i64) -> QualifiedName {
    QualifiedName::new("ghostwire", format!("revert_changes_{id}"))
}

/// Reverse capture's trigger and function names.
const REVERSE: Names = Names { trigger: trigger_name, function: trigger_function };

fn trigger_name(id: i64, event: &str) -> String {
    format!("ghostwire_{id}_revert_{event}")
}

fn trigger_function(id: i64, event: &str) -> QualifiedName {
    QualifiedName::new("ghostwire", format!("revert_{id}_{event}"))
}

/// The reverse log and the trigger functions that write to it: made before the swap asks
/// for its lock (they touch no table the application uses, and creating them took a sixth
/// of the swap's lock hold); kept by an attempt that rolls back, removed by `abort`.
pub fn log_sql(spec: &Spec, mapping: &Mapping) -> Vec<String> {
    let id = spec.migration_id;
    let columns: Vec<String> = mapping
        .key
        .iter()
        .map(|k| match &k.collation {
            Some(c) => format!("{} {} COLLATE {c}", ident(&k.new), k.new_type),
            None => format!("{} {}", ident(&k.new), k.new_type),
        })
        .collect();
    vec![
        crate::migrate::capture::log_table_ddl(&log_table(id), false, &columns),
        trigger::functions_sql(&REVERSE, id, &log_table(id), &mapping.new_key_list()),
    ]
}

/// The statements that start reverse capture on the new table (now at the table's name)
/// and keep the old table's own triggers from firing while a revert writes to it. Run in
/// the swap's transaction, after the move, once `log_sql` has run.
pub fn install_sql(spec: &Spec) -> Vec<String> {
    let mut out = vec![trigger::triggers_sql(&REVERSE, spec.migration_id, &spec.original)];
    if spec.table.triggers.iter().any(|t| t.enabled != "D") {
        out.push(format!("ALTER TABLE {} DISABLE TRIGGER USER", spec.archived().sql()));
    }
    out
}

/// Drops the reverse capture triggers from `table` (the new table, wherever it is now).
pub fn drop_triggers_sql(id: i64, table: &QualifiedName) -> String {
    trigger::drop_named_triggers_sql(&REVERSE, id, table)
}

/// Drops the reverse log and its trigger functions (after the triggers are gone).
pub fn drop_log_sql(id: i64) -> String {
    format!("DROP TABLE IF EXISTS {};{}", log_table(id).sql(), trigger::drop_functions_sql(&REVERSE, id))
}

/// Whether reverse capture is on the table `table` now names.
pub async fn installed(
    client: &tokio_postgres::Client,
    id: i64,
    table: &QualifiedName,
) -> Result<bool, tokio_postgres::Error> {
    trigger::named_installed(client, &REVERSE, id, table).await
}
