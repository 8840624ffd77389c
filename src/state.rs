//! A migration's persistent state in the target database (DESIGN.md §5).
//!
//! Schema `ghostwire` holds `migrations` (one row per migration), `events` (its log: phase
//! changes, cut-over attempts with their timings, errors), and for running migrations their
//! change-log tables and the copy rounds in flight (`copy::round_table`). All of it survives
//! a crash of ghostwire; `status`, `abort` and `finish` read it. A session-level advisory
//! lock keyed on the table keeps two ghostwire processes from migrating one table at once.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

use crate::sql::QualifiedName;

/// The version of the state schema this ghostwire writes.
pub const SCHEMA_VERSION: i32 = 4;

const SCHEMA_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS ghostwire;
COMMENT ON SCHEMA ghostwire IS 'ghostwire online schema changes: migration state, events and change logs';
CREATE TABLE IF NOT EXISTS ghostwire.schema_version (version int NOT NULL);
CREATE TABLE IF NOT EXISTS ghostwire.migrations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_schema text NOT NULL,
    table_name text NOT NULL,
    table_oid oid NOT NULL,
    statement text NOT NULL,
    strategy text NOT NULL,
    capture text NOT NULL DEFAULT 'trigger',
    phase text NOT NULL,
    work_schema text,
    archive_schema text,
    checkpoint text[],
    rows_estimated bigint NOT NULL DEFAULT 0,
    rows_copied bigint NOT NULL DEFAULT 0,
    spec jsonb,
    settings jsonb NOT NULL DEFAULT '{}',
    cutover_attempts int NOT NULL DEFAULT 0,
    lock_wait_ms double precision,
    lock_hold_ms double precision,
    error text,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    ghostwire_version text NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS migrations_one_active_per_table
    ON ghostwire.migrations (table_schema, table_name) WHERE phase NOT IN ('finished', 'aborted');
CREATE TABLE IF NOT EXISTS ghostwire.events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration_id bigint NOT NULL REFERENCES ghostwire.migrations (id) ON DELETE CASCADE,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    phase text NOT NULL,
    kind text NOT NULL,
    message text NOT NULL,
    duration_ms double precision,
    details jsonb
);
CREATE INDEX IF NOT EXISTS events_by_migration ON ghostwire.events (migration_id, id);
-- Version 2: the copy's last key (fixed once capture is on), and live throttling state.
ALTER TABLE ghostwire.migrations ADD COLUMN IF NOT EXISTS copy_end text[];
ALTER TABLE ghostwire.migrations ADD COLUMN IF NOT EXISTS throttled text;
-- Version 3: `ghostwire abort` asked the process running the migration to stop.
ALTER TABLE ghostwire.migrations ADD COLUMN IF NOT EXISTS abort_requested_at timestamptz;
-- Version 4: the migration log of `ghostwire apply`, one row per attempt at a statement.
CREATE TABLE IF NOT EXISTS ghostwire.applied (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file text NOT NULL,
    statement_number int NOT NULL,
    line int NOT NULL,
    checksum text NOT NULL,
    occurrence int NOT NULL,
    statement text NOT NULL,
    way text NOT NULL,
    migration_id bigint,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    duration_ms double precision,
    lock_wait_ms double precision,
    lock_hold_ms double precision,
    note text,
    error text
);
CREATE INDEX IF NOT EXISTS applied_by_statement ON ghostwire.applied (file, checksum, occurrence);
"#;

/// Where a migration is. Recorded before each phase starts; a failed run keeps the phase it
/// failed in, with `error` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Planned,
    /// A backfill runs its batches.
    Backfill,
    Shadow,
    Capture,
    Copy,
    Index,
    Verify,
    Catchup,
    Cutover,
    /// Swapped; the old table is kept until `finish`, in step through reverse capture (the
    /// revert window).
    Swapped,
    /// `revert` is catching the old table up, or swapping it back.
    Reverting,
    /// The old table is live again; the new one is kept until `finish`.
    Reverted,
    Finished,
    Aborted,
}

impl Phase {
    pub const ALL: [Phase; 14] = [
        Phase::Planned,
        Phase::Backfill,
        Phase::Shadow,
        Phase::Capture,
        Phase::Copy,
        Phase::Index,
        Phase::Verify,
        Phase::Catchup,
        Phase::Cutover,
        Phase::Swapped,
        Phase::Reverting,
        Phase::Reverted,
        Phase::Finished,
        Phase::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Backfill => "backfill",
            Phase::Shadow => "shadow",
            Phase::Capture => "capture",
            Phase::Copy => "copy",
            Phase::Index => "index",
            Phase::Catchup => "catchup",
            Phase::Verify => "verify",
            Phase::Cutover => "cutover",
            Phase::Swapped => "swapped",
            Phase::Reverting => "reverting",
            Phase::Reverted => "reverted",
            Phase::Finished => "finished",
            Phase::Aborted => "aborted",
        }
    }

    /// Before the swap: the original table is untouched and `abort` can undo everything.
    pub fn before_swap(self) -> bool {
        self < Phase::Swapped
    }

    pub fn is_done(self) -> bool {
        matches!(self, Phase::Finished | Phase::Aborted)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| format!("unknown phase {s:?}"))
    }
}

/// Creates the state schema if needed (serialised by a transaction-level advisory lock, as
/// concurrent `CREATE … IF NOT EXISTS` can collide).
pub async fn ensure_schema(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('ghostwire state schema', 0))", &[]).await?;
    tx.batch_execute(SCHEMA_SQL).await?;
    let current: Option<i32> =
        tx.query_opt("SELECT max(version) FROM ghostwire.schema_version", &[]).await?.and_then(|r| r.get(0));
    if current.is_none_or(|v| v < SCHEMA_VERSION) {
        tx.execute("INSERT INTO ghostwire.schema_version VALUES ($1)", &[&SCHEMA_VERSION]).await?;
    }
    tx.commit().await
}

/// Whether the state schema exists (commands that only read state must not create it).
pub async fn schema_exists(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let row = client.query_one("SELECT to_regclass('ghostwire.migrations') IS NOT NULL", &[]).await?;
    Ok(row.get(0))
}

/// Takes the session-level advisory lock for `table` if free. Held until the session ends.
pub async fn try_lock_table(client: &impl GenericClient, table: &QualifiedName) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended('ghostwire table ' || $1 || '.' || $2, 0))",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(row.get(0))
}

/// Takes `table`'s advisory lock, waiting up to `grace` for it: the server session of a
/// ghostwire run that just ended (or died) keeps the lock until the server notices.
pub async fn lock_table_within(
    client: &impl GenericClient,
    table: &QualifiedName,
    grace: std::time::Duration,
) -> Result<bool, tokio_postgres::Error> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if try_lock_table(client, table).await? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The pid of the session holding `table`'s advisory lock, if any.
pub async fn lock_holder(
    client: &impl GenericClient,
    table: &QualifiedName,
) -> Result<Option<i32>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT l.pid FROM pg_locks l
              WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended('ghostwire table ' || $1 || '.' || $2, 0)
              LIMIT 1",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// One row of `ghostwire.migrations`.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    pub id: i64,
    pub table: QualifiedName,
    pub statement: String,
    pub strategy: String,
    pub phase: Phase,
    pub work_schema: Option<String>,
    pub archive_schema: Option<String>,
    pub rows_estimated: i64,
    pub rows_copied: i64,
    pub cutover_attempts: i32,
    pub lock_wait_ms: Option<f64>,
    pub lock_hold_ms: Option<f64>,
    pub error: Option<String>,
    /// Why the run is throttled right now, if it is.
    pub throttled: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    #[serde(skip)]
    pub spec: Option<Value>,
    /// The last copied key, as text.
    #[serde(skip)]
    pub checkpoint: Option<Vec<String>>,
    /// The copy's last key, fixed when the copy starts.
    #[serde(skip)]
    pub copy_end: Option<Vec<String>>,
    /// How it was started: jobs, verify, `rehearsal`, `sample`, `version_schema`, …
    #[serde(skip)]
    pub settings: Value,
    /// How writes are captured: `trigger` or `logical`.
    pub capture: String,
}

const MIGRATION_COLUMNS: &str = "id, table_schema, table_name, statement, strategy, phase, work_schema, archive_schema,
    rows_estimated, rows_copied, cutover_attempts, lock_wait_ms, lock_hold_ms, error,
    to_char(started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS TZ'),
    to_char(finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'), spec, checkpoint, copy_end, throttled, settings, capture";

fn migration_from(row: &tokio_postgres::Row) -> Migration {
    Migration {
        id: row.get(0),
        table: QualifiedName::new(row.get::<_, String>(1), row.get::<_, String>(2)),
        statement: row.get(3),
        strategy: row.get(4),
        phase: row.get::<_, String>(5).parse().unwrap_or(Phase::Planned),
        work_schema: row.get(6),
        archive_schema: row.get(7),
        rows_estimated: row.get(8),
        rows_copied: row.get(9),
        cutover_attempts: row.get(10),
        lock_wait_ms: row.get(11),
        lock_hold_ms: row.get(12),
        error: row.get(13),
        started_at: row.get(14),
        updated_at: row.get(15),
        finished_at: row.get(16),
        spec: row.get(17),
        checkpoint: row.get(18),
        copy_end: row.get(19),
        throttled: row.get(20),
        settings: row.get(21),
        capture: row.get(22),
    }
}

/// Starts a migration row in phase `planned`.
pub async fn insert_migration(
    client: &impl GenericClient,
    table: &QualifiedName,
    table_oid: u32,
    statement: &str,
    strategy: &str,
    rows_estimated: i64,
    settings: &Value,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "INSERT INTO ghostwire.migrations
                 (table_schema, table_name, table_oid, statement, strategy, phase, rows_estimated, settings, ghostwire_version)
             VALUES ($1, $2, $3, $4, $5, 'planned', $6, $7, $8) RETURNING id",
            &[
                &table.schema,
                &table.name,
                &table_oid,
                &statement,
                &strategy,
                &rows_estimated,
                settings,
                &env!("CARGO_PKG_VERSION"),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// The unfinished migration of `table`, if any.
pub async fn active_migration(
    client: &impl GenericClient,
    table: &QualifiedName,
) -> Result<Option<Migration>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {MIGRATION_COLUMNS} FROM ghostwire.migrations
          WHERE table_schema = $1 AND table_name = $2 AND phase NOT IN ('finished', 'aborted')"
    );
    Ok(client.query_opt(&sql, &[&table.schema, &table.name]).await?.as_ref().map(migration_from))
}

/// The unfinished migration of the table named `name` (in `schema`, if given): Ok(Err(why))
/// when there is none or the name is ambiguous.
pub async fn find_active(
    client: &impl GenericClient,
    schema: Option<&str>,
    name: &str,
) -> Result<Result<Migration, String>, tokio_postgres::Error> {
    let candidates: Vec<Migration> = list(client, None, 0)
        .await?
        .into_iter()
        .filter(|m| !m.phase.is_done() && m.table.name == name && schema.is_none_or(|s| s == m.table.schema))
        .collect();
    let shown = match schema {
        Some(s) => QualifiedName::new(s, name).to_string(),
        None => crate::sql::display_ident(name),
    };
    Ok(match candidates.len() {
        1 => Ok(candidates.into_iter().next().ok_or_else(String::new).unwrap_or_else(|_| unreachable!())),
        0 => Err(format!("there is no unfinished migration of {shown}; `ghostwire status` lists the migrations")),
        _ => {
            let names: Vec<String> = candidates.iter().map(|m| m.table.to_string()).collect();
            Err(format!(
                "{shown} is ambiguous: unfinished migrations exist for {}; qualify it with its schema",
                names.join(" and ")
            ))
        }
    })
}

pub async fn migration(client: &impl GenericClient, id: i64) -> Result<Option<Migration>, tokio_postgres::Error> {
    let sql = format!("SELECT {MIGRATION_COLUMNS} FROM ghostwire.migrations WHERE id = $1");
    Ok(client.query_opt(&sql, &[&id]).await?.as_ref().map(migration_from))
}

/// Migrations, newest first: the unfinished ones, then the last `recent` finished ones, of
/// `table` or of every table.
pub async fn list(
    client: &impl GenericClient,
    table: Option<&QualifiedName>,
    recent: i64,
) -> Result<Vec<Migration>, tokio_postgres::Error> {
    let sql = format!(
        "(SELECT {MIGRATION_COLUMNS} FROM ghostwire.migrations
           WHERE phase NOT IN ('finished', 'aborted') AND ($1::text IS NULL OR (table_schema = $1 AND table_name = $2)))
         UNION ALL
         (SELECT {MIGRATION_COLUMNS} FROM ghostwire.migrations
           WHERE phase IN ('finished', 'aborted') AND ($1::text IS NULL OR (table_schema = $1 AND table_name = $2))
           ORDER BY id DESC LIMIT $3)
         ORDER BY 1 DESC"
    );
    let (schema, name) = match table {
        Some(t) => (Some(t.schema.as_str()), Some(t.name.as_str())),
        None => (None, None),
    };
    Ok(client.query(&sql, &[&schema, &name, &recent]).await?.iter().map(migration_from).collect())
}

/// Records that `phase` starts, with an event.
pub async fn set_phase(
    client: &impl GenericClient,
    id: i64,
    phase: Phase,
    message: &str,
) -> Result<(), tokio_postgres::Error> {
    client.execute(SET_PHASE_SQL, &[&id, &phase.as_str(), &message]).await?;
    Ok(())
}

/// The phase moved and its event recorded, in one statement: `$1` id, `$2` phase, `$3` message.
const SET_PHASE_SQL: &str = "WITH moved AS (
       UPDATE ghostwire.migrations SET phase = $2, updated_at = now(), error = NULL,
              finished_at = CASE WHEN $2 IN ('finished', 'aborted') THEN now() END
        WHERE id = $1)
     INSERT INTO ghostwire.events (migration_id, phase, kind, message) VALUES ($1, $2, 'phase', $3)";

/// `set_phase`, prepared before a lock is asked for and run under it (the swap's and the
/// revert's): one round trip with nothing to parse while the table is held.
pub struct PhaseRecord(tokio_postgres::Statement);

impl PhaseRecord {
    pub async fn prepare(client: &tokio_postgres::Client) -> Result<PhaseRecord, tokio_postgres::Error> {
        Ok(PhaseRecord(client.prepare_typed(SET_PHASE_SQL, &[Type::INT8, Type::TEXT, Type::TEXT]).await?))
    }

    pub async fn run(
        &self,
        client: &tokio_postgres::Client,
        id: i64,
        phase: Phase,
        message: &str,
    ) -> Result<(), tokio_postgres::Error> {
        client.execute(&self.0, &[&id, &phase.as_str(), &message]).await?;
        Ok(())
    }
}

/// Appends to the migration's event log.
pub async fn event(
    client: &impl GenericClient,
    id: i64,
    phase: Phase,
    kind: &str,
    message: &str,
    duration_ms: Option<f64>,
    details: Option<Value>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO ghostwire.events (migration_id, phase, kind, message, duration_ms, details)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&id, &phase.as_str(), &kind, &message, &duration_ms, &details],
        )
        .await?;
    Ok(())
}

/// Marks the migration as being aborted (before its runner's sessions are ended), so a
/// runner that reconnects knows to stop. Tolerates a state schema from before version 3.
pub async fn request_abort(client: &impl GenericClient, id: i64) -> Result<(), tokio_postgres::Error> {
    let has_column: bool = client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute
                             WHERE attrelid = 'ghostwire.migrations'::regclass AND attname = 'abort_requested_at')",
            &[],
        )
        .await?
        .get(0);
    if !has_column {
        client
            .batch_execute(
                "SET lock_timeout = '2s'; ALTER TABLE ghostwire.migrations ADD COLUMN IF NOT EXISTS abort_requested_at \
                 timestamptz; RESET lock_timeout",
            )
            .await?;
    }
    client.execute("UPDATE ghostwire.migrations SET abort_requested_at = now() WHERE id = $1", &[&id]).await?;
    Ok(())
}

/// Whether `ghostwire abort` has asked for the migration to stop.
pub async fn abort_requested(client: &impl GenericClient, id: i64) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT abort_requested_at IS NOT NULL OR phase = 'aborted' FROM ghostwire.migrations WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(row.is_none_or(|r| r.get(0)))
}

/// Records why the run is throttled right now (`None`: it is not).
pub async fn set_throttled(
    client: &impl GenericClient,
    id: i64,
    reason: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    client.execute("UPDATE ghostwire.migrations SET throttled = $2 WHERE id = $1", &[&id, &reason]).await?;
    Ok(())
}

/// Records a failure: the error stays on the row, the phase is kept; a stopped run is not
/// throttled.
pub async fn set_error(
    client: &impl GenericClient,
    id: i64,
    phase: Phase,
    error: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE ghostwire.migrations SET error = $2, throttled = NULL, updated_at = now() WHERE id = $1",
            &[&id, &error],
        )
        .await?;
    event(client, id, phase, "error", error, None, None).await
}

/// Stores the shadow's spec (what resume, cut-over and abort need to know).
pub async fn set_spec(
    client: &impl GenericClient,
    id: i64,
    work: &str,
    archive: &str,
    spec: &Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE ghostwire.migrations SET work_schema = $2, archive_schema = $3, spec = $4, updated_at = now() WHERE id = $1",
            &[&id, &work, &archive, spec],
        )
        .await?;
    Ok(())
}

/// The last `limit` events of a migration, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at: String,
    pub phase: String,
    pub kind: String,
    pub message: String,
    pub duration_ms: Option<f64>,
}

pub async fn recent_events(
    client: &impl GenericClient,
    id: i64,
    limit: i64,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT * FROM (SELECT to_char(at, 'HH24:MI:SS.MS'), phase, kind, message, duration_ms, id
                              FROM ghostwire.events WHERE migration_id = $1 ORDER BY id DESC LIMIT $2) e
              ORDER BY id",
            &[&id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Event { at: r.get(0), phase: r.get(1), kind: r.get(2), message: r.get(3), duration_ms: r.get(4) })
        .collect())
}
