//! Phase `cutover`: one attempt at the swap, in one transaction.
//!
//! `LOCK … ACCESS EXCLUSIVE` under a short `lock_timeout`; drain the rest of the change log;
//! check the snapshot hazard; run the swap script; record the new phase in the same
//! transaction; commit. A lock not granted in time, or a session holding a snapshot that
//! could see the new table without the shadow's rows, rolls everything back: the original
//! stays as it was. Every query run under the lock is parsed before the lock is asked for.
//!
//! The snapshot hazard (DESIGN.md §2, `snapshots`): a REPEATABLE READ or SERIALIZABLE
//! snapshot taken before the last catch-up would see the new table without its last rows,
//! so the swap waits while a session may hold one. Statements queued behind the lock began
//! their transactions after the catch-up and are let through. What remains is the small
//! window of a transaction that takes its very first snapshot while the swap holds the lock
//! and then reads rows the in-lock drain changed; the proxy's drain gate closes it.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};

use super::capture::logical::Stream;
use super::catchup;
use super::retry::{RetryPolicy, is_lock_conflict};
use super::snapshots::{HazardCheck, HazardSession, Horizon};
use super::spec::Spec;
use super::swap::Script;
use crate::catalog::Grant;
use crate::sql::{ident, literal};
use crate::state::PhaseRecord;

/// How a successful swap went.
#[derive(Debug, Clone, Copy)]
pub struct Swapped {
    /// Waiting for the ACCESS EXCLUSIVE lock.
    pub lock_wait: Duration,
    /// From the lock being granted to the commit.
    pub lock_hold: Duration,
    /// Change-log entries applied under the lock.
    pub drained: i64,
}

#[derive(Debug)]
pub enum Outcome {
    Swapped(Swapped),
    /// The lock (on the table, or on a table a foreign key joins) was not granted in time.
    LockNotGranted {
        waited: Duration,
    },
    /// The logical capture's fence was not reached in time under the lock.
    FenceMissed {
        reason: String,
        lock_wait: Duration,
    },
    /// The table's columns are not those the migration was planned on.
    TableChanged(String),
    /// Sessions hold snapshots older than the shadow's last write.
    Hazard {
        sessions: Vec<HazardSession>,
        lock_wait: Duration,
    },
}

/// One attempt. `last` is the last catch-up before it. With logical
/// capture, `stream`'s fence is reached under the lock before the last changes are applied,
/// so every write committed before the lock is in the log.
pub async fn attempt(
    client: &Client,
    spec: &Spec,
    script: &Script,
    retry: &RetryPolicy,
    last: &Horizon,
    own: &[i32],
    stream: Option<&Stream>,
) -> Result<Outcome, tokio_postgres::Error> {
    let queries = Queries::prepare(client).await?;
    // The work session commits asynchronously; the swap must be durable when it returns.
    client
        .batch_execute(&format!(
            "BEGIN; {}; SELECT pg_catalog.set_config('synchronous_commit', 'on', true) \
             WHERE current_setting('synchronous_commit') = 'off'",
            retry.set_local()
        ))
        .await?;
    let asked = Instant::now();
    if let Err(e) = client.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", spec.original.sql())).await
    {
        client.batch_execute("ROLLBACK").await?;
        return if is_lock_conflict(&e) { Ok(Outcome::LockNotGranted { waited: asked.elapsed() }) } else { Err(e) };
    }
    let lock_wait = asked.elapsed();
    let granted = Instant::now();
    if let Some(stream) = stream
        && let Err(e) = stream.fence((retry.lock_timeout * 5).max(Duration::from_millis(500))).await
    {
        client.batch_execute("ROLLBACK").await?;
        return Ok(Outcome::FenceMissed { reason: e.to_string(), lock_wait });
    }
    if stream.is_some() {
        crate::failpoint::hit("cutover.fenced");
    }
    let result = swap(client, &queries, spec, script, last, own).await;
    match result {
        Ok(Ok(drained)) => {
            client.batch_execute("COMMIT").await?;
            crate::failpoint::hit("cutover.committed");
            Ok(Outcome::Swapped(Swapped { lock_wait, lock_hold: granted.elapsed(), drained }))
        }
        Ok(Err(Held::Hazard(sessions))) => {
            client.batch_execute("ROLLBACK").await?;
            Ok(Outcome::Hazard { sessions, lock_wait })
        }
        Ok(Err(Held::Changed(what))) => {
            client.batch_execute("ROLLBACK").await?;
            Ok(Outcome::TableChanged(what))
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            if is_lock_conflict(&e) { Ok(Outcome::LockNotGranted { waited: asked.elapsed() }) } else { Err(e) }
        }
    }
}

/// Why a swap under the lock did not go ahead.
enum Held {
    Hazard(Vec<HazardSession>),
    Changed(String),
}

/// The queries the swap runs under the lock, parsed before it asks for the lock: each is then
/// one round trip, with nothing to parse while the application waits.
struct Queries {
    definition: Statement,
    hazards: HazardCheck,
    identity: Statement,
    grants: Statement,
    constraints: Statement,
    phase: PhaseRecord,
}

impl Queries {
    async fn prepare(client: &Client) -> Result<Queries, tokio_postgres::Error> {
        Ok(Queries {
            definition: client.prepare(DEFINITION_SQL).await?,
            hazards: HazardCheck::prepare(client).await?,
            identity: client.prepare(super::swap::IDENTITY_SEQUENCES_SQL).await?,
            grants: client.prepare(GRANTS_SQL).await?,
            constraints: client.prepare(CONSTRAINTS_SQL).await?,
            phase: PhaseRecord::prepare(client).await?,
        })
    }
}

const DEFINITION_SQL: &str = "SELECT attname::text, atttypid, atttypmod, format_type(atttypid, atttypmod)
                                FROM pg_catalog.pg_attribute
                               WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum";

/// How the original's columns differ from what the migration was planned on, if they do
/// (DDL run on the table under the migration: the shadow would not carry it).
async fn definition_change(
    client: &Client,
    query: &Statement,
    spec: &Spec,
) -> Result<Option<String>, tokio_postgres::Error> {
    let rows = client.query(query, &[&spec.original_oid]).await?;
    let now: Vec<(String, u32, i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let planned: Vec<(String, u32, i32, String)> =
        spec.table.columns.iter().map(|c| (c.name.clone(), c.type_oid, c.typmod, c.type_name.clone())).collect();
    let same =
        now.len() == planned.len() && now.iter().zip(&planned).all(|(a, b)| (&a.0, a.1, a.2) == (&b.0, b.1, b.2));
    if same {
        return Ok(None);
    }
    let show = |cols: &[(String, u32, i32, String)]| {
        cols.iter().map(|(n, _, _, t)| format!("{} {t}", crate::sql::display_ident(n))).collect::<Vec<_>>().join(", ")
    };
    Ok(Some(format!("its columns were ({}) and are now ({})", show(&planned), show(&now))))
}

/// Everything under the lock. `Ok(Err(..))`: hazards found, or the table changed; nothing done.
async fn swap(
    client: &Client,
    queries: &Queries,
    spec: &Spec,
    script: &Script,
    last: &Horizon,
    own: &[i32],
) -> Result<Result<i64, Held>, tokio_postgres::Error> {
    if let Some(what) = definition_change(client, &queries.definition, spec).await? {
        return Ok(Err(Held::Changed(what)));
    }
    let drained = catchup::drain_in_transaction(client, spec).await?;
    crate::failpoint::hit("cutover.locked");
    let sessions = queries.hazards.run(client, last, own).await?;
    if !sessions.is_empty() {
        return Ok(Err(Held::Hazard(sessions)));
    }
    for section in [&script.before_move, &script.moves, &script.after_move] {
        for sql in section {
            client.batch_execute(sql).await?;
        }
    }
    identity_sequences(client, &queries.identity, spec).await?;
    reconcile_grants(client, &queries.grants, spec).await?;
    constraint_comments(client, &queries.constraints, spec).await?;
    for sql in &script.optional {
        client.batch_execute("SAVEPOINT ghostwire_optional").await?;
        match client.batch_execute(sql).await {
            Ok(()) => client.batch_execute("RELEASE SAVEPOINT ghostwire_optional").await?,
            Err(e) => {
                tracing::warn!("not carried over ({e}): {sql}");
                client.batch_execute("ROLLBACK TO SAVEPOINT ghostwire_optional").await?;
            }
        }
    }
    queries.phase.run(client, spec.migration_id, crate::state::Phase::Swapped, "tables swapped").await?;
    crate::failpoint::hit("cutover.before_commit");
    Ok(Ok(drained))
}

/// Identity columns continue where the old table's sequences were.
async fn identity_sequences(client: &Client, query: &Statement, spec: &Spec) -> Result<(), tokio_postgres::Error> {
    let new = spec.original.sql();
    let old = spec.archived().sql();
    let rows = client.query(query, &[&new, &old]).await?;
    for r in rows {
        if let (Some(new_seq), Some(old_seq)) = (r.get::<_, Option<String>>(0), r.get::<_, Option<String>>(1)) {
            // old_seq is PostgreSQL's own quoted name of the sequence.
            client
                .query_one(
                    &format!(
                        "SELECT setval({}::regclass, s.last_value, s.is_called) FROM {old_seq} s",
                        literal(&new_seq)
                    ),
                    &[],
                )
                .await?;
        }
    }
    Ok(())
}

fn grant_sql(privilege: &str, columns: Option<&str>, table: &str, grantee: &str, grantable: bool) -> String {
    let grantee = if grantee == "PUBLIC" { "PUBLIC".to_owned() } else { ident(grantee) };
    let cols = columns.map(|c| format!(" ({})", ident(c))).unwrap_or_default();
    let option = if grantable { " WITH GRANT OPTION" } else { "" };
    format!("GRANT {privilege}{cols} ON {table} TO {grantee}{option}")
}

const GRANTS_SQL: &str =
    "SELECT NULL::text, CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee)::text END,
            x.privilege_type, x.is_grantable
       FROM pg_catalog.pg_class c, aclexplode(c.relacl) x WHERE c.oid = $1::text::regclass
     UNION ALL
     SELECT a.attname::text, CASE WHEN x.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(x.grantee)::text END,
            x.privilege_type, x.is_grantable
       FROM pg_catalog.pg_attribute a, aclexplode(a.attacl) x
      WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped";

/// Makes the new table's grants (table and column) those of the original.
async fn reconcile_grants(client: &Client, query: &Statement, spec: &Spec) -> Result<(), tokio_postgres::Error> {
    let table = spec.original.sql();
    let current = client.query(query, &[&table]).await?;
    let current: Vec<(Option<String>, String, String, bool)> =
        current.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    let mut desired: Vec<(Option<String>, &Grant)> = spec.table.grants.iter().map(|g| (None, g)).collect();
    for c in spec.table.columns.iter().filter(|c| !spec.dropped_columns.contains(&c.name)) {
        desired.extend(c.grants.iter().map(|g| (Some(c.name.clone()), g)));
    }
    let has_table_acl = !spec.table.grants.is_empty();
    for (column, grantee, privilege, grantable) in &current {
        let wanted = desired.iter().any(|(c, g)| {
            c == column && &g.grantee == grantee && &g.privilege == privilege && g.grantable == *grantable
        });
        // Without an ACL of its own, the original gave the owner everything implicitly.
        let implicit_owner = column.is_none() && !has_table_acl && *grantee == spec.table.owner;
        if !wanted && !implicit_owner {
            let cols = column.as_deref().map(|c| format!(" ({})", ident(c))).unwrap_or_default();
            let who = if grantee == "PUBLIC" { "PUBLIC".to_owned() } else { ident(grantee) };
            client.batch_execute(&format!("REVOKE {privilege}{cols} ON {table} FROM {who} CASCADE")).await?;
        }
    }
    for (column, g) in &desired {
        let present = current
            .iter()
            .any(|(c, who, p, ga)| c == column && who == &g.grantee && p == &g.privilege && *ga == g.grantable);
        if !present {
            client.batch_execute(&grant_sql(&g.privilege, column.as_deref(), &table, &g.grantee, g.grantable)).await?;
        }
    }
    Ok(())
}

const CONSTRAINTS_SQL: &str = "SELECT conname::text FROM pg_catalog.pg_constraint WHERE conrelid = $1::text::regclass";

/// Comments on constraints the new table still has (those LIKE did not copy).
async fn constraint_comments(client: &Client, query: &Statement, spec: &Spec) -> Result<(), tokio_postgres::Error> {
    let table = spec.original.sql();
    let names: Vec<String> = client.query(query, &[&table]).await?.iter().map(|r| r.get(0)).collect();
    for c in spec.table.constraints.iter().filter(|c| c.comment.is_some() && names.contains(&c.name)) {
        if spec.foreign_keys.iter().any(|f| f.name == c.name) {
            continue; // commented when added
        }
        client
            .batch_execute(&format!(
                "COMMENT ON CONSTRAINT {} ON {table} IS {}",
                ident(&c.name),
                literal(c.comment.as_deref().unwrap_or_default())
            ))
            .await?;
    }
    Ok(())
}
