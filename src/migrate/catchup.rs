//! Phase `catchup`: apply captured keys to the shadow in batches.
//!
//! For a batch of logged keys, in one transaction: delete those keys from the shadow and
//! re-insert them from the original as it is now. This is idempotent and independent of
//! order. Exactly the log entries read are removed (by their ids, never a range), so an
//! entry committed concurrently with a lower id is not lost. A TRUNCATE marker in the batch
//! empties the shadow first. One batch is one round trip.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::spec::Spec;
use crate::sql::ident;

/// What one batch did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Batch {
    /// Change-log entries consumed.
    pub entries: i64,
    /// The batch's transaction id (txid_current, epoch-extended), when it ran in its own.
    pub xid: Option<i64>,
}

/// Creates the session's batch table (temporary, emptied at each commit).
pub async fn prepare(client: &Client, spec: &Spec) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS ghostwire_batch (LIKE {}) ON COMMIT DELETE ROWS",
            spec.log_table().sql()
        ))
        .await
}

/// The statements that apply up to `limit` log entries (all with `None`), without the
/// transaction around them. Every entry read is removed from the log; those that do not
/// match `only` (a condition on the key columns) are removed without being applied.
pub fn apply_sql(spec: &Spec, limit: Option<i64>, only: Option<&str>) -> String {
    let log = spec.log_table().sql();
    let shadow = spec.shadow().sql();
    let keys = spec.key_list();
    let (targets, sources) = spec.copy_lists();
    let converted: Vec<String> =
        spec.key.iter().enumerate().map(|(i, k)| format!("{} AS gw_k{i}", k.to_shadow)).collect();
    let matches: Vec<String> =
        spec.key.iter().enumerate().map(|(i, k)| format!("s.{} = b.gw_k{i}", ident(&k.shadow_name))).collect();
    let limit = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
    let only = only.map(|c| format!(" AND ({c})")).unwrap_or_default();
    format!(
        "INSERT INTO pg_temp.ghostwire_batch SELECT * FROM {log} ORDER BY ghostwire_seq{limit};
         DO $ghostwire$ BEGIN
             IF EXISTS (SELECT 1 FROM pg_temp.ghostwire_batch WHERE ghostwire_truncated) THEN TRUNCATE {shadow}; END IF;
         END $ghostwire$;
         DELETE FROM {shadow} s
          USING (SELECT DISTINCT {converted} FROM pg_temp.ghostwire_batch AS {alias} WHERE NOT ghostwire_truncated{only}) b
          WHERE {matches};
         INSERT INTO {shadow} ({targets}) {overriding}SELECT {sources} FROM ONLY {original}
          WHERE ({keys}) IN (SELECT {keys} FROM pg_temp.ghostwire_batch WHERE NOT ghostwire_truncated{only});
         DELETE FROM {log} c USING pg_temp.ghostwire_batch b WHERE c.ghostwire_seq = b.ghostwire_seq;",
        converted = converted.join(", "),
        alias = ident(&spec.original.name),
        matches = matches.join(" AND "),
        overriding = spec.overriding(),
        original = spec.original.sql(),
    )
}

fn last_row_values(messages: &[SimpleQueryMessage]) -> Option<(Option<String>, Option<String>)> {
    messages.iter().rev().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some((r.get(0).map(str::to_owned), r.get(1).map(str::to_owned))),
        _ => None,
    })
}

/// Applies one batch of up to `limit` entries in its own transaction.
pub async fn batch(client: &Client, spec: &Spec, limit: i64) -> Result<Batch, tokio_postgres::Error> {
    run_batch(client, spec, limit, None).await
}

/// `(k1, k2) <op> ('v1'::text::t1, 'v2'::text::t2)` for key values given as text.
fn key_condition(spec: &Spec, op: &str, values: &[String]) -> String {
    let typed: Vec<String> =
        spec.key.iter().zip(values).map(|(k, v)| format!("{}::text::{}", crate::sql::literal(v), k.type_sql)).collect();
    format!("({}) {op} ({})", spec.key_list(), typed.join(", "))
}

/// During the copy (the shadow's key index must exist): applies logged keys the copy has
/// passed (up to `checkpoint`) and keys beyond its `end`; drops the entries for keys in
/// between, whose rows the copy will read as they are then. So `checkpoint` must be the end
/// of everything copied: never call this while a round of chunks is incomplete.
pub async fn batch_during_copy(
    client: &Client,
    spec: &Spec,
    limit: i64,
    checkpoint: Option<&[String]>,
    end: &[String],
) -> Result<Batch, tokio_postgres::Error> {
    let beyond = key_condition(spec, ">", end);
    let only = match checkpoint {
        Some(cp) => format!("{} OR {beyond}", key_condition(spec, "<=", cp)),
        None => beyond,
    };
    run_batch(client, spec, limit, Some(&only)).await
}

async fn run_batch(
    client: &Client,
    spec: &Spec,
    limit: i64,
    only: Option<&str>,
) -> Result<Batch, tokio_postgres::Error> {
    let sql = format!(
        "BEGIN; {} SELECT count(*)::text, txid_current()::text FROM pg_temp.ghostwire_batch; COMMIT;",
        apply_sql(spec, Some(limit), only)
    );
    let messages = match client.simple_query(&sql).await {
        Ok(m) => m,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    crate::failpoint::hit("catchup.batch");
    let (entries, xid) = last_row_values(&messages).unwrap_or_default();
    let entries = entries.and_then(|v| v.parse().ok()).unwrap_or(0);
    metrics::counter!("ghostwire_changes_applied_total").increment(entries as u64);
    Ok(Batch { entries, xid: xid.and_then(|v| v.parse().ok()) })
}

/// Applies everything in the log inside the caller's transaction (the cut-over).
pub async fn drain_in_transaction(client: &Client, spec: &Spec) -> Result<i64, tokio_postgres::Error> {
    let sql = format!("{} SELECT count(*)::text, NULL FROM pg_temp.ghostwire_batch;", apply_sql(spec, None, None));
    let messages = client.simple_query(&sql).await?;
    Ok(last_row_values(&messages).and_then(|(n, _)| n).and_then(|v| v.parse().ok()).unwrap_or(0))
}
