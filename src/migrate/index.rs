//! Phase `index`: the shadow's indexes, built after the copy (`post_copy` runs the builds).
//!
//! Plain `CREATE INDEX` (nobody uses the shadow yet), one connection per concurrent build;
//! primary key and unique constraints are built as their indexes and attached after.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::connect::Params as Config;

use super::spec::{DeferredIndex, Spec};
use crate::connect::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("building index {index}: {}", crate::connect::describe(source))]
    Build { index: String, source: tokio_postgres::Error },
}

/// The indexes the shadow has now (a resumed run builds only the others).
pub async fn existing(client: &Client, spec: &Spec) -> Result<Vec<String>, tokio_postgres::Error> {
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
async fn constraints(client: &Client, spec: &Spec) -> Result<Vec<String>, tokio_postgres::Error> {
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
pub async fn missing(client: &Client, spec: &Spec) -> Result<Vec<String>, tokio_postgres::Error> {
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
pub async fn attach_constraints(client: &Client, spec: &Spec) -> Result<usize, IndexError> {
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

/// A session for index builds. With `several` builds at once the cores are in use already,
/// and PostgreSQL's own parallel build workers on top of them only compete (measured: 1.58 s
/// against 1.67 s), so they are turned off.
pub async fn build_session(config: &Config, several: bool) -> Result<Client, IndexError> {
    let client = crate::connect::connect(config).await?;
    if several {
        client
            .batch_execute("SET max_parallel_maintenance_workers = 0")
            .await
            .map_err(|source| IndexError::Build { index: "(preparing a build session)".into(), source })?;
    }
    Ok(client)
}

/// Builds one index on a session from `build_session`; with `server_workers` it may use
/// PostgreSQL's parallel build workers (the server's own setting). Returns the build time.
pub async fn build_one(client: &Client, index: &DeferredIndex, server_workers: bool) -> Result<Duration, IndexError> {
    let sql = if server_workers {
        format!("RESET max_parallel_maintenance_workers; {}", build_sql(index))
    } else {
        build_sql(index)
    };
    let started = Instant::now();
    client.batch_execute(&sql).await.map_err(|source| IndexError::Build { index: index.name.clone(), source })?;
    tracing::debug!("built index {} in {:.1?}", index.name, started.elapsed());
    crate::failpoint::hit("index.built");
    Ok(started.elapsed())
}
