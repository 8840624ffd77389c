//! The snapshot-hazard check of the swap: which sessions it waits for, and that statements
//! queued behind the swap's lock do not hold it off while an older write transaction is
//! open somewhere (a busy application with prepared statements).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{TestDb, config, items, run_migration, strings, test_options, wait_for};
use ghostwire::migrate::snapshots::{self, Horizon};
use ghostwire::replication::ReplicationClient;
use tokio_postgres::Client;

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0)
}

async fn flagged(db: &TestDb, horizon: &Horizon) -> Vec<i32> {
    let check = snapshots::HazardCheck::prepare(&db.client).await.unwrap();
    let mut pids: Vec<i32> = check.run(&db.client, horizon, &[]).await.unwrap().iter().map(|s| s.pid).collect();
    pids.sort();
    pids
}

#[tokio::test]
async fn a_transaction_begun_after_the_last_write_is_no_hazard_unless_an_exported_snapshot_is_older() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE elsewhere (id int)").await;
    // A snapshot exported by a replication connection, which a transaction that begins
    // later can import (made first: a logical slot waits for the open transactions).
    let mut replication = ReplicationClient::connect(&config(&db.url)).await.unwrap();
    replication
        .simple_query("CREATE_REPLICATION_SLOT hazard_probe TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT")
        .await
        .unwrap();
    // An open write transaction older than the last write: every later snapshot's xmin is
    // older than the last write too.
    let writer = db.connect().await;
    writer.batch_execute("BEGIN; INSERT INTO elsewhere VALUES (1)").await.unwrap();
    // A REPEATABLE READ snapshot taken before the last write: the real hazard.
    let old_reader = db.connect().await;
    old_reader.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM elsewhere").await.unwrap();
    let old_pid = pid(&old_reader).await;
    // A read-committed transaction begun before it, between statements: no snapshot held.
    let idle = db.connect().await;
    idle.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let horizon = Horizon::now(&db.client).await.unwrap();

    // A statement begun after it, holding a snapshot while it runs (as a statement queued
    // behind the swap's lock does): its xmin is the old writer's.
    let late = db.connect().await;
    let late_pid = pid(&late).await;
    let sleeper = tokio::spawn(async move {
        let _ = late.batch_execute("SELECT pg_sleep(60)").await;
    });
    let holds = format!(
        "SELECT coalesce((SELECT backend_xmin IS NOT NULL AND state = 'active' FROM pg_stat_activity WHERE pid = {late_pid}), false)"
    );
    wait_for(&db.client, &holds).await;
    let older: bool = db
        .client
        .query_one(
            &format!(
                "SELECT age(backend_xmin) >= age((($1::bigint % 4294967296))::text::xid) FROM pg_stat_activity WHERE pid = {late_pid}"
            ),
            &[&horizon.xid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(older, "the late statement's xmin is older than the horizon (the case under test)");
    let mut both = vec![old_pid, late_pid];
    both.sort();
    assert_eq!(flagged(&db, &horizon).await, both, "while the exported snapshot exists every old xmin counts");
    // The exported snapshot goes with the replication connection's next command.
    replication.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    assert_eq!(flagged(&db, &horizon).await, vec![old_pid], "only the old snapshot counts");

    // Waiting: the old reader's pid clears when its transaction ends.
    assert!(!snapshots::wait_for(&db.client, &[old_pid], &horizon, Duration::from_millis(200)).await.unwrap());
    old_reader.batch_execute("COMMIT; SELECT 1").await.unwrap();
    assert!(snapshots::wait_for(&db.client, &[old_pid], &horizon, Duration::from_secs(5)).await.unwrap());

    db.client.execute("SELECT pg_cancel_backend($1)", &[&late_pid]).await.unwrap();
    let _ = sleeper.await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    idle.batch_execute("ROLLBACK").await.unwrap();
    drop(replication);
}

#[tokio::test]
async fn prepared_statements_queued_behind_the_swap_do_not_hold_it_off_beside_an_old_writer() {
    let db = TestDb::new().await;
    items::create(&db.client, 2000).await;
    db.exec("CREATE TABLE elsewhere (id int)").await;
    // A write transaction open from before the migration to after it: every snapshot taken
    // meanwhile has an xmin older than any catch-up.
    let writer = db.connect().await;
    writer.batch_execute("BEGIN; INSERT INTO elsewhere VALUES (1)").await.unwrap();
    // Readers with a prepared statement in a tight loop: each Bind queued behind the swap's
    // lock holds a snapshot while it waits.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for n in 0..4i64 {
        let (c, stop, reads) = (db.connect().await, Arc::clone(&stop), Arc::clone(&reads));
        readers.push(tokio::spawn(async move {
            let stmt = c.prepare("SELECT note FROM items WHERE id = $1").await.unwrap();
            let mut id = n;
            while !stop.load(Ordering::Relaxed) {
                id = id % 2000 + 1;
                if c.query(&stmt, &[&id]).await.is_ok() {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let outcome = run_migration(&db.url, items::RETYPE, &test_options(), None).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let outcome = outcome.expect("the swap goes ahead under the readers");
    assert!(outcome.swap.is_some());
    assert!(reads.load(Ordering::Relaxed) > 100, "the readers ran");
    let hazards = strings(
        &db.client,
        "SELECT details::text FROM ghostwire.events WHERE kind = 'cutover_attempt' AND details->>'outcome' = 'snapshot_hazard'",
    )
    .await;
    assert!(hazards.is_empty(), "queued statements counted as old snapshots: {hazards:?}");
    writer.batch_execute("ROLLBACK").await.unwrap();
    items::assert_matches_oracle(&db.client).await;
}
