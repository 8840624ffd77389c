//! `ghostwire indexes [--invalid] [--drop-invalid [--yes]] [TABLE]`: the indexes of the
//! database (or of TABLE), the invalid ones first among what to look at: a failed
//! `CREATE INDEX CONCURRENTLY` or `REINDEX CONCURRENTLY` (its `_ccnew`/`_ccold` leftovers)
//! leaves an index that serves no query and, once ready, slows every write.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use super::CommandError;
use crate::connect;
use crate::plan::report::{bytes, thousands};
use crate::sql::QualifiedName;

struct Found {
    index: QualifiedName,
    table: QualifiedName,
    valid: bool,
    /// Maintained on writes (an invalid index is once its build has passed its first phase).
    ready: bool,
    bytes: i64,
    definition: String,
    /// Inserts and non-HOT updates of the table since its statistics were reset: each had
    /// to update this index too, when it was ready.
    writes: i64,
    scans: i64,
}

async fn find(client: &Client, only_invalid: bool, table: Option<u32>) -> Result<Vec<Found>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, tn.nspname::text, t.relname::text, i.indisvalid, i.indisready,
                    pg_relation_size(c.oid), pg_get_indexdef(c.oid),
                    coalesce(s.n_tup_ins + s.n_tup_upd - s.n_tup_hot_upd, 0), coalesce(si.idx_scan, 0)
               FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
               JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
               LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = t.oid
               LEFT JOIN pg_catalog.pg_stat_user_indexes si ON si.indexrelid = c.oid
              WHERE tn.nspname NOT IN ('pg_catalog', 'information_schema') AND tn.nspname NOT LIKE 'pg\\_toast%'
                AND (NOT $1 OR NOT (i.indisvalid AND i.indisready))
                AND ($2::oid IS NULL OR i.indrelid = $2::oid)
              ORDER BY (i.indisvalid AND i.indisready), 3, 4, 2",
            &[&only_invalid, &table],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Found {
            index: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            table: QualifiedName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
            valid: r.get::<_, bool>(4) && r.get::<_, bool>(5),
            ready: r.get(5),
            bytes: r.get(6),
            definition: r.get(7),
            writes: r.get(8),
            scans: r.get(9),
        })
        .collect())
}

fn cost(f: &Found) -> String {
    if f.valid {
        format!("{} scans", thousands(f.scans))
    } else if f.ready {
        format!(
            "INVALID, maintained by every write: {} inserts and non-HOT updates since the statistics were reset",
            thousands(f.writes)
        )
    } else {
        "INVALID, not yet maintained (its build stopped in its first phase)".to_owned()
    }
}

pub async fn run(
    url: Option<&str>,
    table: Option<&str>,
    only_invalid: bool,
    drop_invalid: bool,
    yes: bool,
    json_out: bool,
) -> Result<(), CommandError> {
    let config = connect::params(url, "ghostwire indexes")?;
    let client = connect::connect(&config).await?;
    let oid = match table {
        Some(t) => {
            let oid: Option<u32> = client
                .query_one("SELECT to_regclass($1)::oid", &[&t])
                .await
                .map_err(|e| CommandError::refused(format!("{t}: {}", connect::describe(&e))))?
                .get(0);
            Some(oid.ok_or_else(|| CommandError::refused(format!("table {t} does not exist")))?)
        }
        None => None,
    };
    let found = find(&client, only_invalid || drop_invalid, oid).await.map_err(CommandError::failed)?;
    if json_out && !drop_invalid {
        let out: Vec<_> = found
            .iter()
            .map(|f| {
                json!({"index": f.index.to_string(), "table": f.table.to_string(), "valid": f.valid, "ready": f.ready,
                       "bytes": f.bytes, "definition": f.definition, "writes_maintained": if f.valid || f.ready { Some(f.writes) } else { None },
                       "scans": f.scans})
            })
            .collect();
        say!("{}", serde_json::to_string_pretty(&out).map_err(CommandError::failed)?);
        return Ok(());
    }
    if found.is_empty() {
        say!(
            "No {}indexes{}.",
            if only_invalid || drop_invalid { "invalid " } else { "" },
            table.map(|t| format!(" on {t}")).unwrap_or_default()
        );
        return Ok(());
    }
    for f in &found {
        say!("{} on {}: {}, {}", f.index, f.table, bytes(f.bytes), cost(f));
        say!("    {}", f.definition);
    }
    if !drop_invalid {
        let invalid = found.iter().filter(|f| !f.valid).count();
        if invalid > 0 {
            say!(
                "{invalid} invalid index(es): `ghostwire indexes --drop-invalid` removes them (DROP INDEX CONCURRENTLY)."
            );
        }
        return Ok(());
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CommandError::refused(format!(
                "{} invalid index(es) to drop: pass --yes to drop them without asking",
                found.len()
            )));
        }
        say!("Drop these {} invalid index(es) concurrently? [y/N]", found.len());
        let mut answer = String::new();
        if std::io::stdin().read_line(&mut answer).is_err() || !matches!(answer.trim(), "y" | "Y" | "yes") {
            say!("Nothing dropped.");
            return Ok(());
        }
    }
    for f in &found {
        drop_concurrently(&client, &f.index).await?;
        say!("Dropped {} (was on {}, {}).", f.index, f.table, bytes(f.bytes));
    }
    Ok(())
}

/// `DROP INDEX CONCURRENTLY` under a short lock_timeout, retried: it waits for the
/// transactions using the table, and must not queue writers behind it for long.
async fn drop_concurrently(client: &Client, index: &QualifiedName) -> Result<(), CommandError> {
    client.batch_execute("SET lock_timeout = '2s'").await.map_err(CommandError::failed)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index.sql())).await {
            Ok(()) => return Ok(()),
            Err(e) if crate::migrate::retry::is_lock_conflict(&e) && attempt < 10 => {
                tracing::info!("dropping {index}: the lock was not granted within 2 s; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => {
                return Err(CommandError::failed(format!(
                    "dropping {index} failed: {}; the indexes after it were not dropped: run it again",
                    connect::describe(&e)
                )));
            }
        }
    }
}
