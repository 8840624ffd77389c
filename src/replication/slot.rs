//! The replication slot and publication of a migration in logical capture mode: whether
//! the server, the role and the table allow them, creating them, their state (the WAL a
//! slot retains) and removing them. Both are named `ghostwire_<id>`.

use tokio_postgres::Client;

use super::{ReplicationClient, ReplicationError};
use crate::catalog::{KeyKind, ReplicaIdentity, TableDef, TableKind};
use crate::sql::{display_ident, ident, literal};

/// What migration `id` names its publication (`ghostwire_<id>`, in its database) and its
/// slot (`ghostwire_<database oid>_<id>`: slots are the cluster's, and each database counts
/// its migrations from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub publication: String,
    pub slot: String,
}

impl Names {
    pub async fn of(client: &Client, id: i64) -> Result<Names, tokio_postgres::Error> {
        let row =
            client.query_one("SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()", &[]).await?;
        let db: u32 = row.get(0);
        Ok(Names { publication: format!("ghostwire_{id}"), slot: format!("ghostwire_{db}_{id}") })
    }
}

/// Why logical capture cannot run for `def` on this server as this role: each reason with
/// its fix. Empty when it can.
pub async fn refusals(client: &Client, def: &TableDef) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut why = Vec::new();
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    (SELECT rolsuper OR rolreplication FROM pg_catalog.pg_roles WHERE rolname = current_user),
                    EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = 'rds_replication'
                             AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')),
                    current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int
                      - (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'walsender')::int",
            &[],
        )
        .await?;
    let (wal_level, replication, rds, free_slots, free_senders): (String, Option<bool>, bool, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if wal_level != "logical" {
        why.push(format!(
            "wal_level is {wal_level}, not logical: set `wal_level = logical` and restart the server (or use --capture \
             trigger)"
        ));
    }
    if !replication.unwrap_or(false) && !rds {
        why.push(
            "the role has no REPLICATION attribute: `ALTER ROLE … REPLICATION` (on RDS and Aurora: `GRANT \
             rds_replication TO …`), or use --capture trigger"
                .into(),
        );
    }
    if free_slots < 1 {
        why.push("no free replication slot: raise max_replication_slots (a restart), or drop an unused slot".into());
    }
    if free_senders < 1 {
        why.push("no free WAL sender: raise max_wal_senders (a restart), or end another replication connection".into());
    }
    if let Some(reason) = identity_refusal(def) {
        why.push(reason);
    }
    Ok(why)
}

/// Why the table's replica identity would not give its key, if it would not. Publishing
/// such a table makes the application's UPDATEs and DELETEs on it fail, so it never is.
pub fn identity_refusal(def: &TableDef) -> Option<String> {
    let key = def.key.as_ref()?;
    let table = def.name.to_string();
    let fix = format!(
        "run `ALTER TABLE {table} REPLICA IDENTITY USING INDEX {}` (a catalog change) first, or use --capture trigger",
        display_ident(&key.index_name)
    );
    match &def.replica_identity {
        ReplicaIdentity::Full => None,
        ReplicaIdentity::Default if key.kind == KeyKind::PrimaryKey => None,
        ReplicaIdentity::Index(index) if *index == key.index_name => None,
        ReplicaIdentity::Nothing => Some(format!(
            "{table} has REPLICA IDENTITY NOTHING: in a publication its UPDATEs and DELETEs would fail, and the \
             changes would not name their rows; {fix}"
        )),
        ReplicaIdentity::Default => Some(format!(
            "{table} has no primary key and REPLICA IDENTITY DEFAULT: in a publication its UPDATEs and DELETEs would \
             fail; {fix}"
        )),
        ReplicaIdentity::Index(index) => Some(format!(
            "{table}'s replica identity is index {}, not the key ghostwire copies by ({}): a change of the key would \
             not be seen; {fix}",
            display_ident(index),
            display_ident(&key.index_name)
        )),
    }
}

/// `CREATE PUBLICATION` for the table alone: its key columns only where a column list is
/// allowed (PostgreSQL 15+, and not with REPLICA IDENTITY FULL, whose list must name every
/// column); changes of a partitioned table's partitions published as the table's own.
pub fn publication_sql(names: &Names, def: &TableDef) -> String {
    let mut target = def.name.sql();
    if let Some(key) = &def.key
        && def.server_version_num >= 150_000
        && def.replica_identity != ReplicaIdentity::Full
    {
        let cols: Vec<String> = key.columns.iter().map(|c| ident(c)).collect();
        target.push_str(&format!(" ({})", cols.join(", ")));
    }
    let with = if def.kind == TableKind::Partitioned { " WITH (publish_via_partition_root = true)" } else { "" };
    format!("CREATE PUBLICATION {} FOR TABLE {target}{with}", ident(&names.publication))
}

/// Whether the publication exists.
pub async fn publication_exists(client: &Client, names: &Names) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT count(*) FROM pg_catalog.pg_publication WHERE pubname = $1", &[&names.publication])
        .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// The slot as the server sees it.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// WAL the slot keeps from being removed (from its restart LSN to the current position).
    pub retained_bytes: i64,
    /// How far the changes are confirmed, and how long ago that was (from the time of the
    /// last confirmed transaction, when the server reports it).
    pub confirmed_flush: Option<String>,
    /// `reserved`, `extended`, `unreserved`, `lost` (NULL on a slot never used).
    pub wal_status: Option<String>,
    pub active_pid: Option<i32>,
    /// Seconds since the streaming client last reported its position (while streamed).
    pub reply_age_seconds: Option<f64>,
}

/// The slot, if it exists.
pub async fn state(client: &Client, names: &Names) -> Result<Option<SlotState>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT coalesce(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.restart_lsn), 0)::int8,
                    s.confirmed_flush_lsn::text, s.wal_status, s.active_pid,
                    extract(epoch FROM clock_timestamp() - r.reply_time)::float8
               FROM pg_catalog.pg_replication_slots s
               LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_name = $1",
            &[&names.slot],
        )
        .await?;
    Ok(row.map(|r| SlotState {
        retained_bytes: r.get(0),
        confirmed_flush: r.get(1),
        wal_status: r.get(2),
        active_pid: r.get(3),
        reply_age_seconds: r.get(4),
    }))
}

/// Creates the slot (pgoutput, no snapshot exported); returns its consistent point: every
/// transaction that commits after it is streamed.
pub async fn create(repl: &mut ReplicationClient, names: &Names) -> Result<u64, ReplicationError> {
    let rows = repl
        .simple_query(&format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT", ident(&names.slot)))
        .await?;
    rows.first()
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|lsn| ghostwire_proto::parse_lsn(&lsn))
        .ok_or_else(|| ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into()))
}

/// Drops the slot and the publication, whichever exist. A slot still in use by a
/// walsender of a run that is gone is freed first (its session is ended).
pub async fn remove(client: &Client, names: &Names) -> Result<(), tokio_postgres::Error> {
    let slot = &names.slot;
    for attempt in 0..50 {
        let Some(s) = state(client, names).await? else { break };
        match s.active_pid {
            None => {
                match client.execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[slot]).await {
                    Ok(_) => break,
                    // Taken again in between (code 55006, object in use): look again.
                    Err(e) if e.code().map(|c| c.code()) == Some("55006") && attempt < 49 => {}
                    Err(e) if e.code().map(|c| c.code()) == Some("42704") => break,
                    Err(e) => return Err(e),
                }
            }
            Some(pid) if attempt >= 10 => {
                tracing::info!("ending session {pid}, which still streams from slot {slot}");
                client.execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid]).await?;
            }
            Some(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", ident(&names.publication))).await
}

/// `pg_logical_emit_message` of a fence `token` in its own transaction, committed (and so
/// flushed) before this returns: the stream reaches it after every transaction that
/// committed before it.
pub async fn emit_fence(client: &Client, token: &str) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!("SELECT pg_catalog.pg_logical_emit_message(true, 'ghostwire', {})", literal(token)))
        .await
}
