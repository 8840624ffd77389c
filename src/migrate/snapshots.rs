//! The snapshot hazard (DESIGN.md §2): which sessions may hold a snapshot taken before the
//! last write to the table a swap makes live.
//!
//! A REPEATABLE READ or SERIALIZABLE snapshot taken before that write, which first reads the
//! table after the swap, would see it without the write (the shadow nearly empty, or the
//! original without its last reverse changes). The isolation level of another session is
//! not visible from outside, so every snapshot that may be that old counts.
//!
//! Two facts bound it. A snapshot whose `backend_xmin` is newer than the write's transaction
//! was taken after that transaction ended. And a transaction that began after the write had
//! committed takes every snapshot after it. The second matters under load: a statement
//! queued behind the swap's lock has already taken a snapshot (parse analysis and Bind take
//! one before they lock the table), and while any write transaction older than the last
//! catch-up is still open anywhere in the cluster that snapshot's `backend_xmin` is older
//! too. Counting those, a busy application with prepared statements held off every attempt.
//! The one way a transaction gets an older snapshot than its start is importing one (`SET
//! TRANSACTION SNAPSHOT`). A client session's exported snapshot belongs to a transaction
//! that began before it, which counts itself; one exported by a replication connection
//! (`CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT`, which is not a client session) does not, so
//! while a replication connection that is not streaming holds an old `xmin`, the start of a
//! transaction proves nothing and only `backend_xmin` counts.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

/// The last write before an attempt: sessions whose snapshots are all newer may stay.
#[derive(Debug, Clone)]
pub struct Horizon {
    /// Its transaction (`txid_current()`, epoch-extended).
    pub xid: i64,
    /// The server's clock after it committed (`timestamptz` as text, exact).
    pub committed_by: String,
}

impl Horizon {
    /// The horizon of `xid`, which has committed: the server's clock read now.
    pub async fn after(client: &Client, xid: i64) -> Result<Horizon, tokio_postgres::Error> {
        let at: String = client.query_one("SELECT pg_catalog.clock_timestamp()::text", &[]).await?.get(0);
        Ok(Horizon { xid, committed_by: at })
    }

    /// A new transaction on `client`, after the last write: its id and the clock together.
    pub async fn now(client: &Client) -> Result<Horizon, tokio_postgres::Error> {
        let row = client.query_one("SELECT txid_current(), pg_catalog.clock_timestamp()::text", &[]).await?;
        Ok(Horizon { xid: row.get(0), committed_by: row.get(1) })
    }
}

/// A session that may hold a snapshot older than the last write.
#[derive(Debug, Clone, Serialize)]
pub struct HazardSession {
    pub pid: i32,
    pub user: String,
    pub state: String,
    pub transaction_seconds: f64,
    pub query: String,
}

/// The condition on a row `a` of `pg_stat_get_activity(NULL)`: `$1` the horizon's xid, `$2`
/// its time. The functions under `pg_stat_activity` and `pg_stat_replication`, not the
/// views: the check runs under the swap's lock, and parsing and planning the views (their
/// joins to the role and database catalogs) took several times as long as reading the
/// sessions (6 ms of an 18 ms lock hold in `benches/cutover.rs`, against 0.7 ms).
const MAY_PREDATE: &str = "a.backend_xmin IS NOT NULL
    AND age(a.backend_xmin) >= age((($1::bigint % 4294967296))::text::xid)
    AND (coalesce(a.xact_start <= $2::text::timestamptz, true)
         OR EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_activity(NULL) w
                      LEFT JOIN pg_catalog.pg_stat_get_wal_senders() r ON r.pid = w.pid
                     WHERE w.backend_type = 'walsender' AND w.backend_xmin IS NOT NULL
                       AND age(w.backend_xmin) >= age((($1::bigint % 4294967296))::text::xid)
                       AND coalesce(r.state, 'startup') NOT IN ('streaming', 'catchup')))";

/// The hazard check, prepared before the swap asks for its lock: under the lock it is one
/// round trip, with nothing left to parse.
pub struct HazardCheck(Statement);

impl HazardCheck {
    pub async fn prepare(client: &Client) -> Result<HazardCheck, tokio_postgres::Error> {
        let sql = format!(
            "SELECT a.pid, coalesce(pg_catalog.pg_get_userbyid(a.usesysid)::text, ''), coalesce(a.state, ''),
                    coalesce(extract(epoch FROM clock_timestamp() - a.xact_start), 0)::float8,
                    coalesce(left(a.query, 120), '')
               FROM pg_catalog.pg_stat_get_activity(NULL) a
              WHERE a.datid = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
                AND a.pid <> pg_backend_pid() AND NOT (a.pid = ANY($3))
                AND a.backend_type = 'client backend' AND {MAY_PREDATE}
              ORDER BY a.xact_start"
        );
        let types = [Type::INT8, Type::TEXT, Type::INT4_ARRAY];
        Ok(HazardCheck(client.prepare_typed(&sql, &types).await?))
    }

    /// Client sessions (other than `own`) whose snapshot may predate `horizon`.
    pub async fn run(
        &self,
        client: &Client,
        horizon: &Horizon,
        own: &[i32],
    ) -> Result<Vec<HazardSession>, tokio_postgres::Error> {
        let rows = client.query(&self.0, &[&horizon.xid, &horizon.committed_by, &own]).await?;
        Ok(rows
            .iter()
            .map(|r| HazardSession {
                pid: r.get(0),
                user: r.get(1),
                state: r.get(2),
                transaction_seconds: r.get(3),
                query: r.get(4),
            })
            .collect())
    }
}

/// Waits until none of `pids` may hold a snapshot older than `horizon`, up to `limit`.
pub async fn wait_for(
    client: &Client,
    pids: &[i32],
    horizon: &Horizon,
    limit: Duration,
) -> Result<bool, tokio_postgres::Error> {
    let deadline = Instant::now() + limit;
    let sql =
        format!("SELECT count(*) FROM pg_catalog.pg_stat_get_activity(NULL) a WHERE a.pid = ANY($3) AND {MAY_PREDATE}");
    loop {
        let row = client.query_one(&sql, &[&horizon.xid, &horizon.committed_by, &pids]).await?;
        if row.get::<_, i64>(0) == 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
