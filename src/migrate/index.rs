//! Phase `index`: build the shadow's secondary indexes after the copy, several at once.
//!
//! Plain `CREATE INDEX` (nobody uses the shadow yet), one connection per concurrent build;
//! primary key and unique constraints are built as their indexes and attached after.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Config;
use tokio_util::sync::CancellationToken;

use super::spec::{DeferredIndex, Spec};
use crate::db::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("building index {index}: {}", crate::db::describe(source))]
    Build { index: String, source: tokio_postgres::Error },
    #[error("an index build task failed: {0}")]
    Worker(String),
}

/// The indexes the shadow has now (a resumed run builds only the others).
pub async fn existing(client: &tokio_postgres::Client, spec: &Spec) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = $1::text::regclass",
            &[&spec.shadow().sql()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The statements that build `index`, in its original's tablespace when that is not the
/// default (through `default_tablespace`: the index definition has no place for it).
pub fn build_sql(index: &DeferredIndex) -> String {
    match &index.tablespace {
        Some(ts) => {
            format!("SET default_tablespace = {}; {}; RESET default_tablespace", crate::sql::ident(ts), index.sql)
        }
        None => index.sql.clone(),
    }
}

/// The constraint names the shadow has.
async fn constraints(client: &tokio_postgres::Client, spec: &Spec) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT conname::text FROM pg_catalog.pg_constraint WHERE conrelid = $1::text::regclass",
            &[&spec.shadow().sql()],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The indexes and index-backed constraints the shadow should have by now and has not: a
/// swap must never install a table without an index or key of the original's.
pub async fn missing(client: &tokio_postgres::Client, spec: &Spec) -> Result<Vec<String>, tokio_postgres::Error> {
    let (indexes, constraints) = (existing(client, spec).await?, constraints(client, spec).await?);
    let mut missing: Vec<String> = spec
        .deferred_indexes
        .iter()
        .map(|d| &d.name)
        .chain(std::iter::once(&spec.key_index))
        .filter(|n| !indexes.contains(n))
        .map(|n| format!("index {n}"))
        .collect();
    missing.sort();
    missing.dedup();
    for (constraint, _) in spec.deferred_indexes.iter().filter_map(|d| d.attach.as_ref()) {
        if !constraints.contains(constraint) {
            missing.push(format!("constraint {constraint}"));
        }
    }
    Ok(missing)
}

/// Makes the built indexes of primary key and unique constraints those constraints (each
/// quick: the index exists), skipping constraints the shadow has already (a resumed run).
pub async fn attach_constraints(client: &tokio_postgres::Client, spec: &Spec) -> Result<usize, IndexError> {
    let have = constraints(client, spec)
        .await
        .map_err(|source| IndexError::Build { index: "(listing constraints)".into(), source })?;
    let mut attached = 0;
    for index in &spec.deferred_indexes {
        let Some((constraint, sql)) = &index.attach else { continue };
        if have.contains(constraint) {
            continue;
        }
        client.batch_execute(sql).await.map_err(|source| IndexError::Build { index: index.name.clone(), source })?;
        attached += 1;
    }
    Ok(attached)
}

/// Builds `indexes` on `parallel` connections; returns each index's build time.
pub async fn build(
    config: &Config,
    indexes: &[DeferredIndex],
    parallel: usize,
    cancel: &CancellationToken,
) -> Result<Vec<(String, Duration)>, IndexError> {
    let queue = Arc::new(Mutex::new(indexes.iter().cloned().collect::<VecDeque<_>>()));
    let mut workers = Vec::new();
    let workers_count = parallel.clamp(1, indexes.len().max(1));
    for _ in 0..workers_count {
        let client = crate::db::connect(config).await?;
        if workers_count > 1 {
            // Several builds at once already use the cores; PostgreSQL's own parallel build
            // workers on top of them only compete (measured: 1.58 s against 1.67 s).
            client.batch_execute("SET max_parallel_maintenance_workers = 0").await.map_err(ConnectError::Connect)?;
        }
        let queue = Arc::clone(&queue);
        let cancel = cancel.clone();
        workers.push(tokio::spawn(async move {
            let mut built = Vec::new();
            loop {
                let next = queue.lock().map(|mut q| q.pop_front().map(|i| (i, q.is_empty()))).unwrap_or(None);
                let Some((index, last)) = next else { break };
                if cancel.is_cancelled() {
                    break;
                }
                // The last index to start (one per call) would otherwise leave a core idle
                // once the other builds end: it may use PostgreSQL's parallel build workers
                // (the server's own setting).
                let sql = if last && workers_count > 1 {
                    format!("RESET max_parallel_maintenance_workers; {}", build_sql(&index))
                } else {
                    build_sql(&index)
                };
                let started = Instant::now();
                if let Err(source) = client.batch_execute(&sql).await {
                    return Err(IndexError::Build { index: index.name, source });
                }
                tracing::debug!("built index {} in {:.1?}", index.name, started.elapsed());
                crate::failpoint::hit("index.built");
                built.push((index.name, started.elapsed()));
            }
            Ok(built)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        match w.await {
            Ok(Ok(built)) => all.extend(built),
            Ok(Err(e)) => return Err(e),
            Err(join) => return Err(IndexError::Worker(join.to_string())),
        }
    }
    Ok(all)
}
