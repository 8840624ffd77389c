//! Logical capture (`--capture logical`): the table's changes read from the WAL through a
//! replication slot and pgoutput, their keys written to the change log by a task of the
//! run. The application's writes carry no extra work.
//!
//! Install: a publication for the table alone (`replication::slot::publication_sql`), the
//! slot, then a wait for every transaction that held a write lock on the table when the
//! slot was made. The slot streams each transaction that commits after its consistent
//! point; one whose commit record is just before it may still be running as far as
//! snapshots go (a commit is written to the WAL before the transaction leaves the process
//! array), so the first copy chunk's snapshot would not see it either. Such a transaction
//! still holds its locks (they are released after it leaves the process array): waiting
//! for the lockers of that moment closes the gap (DESIGN.md §4).
//!
//! The stream task: every committed transaction's changes of the table become log rows
//! (old and new key on a key update, a marker on TRUNCATE), written in batches once the
//! transactions are visible to other sessions (a commit is streamed a moment before it is:
//! `visible`, the same gap as at the install, met at every change); an LSN is
//! confirmed to the server only after the log rows up to it are committed; keepalives that
//! ask for it are answered; while no transaction is pending the server's WAL end is
//! confirmed, so an idle table pins no WAL. A Relation message showing the table's name or
//! key changed stops the run. A fence (a logical message written in its own committed
//! transaction) asked for while the cut-over holds the lock is reached after every
//! transaction that committed before the lock: the log then holds all of them.
//!
//! Why the wait after the slot closes the gap (the argument DESIGN.md §4 asks for): take a
//! transaction T that wrote the table and is not streamed, so its commit record is before
//! the consistent point C. The first copy chunk's snapshot S is taken after the slot was
//! made, so after C. If S sees T, the copy has T's rows. If it does not, T was still in the
//! process array when S was taken, hence when the slot was made, and it still held its
//! locks then, its RowExclusiveLock on the table among them: the wait for the lockers of
//! that moment outlasts T, and S, taken after the wait, sees it. So every transaction that
//! wrote the table is streamed or copied (or both: applying a key twice is harmless).
//! Waiting on the table's lockers, not on the oldest xmin, keeps an unrelated long
//! transaction from holding the migration up.
//!
//! Why the change log is UNLOGGED here (and only here): its rows would go to the WAL, and
//! the walsender decodes every WAL record of the database, ours included, before pgoutput
//! discards them as not published; at full write speed that doubled the walsender's work
//! and kept logical capture at 0.81x of the throughput without capture (0.92x without it,
//! `cargo bench --bench capture`). The price is that a crash of the server empties the log
//! while the slot has been confirmed past its rows. A one-row UNLOGGED table beside it
//! (`intact_table`), emptied by the same crash, tells: every stream connection and every
//! resume checks it, and a run that finds it empty drops the shadow and copies again, the
//! slot and the publication staying (`capturing::copy_over_if_log_lost`). A clean restart
//! keeps both. With triggers the log is the only record of a write and stays logged.
//!
//! Why the fence is its own transaction: the swap's transaction is decoded only when it
//! commits, too late; a message in a committed transaction on another session is decoded in
//! commit order, after every transaction that committed before it, and every transaction
//! that wrote the table committed before the swap's lock was granted.

mod decode;
mod stream;
mod visible;

use std::time::{Duration, Instant};

use thiserror::Error;
use tokio_postgres::Client;

use crate::connect::{self, Params};
use crate::migrate::retry::{self, RetryPolicy};
use crate::migrate::spec::Spec;
use crate::replication::{ReplicationClient, ReplicationError, slot};
use crate::sql::ident;

pub use stream::{Progress, Stream};

#[derive(Debug, Error)]
pub enum LogicalError {
    #[error("{0}")]
    Replication(#[from] ReplicationError),
    #[error("{}", connect::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Connect(#[from] connect::ConnectError),
    #[error(
        "the table's definition changed under the migration ({0}); the original is untouched: `ghostwire abort` removes the run, then start it again"
    )]
    TableChanged(String),
    #[error(
        "the server invalidated replication slot {0} (wal_status lost: it retained more WAL than max_slot_wal_keep_size allows), so changes were lost to it; `ghostwire abort` removes the run, then start it again (with a higher max_slot_wal_keep_size, or --capture trigger)"
    )]
    SlotLost(String),
    #[error("{0}")]
    Stream(String),
    #[error(
        "PostgreSQL restarted after a crash, which empties the change log (UNLOGGED with logical capture): the keys it \
         held are lost to it, so the copy starts over (the slot still has every change since)"
    )]
    LogLost,
    #[error("the fence was not reached within {0:?}")]
    FenceTimeout(Duration),
}

/// Creates what logical capture needs (each step idempotent, for a resumed run), then waits
/// for the writers in flight.
pub async fn install(control: &Client, session: &Params, spec: &Spec, retry: &RetryPolicy) -> Result<(), LogicalError> {
    let names = slot::Names::of(control, spec.migration_id).await?;
    let intact = intact_table(spec.migration_id).sql();
    let sql = format!(
        "{};
         CREATE UNLOGGED TABLE IF NOT EXISTS {intact} (since timestamptz NOT NULL DEFAULT now());
         INSERT INTO {intact} SELECT WHERE NOT EXISTS (SELECT FROM {intact})",
        super::log_table_sql(spec, super::Mode::Logical)
    );
    retry::in_transaction(control, &sql).await?;
    if !slot::publication_exists(control, &names).await? {
        let sql = slot::publication_sql(&names, &spec.table);
        retry::ddl(control, retry, "creating the publication", &sql).await?;
    }
    if slot::state(control, &names).await?.is_none() {
        let mut repl = ReplicationClient::connect(session).await?;
        let at = slot::create(&mut repl, &names).await?;
        tracing::info!("replication slot {} consistent at {}", names.slot, ghostwire_proto::format_lsn(at));
    }
    wait_for_writers(control, spec).await?;
    Ok(())
}

/// Waits until every transaction that holds a write lock on the table (or a partition of
/// it) now has ended.
async fn wait_for_writers(control: &Client, spec: &Spec) -> Result<(), LogicalError> {
    let rows = control
        .query(
            "SELECT DISTINCT l.virtualtransaction FROM pg_catalog.pg_locks l
              WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
                AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
                AND l.relation IN (SELECT relid FROM pg_catalog.pg_partition_tree($1::oid))",
            &[&spec.original_oid],
        )
        .await?;
    let vxids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let started = Instant::now();
    let mut said = false;
    loop {
        let left: i64 = control
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'virtualxid' AND virtualxid = ANY($1)",
                &[&vxids],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        if !said && started.elapsed() > Duration::from_secs(5) {
            tracing::warn!("waiting for {left} transaction(s) that were writing to the table when the slot was made");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The one-row UNLOGGED table beside the change log of migration `id` whose row a crash of
/// the server removes, as it empties the log.
pub fn intact_table(id: i64) -> crate::sql::QualifiedName {
    crate::sql::QualifiedName::new("ghostwire", format!("changes_{id}_intact"))
}

/// Whether the change log of migration `id` still holds everything written to it: false
/// once a crash of the server (which empties UNLOGGED tables) took its rows, whose changes
/// the slot, confirmed past them, will not send again. A log made before this existed (an
/// ordinary table, without the marker) is intact.
pub async fn log_intact(client: &Client, id: i64) -> Result<bool, tokio_postgres::Error> {
    let intact = intact_table(id).sql();
    let there: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&intact]).await?.get(0);
    if !there {
        return Ok(true);
    }
    Ok(client.query_one(&format!("SELECT EXISTS (SELECT FROM {intact})"), &[]).await?.get(0))
}

/// Drops the slot and the publication of migration `id` (abort, finish, after the swap).
pub async fn remove(client: &Client, id: i64) -> Result<(), tokio_postgres::Error> {
    slot::remove(client, &slot::Names::of(client, id).await?).await
}

/// Whether the slot of migration `id` is there and usable.
pub async fn check_slot(client: &Client, id: i64) -> Result<(), LogicalError> {
    let names = slot::Names::of(client, id).await?;
    match slot::state(client, &names).await? {
        Some(s) if s.wal_status.as_deref() == Some("lost") => Err(LogicalError::SlotLost(names.slot)),
        Some(_) => Ok(()),
        None => Err(LogicalError::Stream(format!(
            "replication slot {} is gone, so changes since it was dropped were not recorded; `ghostwire abort` \
             removes the run",
            ident(&names.slot)
        ))),
    }
}
