//! `ghostwire.applied`: the migration log, one row per attempt at a statement. A statement
//! is known again by its file, the md5 of its text, and which occurrence of that text in
//! the file it is; one with a finished attempt is skipped by a rerun.

use tokio_postgres::GenericClient;

/// Where a statement is in the log.
pub struct Key<'a> {
    pub file: &'a str,
    pub checksum: &'a str,
    pub occurrence: i32,
}

pub async fn checksum(client: &impl GenericClient, text: &str) -> Result<String, tokio_postgres::Error> {
    Ok(client.query_one("SELECT md5($1)", &[&text]).await?.get(0))
}

/// Whether an attempt at the statement finished.
pub async fn done(client: &impl GenericClient, k: &Key<'_>) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT 1 FROM ghostwire.applied WHERE file = $1 AND checksum = $2 AND occurrence = $3
                AND finished_at IS NOT NULL LIMIT 1",
            &[&k.file, &k.checksum, &k.occurrence],
        )
        .await?;
    Ok(row.is_some())
}

/// Records an attempt starting; its id.
pub async fn start(
    client: &impl GenericClient,
    k: &Key<'_>,
    number: i32,
    line: i32,
    text: &str,
    way: &str,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "INSERT INTO ghostwire.applied (file, statement_number, line, checksum, occurrence, statement, way)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[&k.file, &number, &line, &k.checksum, &k.occurrence, &text, &way],
        )
        .await?;
    Ok(row.get(0))
}

/// What an attempt did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Finished {
    pub migration_id: Option<i64>,
    pub lock_wait_ms: Option<f64>,
    pub lock_hold_ms: Option<f64>,
    pub note: Option<String>,
}

/// Marks the attempt finished (in the caller's transaction, for a statement run directly).
pub async fn finish(client: &impl GenericClient, id: i64, f: &Finished) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE ghostwire.applied SET finished_at = clock_timestamp(),
                    duration_ms = extract(epoch FROM clock_timestamp() - started_at) * 1000,
                    migration_id = $2, lock_wait_ms = $3, lock_hold_ms = $4, note = $5
              WHERE id = $1",
            &[&id, &f.migration_id, &f.lock_wait_ms, &f.lock_hold_ms, &f.note],
        )
        .await?;
    Ok(())
}

pub async fn failed(client: &impl GenericClient, id: i64, error: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE ghostwire.applied SET error = $2, duration_ms = extract(epoch FROM clock_timestamp() - started_at) * 1000
              WHERE id = $1",
            &[&id, &error],
        )
        .await?;
    Ok(())
}

/// The unfinished migration or backfill of exactly this statement, if one stopped midway.
pub async fn unfinished_run(
    client: &impl GenericClient,
    text: &str,
) -> Result<Option<crate::state::Migration>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT id FROM ghostwire.migrations WHERE statement = $1 AND phase NOT IN ('finished', 'aborted')
              ORDER BY id DESC LIMIT 1",
            &[&text],
        )
        .await?;
    match row {
        Some(r) => crate::state::migration(client, r.get(0)).await,
        None => Ok(None),
    }
}
