//! Logical capture survives crashes: the ghostwire process is killed (SIGKILL, through
//! failpoints) after a change was received but before its log row committed, after the log
//! commit but before the confirm, and under the cut-over's lock once the fence was reached;
//! `status` shows the slot it left with the WAL it retains, `resume` finishes the job (the
//! oracle check, with writers running throughout), `abort` removes the slot and the
//! publication.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::items::{RETYPE, ROWS, assert_matches_oracle, assert_swapped_then_finish, ghostwire};
use common::workload::{Shape, Workload};
use common::{TestDb, debris, strings};

const BEFORE_THE_SWAP: [&str; 5] = ["capture", "copy", "index", "verify", "catchup"];

/// Slots of the test's database and its publications.
async fn replication_debris(client: &tokio_postgres::Client) -> Vec<String> {
    strings(
        client,
        "SELECT 'slot ' || slot_name FROM pg_replication_slots
          WHERE slot_name LIKE 'ghostwire\\_' || (SELECT oid FROM pg_database WHERE datname = current_database()) || '\\_%'
         UNION ALL SELECT 'publication ' || pubname FROM pg_publication",
    )
    .await
}

/// Migrates with logical capture until the failpoint `point` kills the process; returns
/// the phase it left and the writers, still running.
async fn killed_at(db: &TestDb, point: &str) -> (String, Workload) {
    common::items::create(&db.client, ROWS).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 41);
    load.wait_for_more(20).await;
    let args = ["migrate", "--capture", "logical", "--jobs", "2", "--chunk-rows", "200", "--chunk-time", "5ms", RETYPE];
    let out = ghostwire(&db.url, &args, Some(point)).await;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{point}: not killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let phase = strings(&db.client, "SELECT phase FROM ghostwire.migrations").await.remove(0);
    eprintln!("{point}: killed in phase {phase}");
    // The slot stays, not streamed, and `status` says so with the WAL it keeps.
    let out = ghostwire(&db.url, &["status", "items"], None).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("replication slot ghostwire_") && said.contains("of WAL") && said.contains("resume"),
        "{said}"
    );
    (phase, load)
}

async fn resumed(db: &TestDb, load: Workload) {
    load.wait_for_more(20).await; // writes while nothing runs: the slot keeps them
    let out = ghostwire(&db.url, &["resume", "items"], None).await;
    assert!(
        out.status.success(),
        "resume: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    load.wait_for_more(20).await;
    load.stop().await;
    assert_matches_oracle(&db.client).await;
    assert!(replication_debris(&db.client).await.is_empty(), "{:?}", replication_debris(&db.client).await);
    assert_swapped_then_finish(&db.url, &db.client).await;
}

#[tokio::test]
async fn killed_after_a_change_was_received_before_its_log_row() {
    let db = TestDb::new().await;
    // Well into the copy, so that writes while nothing runs hit rows already copied.
    let (phase, load) = killed_at(&db, "logical.received:100").await;
    assert!(BEFORE_THE_SWAP.contains(&phase.as_str()), "{phase}");
    resumed(&db, load).await;
}

#[tokio::test]
async fn killed_after_the_log_commit_before_the_confirm() {
    let db = TestDb::new().await;
    let (phase, load) = killed_at(&db, "logical.logged:6").await;
    assert!(BEFORE_THE_SWAP.contains(&phase.as_str()), "{phase}");
    resumed(&db, load).await;
}

#[tokio::test]
async fn killed_under_the_swap_lock_once_the_fence_was_reached() {
    let db = TestDb::new().await;
    let (phase, load) = killed_at(&db, "cutover.fenced").await;
    assert_eq!(phase, "cutover");
    resumed(&db, load).await;
}

#[tokio::test]
async fn abort_after_a_crash_removes_the_slot_and_the_publication() {
    let db = TestDb::new().await;
    let (_, load) = killed_at(&db, "logical.logged:2").await;
    assert_eq!(replication_debris(&db.client).await.len(), 2);
    let out = ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    load.stop().await;
    assert!(replication_debris(&db.client).await.is_empty(), "{:?}", replication_debris(&db.client).await);
    assert!(debris(&db.client, 1).await.is_empty(), "{:?}", debris(&db.client, 1).await);
    assert_same_rows_as_before(&db.client).await;
}

/// Aborted: the table is as it was (its type unchanged) and holds what the writers wrote.
async fn assert_same_rows_as_before(client: &tokio_postgres::Client) {
    let t = strings(client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'").await;
    assert_eq!(t, ["integer"]);
    common::assert_same_rows(client, "SELECT * FROM items", "SELECT * FROM oracle").await;
}

/// `ghostwire migrate --capture logical` with its copy held (a throttle query that is
/// always true), as a child process.
async fn held_run(url: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["migrate", "--yes", "--capture", "logical", "--throttle-query", "SELECT true", RETYPE])
        .env("DATABASE_URL", url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ghostwire migrate")
}

#[tokio::test]
async fn an_idle_table_pins_no_wal() {
    let db = TestDb::new().await;
    common::items::create(&db.client, ROWS).await;
    let mut run = held_run(&db.url).await;
    common::wait_for(
        &db.client,
        "SELECT EXISTS (SELECT FROM ghostwire.migrations WHERE phase = 'copy' AND throttled IS NOT NULL)",
    )
    .await;
    // WAL written elsewhere, nothing on the table: the slot lets go of it anyway.
    db.exec("CREATE TABLE elsewhere AS SELECT g, md5(g::text) AS m FROM generate_series(1, 100000) g").await;
    let lsn = strings(&db.client, "SELECT pg_current_wal_lsn()::text").await.remove(0);
    let started = std::time::Instant::now();
    let confirmed = format!(
        "SELECT coalesce(bool_and(confirmed_flush_lsn >= '{lsn}'), false) FROM pg_replication_slots
          WHERE database = current_database()"
    );
    while !strings(&db.client, &format!("SELECT ({confirmed})::text")).await.contains(&"true".to_owned()) {
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "the slot still holds the WAL up to {lsn}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    run.kill().await.unwrap();
    let out = ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(replication_debris(&db.client).await.is_empty());
}

#[tokio::test]
async fn a_slot_the_server_invalidated_is_not_resumed() {
    let options = ghostwire::ephemeral::ClusterOptions::default().with_setting("max_slot_wal_keep_size", "'1MB'");
    let cluster =
        tokio::task::spawn_blocking(move || ghostwire::ephemeral::Cluster::start(options)).await.unwrap().unwrap();
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    common::items::create(&client, ROWS).await;
    let mut run = held_run(&url).await;
    common::wait_for(
        &client,
        "SELECT EXISTS (SELECT FROM ghostwire.migrations WHERE phase = 'copy' AND throttled IS NOT NULL)",
    )
    .await;
    run.kill().await.unwrap();
    run.wait().await.unwrap();
    // Far more WAL than the slot may keep, then a checkpoint: the server gives up on it.
    client
        .batch_execute("CREATE TABLE big AS SELECT g, md5(g::text) AS m FROM generate_series(1, 600000) g")
        .await
        .unwrap();
    client.batch_execute("CHECKPOINT").await.unwrap();
    common::wait_for(&client, "SELECT EXISTS (SELECT FROM pg_replication_slots WHERE wal_status = 'lost')").await;
    let out = ghostwire(&url, &["status", "items"], None).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("wal_status lost"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = ghostwire(&url, &["resume", "items"], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("invalidated replication slot") && said.contains("ghostwire abort"), "{said}");
    let out = ghostwire(&url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(strings(&client, "SELECT slot_name FROM pg_replication_slots").await.is_empty());
}
