//! The revert's catch-up: logged keys of the new table applied to the old one in batches.
//!
//! For a batch, in one transaction: a TRUNCATE marker empties the old table; a key no longer
//! in the new table is deleted from the old one; every other key is upserted from the new
//! row through the mapping (`INSERT … ON CONFLICT (key) DO UPDATE` of the copied columns
//! only, so a column the migration dropped keeps its value in the rows that had it).
//! Idempotent and independent of order, like the forward catch-up; exactly the entries read
//! are removed. A batch that fails on a value or a constraint is rolled back and its rows
//! tried one by one to name those that cannot go back.

use tokio_postgres::Client;

use super::capture::log_table;
use super::mapping::Mapping;
use crate::migrate::spec::Spec;
use crate::sql::{QualifiedName, ident};

/// A row of the new table that cannot be written to the old one.
#[derive(Debug, Clone)]
pub struct Unmappable {
    /// The key, as text.
    pub key: String,
    /// The column at fault, when one is.
    pub column: Option<String>,
    pub reason: String,
}

/// Where the batch works: the new table (live until the revert's swap) and the old one.
pub struct Tables {
    pub new: QualifiedName,
    pub old: QualifiedName,
}

impl Tables {
    pub fn of(spec: &Spec) -> Tables {
        Tables { new: spec.original.clone(), old: spec.archived() }
    }
}

/// Creates the session's batch table.
pub async fn prepare(client: &Client, id: i64) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE TEMPORARY TABLE IF NOT EXISTS ghostwire_revert_batch (LIKE {}) ON COMMIT DELETE ROWS",
            log_table(id).sql()
        ))
        .await
}

/// The upsert of the rows of the new table whose keys satisfy `which` (over `n`).
fn upsert_sql(m: &Mapping, t: &Tables, which: &str) -> String {
    let (targets, sources) = m.copy_lists();
    let updated = m.updated_columns();
    let on_conflict = if updated.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        let sets: Vec<String> = updated.iter().map(|c| format!("{0} = EXCLUDED.{0}", ident(c))).collect();
        format!("DO UPDATE SET {}", sets.join(", "))
    };
    format!(
        "INSERT INTO {old} AS o ({targets}) {overriding}SELECT {sources} FROM ONLY {new} n WHERE {which}
         ON CONFLICT ({keys}) {on_conflict}",
        old = t.old.sql(),
        new = t.new.sql(),
        overriding = if m.overriding { "OVERRIDING SYSTEM VALUE " } else { "" },
        keys = m.old_key_list(),
    )
}

/// The statements that apply up to `limit` entries (all with `None`), without the
/// transaction around them.
pub fn apply_sql(m: &Mapping, t: &Tables, id: i64, limit: Option<i64>) -> String {
    let log = log_table(id).sql();
    let new_keys = m.new_key_list();
    let limit = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
    let matches_new: Vec<String> = m.key.iter().map(|k| format!("x.{0} = b.{0}", ident(&k.new))).collect();
    // Compared across the types where the key was retyped (int = bigint is one operator
    // family, so the old key index serves): a key beyond the old type's range, inserted and
    // deleted since the swap, matches nothing instead of failing a cast.
    let matches_old: Vec<String> = m.key.iter().map(|k| format!("o.{} = b.{}", ident(&k.old), ident(&k.new))).collect();
    format!(
        "INSERT INTO pg_temp.ghostwire_revert_batch SELECT * FROM {log} ORDER BY ghostwire_seq{limit};
         DO $ghostwire$ BEGIN
             IF EXISTS (SELECT 1 FROM pg_temp.ghostwire_revert_batch WHERE ghostwire_truncated) THEN TRUNCATE {old}; END IF;
         END $ghostwire$;
         DELETE FROM {old} o USING pg_temp.ghostwire_revert_batch b
          WHERE NOT b.ghostwire_truncated AND {matches_old}
            AND NOT EXISTS (SELECT 1 FROM ONLY {new} x WHERE {matches_new});
         {upsert};
         DELETE FROM {log} c USING pg_temp.ghostwire_revert_batch b WHERE c.ghostwire_seq = b.ghostwire_seq;",
        old = t.old.sql(),
        new = t.new.sql(),
        matches_old = matches_old.join(" AND "),
        matches_new = matches_new.join(" AND "),
        upsert = upsert_sql(
            m,
            t,
            &format!("({new_keys}) IN (SELECT {new_keys} FROM pg_temp.ghostwire_revert_batch WHERE NOT ghostwire_truncated)")
        ),
    )
}

/// Applies one batch of up to `limit` entries in its own transaction; returns the entries
/// consumed, or the rows that cannot go back (nothing applied).
pub async fn batch(
    client: &Client,
    m: &Mapping,
    t: &Tables,
    id: i64,
    limit: i64,
) -> Result<Result<i64, Vec<Unmappable>>, tokio_postgres::Error> {
    let sql = format!(
        "BEGIN; {} SELECT count(*)::text FROM pg_temp.ghostwire_revert_batch; COMMIT;",
        apply_sql(m, t, id, Some(limit))
    );
    match client.simple_query(&sql).await {
        Ok(messages) => {
            let n = messages.iter().rev().find_map(|msg| match msg {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse::<i64>().ok()),
                _ => None,
            });
            Ok(Ok(n.unwrap_or(0)))
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            if !is_row_fault(&e) {
                return Err(e);
            }
            let mut found = find_unmappable(client, m, t, id, limit).await?;
            if found.is_empty() {
                // Only the batch as a whole fails (two of its rows against each other).
                let reason = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
                found.push(Unmappable { key: "(several rows together)".into(), column: None, reason });
            }
            Ok(Err(found))
        }
    }
}

/// A data exception (class 22: out of range, too long, invalid text) or an integrity
/// violation (class 23: not null, unique, check, foreign key).
pub fn is_row_fault(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
}

/// Most rows named in a report.
const REPORTED: usize = 10;

/// Tries the batch's rows one by one (each under a savepoint, all rolled back) and names
/// those that fail, with the column at fault where a cast is.
async fn find_unmappable(
    client: &Client,
    m: &Mapping,
    t: &Tables,
    id: i64,
    limit: i64,
) -> Result<Vec<Unmappable>, tokio_postgres::Error> {
    let new_keys = m.new_key_list();
    let as_text: Vec<String> = m.key.iter().map(|k| format!("{}::text", ident(&k.new))).collect();
    let keys = client
        .query(
            &format!(
                "SELECT DISTINCT ARRAY[{}] FROM (SELECT * FROM {} WHERE NOT ghostwire_truncated ORDER BY ghostwire_seq LIMIT {limit}) l",
                as_text.join(", "),
                log_table(id).sql()
            ),
            &[],
        )
        .await?;
    let mut found = Vec::new();
    client.batch_execute("BEGIN").await?;
    for row in keys {
        let key: Vec<String> = row.get(0);
        let typed: Vec<String> =
            m.key.iter().zip(&key).map(|(k, v)| format!("{}::text::{}", crate::sql::literal(v), k.new_type)).collect();
        let which = format!("({new_keys}) = ({})", typed.join(", "));
        client.batch_execute("SAVEPOINT ghostwire_row").await?;
        let tried = client.batch_execute(&upsert_sql(m, t, &which)).await;
        client.batch_execute("ROLLBACK TO SAVEPOINT ghostwire_row").await?;
        let Err(e) = tried else { continue };
        if !is_row_fault(&e) {
            client.batch_execute("ROLLBACK").await?;
            return Err(e);
        }
        let db = e.as_db_error();
        let mut column = db.and_then(|d| d.column()).map(str::to_owned);
        if column.is_none() {
            for (old, new, old_type) in m.cast_columns() {
                client.batch_execute("SAVEPOINT ghostwire_row").await?;
                let cast =
                    format!("SELECT CAST({} AS {old_type}) FROM ONLY {} WHERE {which}", ident(&new), t.new.sql());
                let failed = client.batch_execute(&cast).await.is_err();
                client.batch_execute("ROLLBACK TO SAVEPOINT ghostwire_row").await?;
                if failed {
                    column = Some(old);
                    break;
                }
            }
        }
        let reason = db.map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
        found.push(Unmappable { key: format!("({})", key.join(", ")), column, reason });
        if found.len() >= REPORTED {
            break;
        }
    }
    client.batch_execute("ROLLBACK").await?;
    Ok(found)
}

/// Reverse changes waiting.
pub async fn backlog(client: &Client, id: i64) -> Result<i64, tokio_postgres::Error> {
    crate::migrate::capture::log_backlog(client, &log_table(id)).await
}
