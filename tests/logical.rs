//! `ghostwire migrate --capture logical`: the change log filled from a replication slot
//! (pgoutput, through ghostwire's own replication client) instead of triggers. The same
//! oracle as trigger capture: concurrent writers with inserts, updates, deletes, key
//! updates, NULLs and TOASTed values, in every phase, each mirrored into an oracle table in
//! the same transaction; the swapped table must equal the oracle row for row.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::items::ghostwire;
use common::workload::{Shape, Workload};
use common::{TestDb, assert_same_rows, debris, migrate_under_load, run_migration, strings, test_options};
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use ghostwire::migrate::capture::Choice;
use ghostwire::migrate::{Options, PhaseHook};
use ghostwire::state::Phase;

const LONG: &str = "(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 300) i)";
const ROWS: i64 = 3000;

fn logical() -> Options {
    Options { capture: Choice::Logical, ..test_options() }
}

async fn items(db: &TestDb) {
    db.exec(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO items SELECT g, g * 3, CASE WHEN g % 11 = 0 THEN NULL ELSE 'n' || g END,
                                  CASE WHEN g % 50 = 0 THEN {LONG} END
           FROM generate_series(1, {ROWS}) g;
         INSERT INTO oracle SELECT * FROM items;"
    ))
    .await;
}

/// Slots and publications of the test's database (slots are the cluster's: named with the
/// database's oid).
async fn replication_debris(db: &TestDb) -> Vec<String> {
    strings(
        &db.client,
        "SELECT 'slot ' || slot_name FROM pg_replication_slots
          WHERE slot_name LIKE 'ghostwire\\_' || (SELECT oid FROM pg_database WHERE datname = current_database()) || '\\_%'
         UNION ALL SELECT 'publication ' || pubname FROM pg_publication",
    )
    .await
}

#[tokio::test]
async fn a_type_change_under_writes_matches_the_oracle() {
    let db = TestDb::new().await;
    items(&db).await;
    let (outcome, commits) =
        migrate_under_load(&db, Shape::items(), ROWS, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &logical())
            .await;
    assert!(outcome.swap.is_some() && outcome.rows_copied > 0);
    assert!(commits > 100, "only {commits} writer commits");
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty, note, payload FROM oracle",
    )
    .await;
    // No trigger was ever on the table; the slot and the publication went at the swap.
    let capture = strings(&db.client, "SELECT capture FROM ghostwire.migrations").await;
    assert_eq!(capture, ["logical"]);
    assert!(replication_debris(&db).await.is_empty(), "{:?}", replication_debris(&db).await);
    let out = ghostwire(&db.url, &["finish", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(debris(&db.client, outcome.id).await.is_empty());
}

/// Runs `sql` (with both tables in it) as the test's own transaction.
async fn exec(url: &str, sql: &str) {
    let c = common::connect(url).await;
    c.batch_execute(sql).await.unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
}

#[tokio::test]
async fn large_rolled_back_sub_and_truncating_transactions_are_captured() {
    let db = TestDb::new().await;
    items(&db).await;
    // The server spills transactions over 64 kB to disk before it sends them.
    db.exec(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET logical_decoding_work_mem = %L', current_database(), '64kB'); END $$",
    )
    .await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 51);
    load.wait_for_more(30).await;
    let big_commit = Arc::new(AtomicI64::new(0));
    let spilled = Arc::new(AtomicI64::new(-1));
    let (url, counters) = (db.url.clone(), Arc::clone(&load.counters));
    let (lsn, spill) = (Arc::clone(&big_commit), Arc::clone(&spilled));
    let hook: PhaseHook = Arc::new(move |phase| {
        let (url, counters, lsn, spill) = (url.clone(), Arc::clone(&counters), Arc::clone(&lsn), Arc::clone(&spill));
        Box::pin(async move {
            common::workload::wait_for_more(&counters, 10).await;
            match phase {
                Phase::Copy => {
                    // Thousands of changes in one transaction (spilled), one rolled back, and a
                    // subtransaction rolled back inside a committed one.
                    exec(
                        &url,
                        "BEGIN; UPDATE items SET note = note || '+' WHERE id <= 2500;
                                UPDATE oracle SET note = note || '+' WHERE id <= 2500; COMMIT",
                    )
                    .await;
                    let c = common::connect(&url).await;
                    let at: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
                    lsn.store(ghostwire_proto::parse_lsn(&at).unwrap() as i64, Ordering::SeqCst);
                    exec(&url, "BEGIN; UPDATE items SET qty = -1; DELETE FROM items WHERE id < 100; ROLLBACK").await;
                    exec(
                        &url,
                        "BEGIN; UPDATE items SET qty = 7 WHERE id = 10; UPDATE oracle SET qty = 7 WHERE id = 10;
                                SAVEPOINT s; DELETE FROM items WHERE id = 11; DELETE FROM oracle WHERE id = 11;
                                ROLLBACK TO s; INSERT INTO items VALUES (900001, 1, 'sub', NULL);
                                INSERT INTO oracle VALUES (900001, 1, 'sub', NULL); COMMIT",
                    )
                    .await;
                }
                Phase::Index => {
                    // The copied rows are gone from the original: the shadow must follow.
                    exec(
                        &url,
                        "BEGIN; TRUNCATE items; TRUNCATE oracle;
                                INSERT INTO items SELECT g, g, 't' || g, NULL FROM generate_series(1, 1500) g;
                                INSERT INTO oracle SELECT * FROM items; COMMIT",
                    )
                    .await;
                }
                Phase::Catchup => {
                    // By now the stream is past the big transaction: did the server spill it?
                    let c = common::connect(&url).await;
                    let target = lsn.load(Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        let row = c
                            .query_one(
                                "SELECT coalesce(bool_and(s.confirmed_flush_lsn >= $1::text::pg_lsn), false),
                                        coalesce(sum(st.spill_txns), 0)::int8
                                   FROM pg_replication_slots s LEFT JOIN pg_stat_replication_slots st USING (slot_name)
                                  WHERE s.database = current_database()",
                                &[&ghostwire_proto::format_lsn(target as u64)],
                            )
                            .await
                            .unwrap();
                        if row.get::<_, bool>(0) || Instant::now() > deadline {
                            spill.store(row.get(1), Ordering::SeqCst);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                _ => {}
            }
        })
    });
    let outcome = run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &logical(), Some(hook))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    load.wait_for_more(20).await;
    load.stop().await;
    assert!(outcome.swap.is_some());
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty, note, payload FROM oracle",
    )
    .await;
    assert!(
        spilled.load(Ordering::SeqCst) > 0,
        "the big transaction was not spilled: {}",
        spilled.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn postgres_restarted_mid_stream_is_ridden_out() {
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    common::items::create(&client, common::items::ROWS).await;
    let load = Workload::start_tolerant(&url, Shape::items(), 2, common::items::ROWS, 52);
    load.wait_for_more(20).await;
    let url2 = url.clone();
    let migration = tokio::spawn(async move {
        let args =
            ["migrate", "--capture", "logical", "--chunk-rows", "100", "--chunk-time", "5ms", common::items::RETYPE];
        ghostwire(&url2, &args, None).await
    });
    // Restart (as a crash: immediate shutdown) once the copy is under way and changes stream.
    common::wait_for(&client, common::COPY_UNDER_WAY).await;
    let c = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.restart()).await.unwrap().unwrap();
    let out = migration.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the run should go on after the restart: {stderr}");
    load.wait_for_more(20).await;
    load.stop().await;
    let client = common::connect(&url).await;
    common::items::assert_matches_oracle(&client).await;
    common::items::assert_swapped_then_finish(&url, &client).await;
    assert!(strings(&client, "SELECT slot_name FROM pg_replication_slots").await.is_empty());
}

/// Part of the table copied, then the copy held (through `gate`): changes of copied rows
/// wait in the log, the slot is confirmed past them, and a checkpoint has put that position
/// on disk (a crash before one would stream those changes again).
async fn hold_copy_with_changes_confirmed(client: &tokio_postgres::Client) {
    common::wait_for(client, common::COPY_UNDER_WAY).await;
    client.batch_execute("UPDATE gate SET hold = true").await.unwrap();
    common::wait_for(client, "SELECT count(*) >= 50 FROM ghostwire.changes_1").await;
    let lsn: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    common::wait_for(client, &format!("SELECT bool_and(confirmed_flush_lsn >= '{lsn}') FROM pg_replication_slots"))
        .await;
    client.batch_execute("CHECKPOINT").await.unwrap();
}

/// The change log is UNLOGGED with logical capture: a crash of the server empties it,
/// keys the slot was confirmed past among them. The run must notice and copy again.
#[tokio::test]
async fn a_crash_that_empties_the_change_log_makes_the_run_copy_again() {
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    common::items::create(&client, common::items::ROWS).await;
    client.batch_execute("CREATE TABLE gate (hold boolean NOT NULL); INSERT INTO gate VALUES (false)").await.unwrap();
    let load = Workload::start_tolerant(&url, Shape::items(), 2, common::items::ROWS, 54);
    load.wait_for_more(20).await;
    let url2 = url.clone();
    let migration = tokio::spawn(async move {
        let args = [
            "migrate",
            "--capture",
            "logical",
            "--chunk-rows",
            "100",
            "--chunk-time",
            "5ms",
            "--throttle-query",
            "SELECT hold FROM gate",
            common::items::RETYPE,
        ];
        ghostwire(&url2, &args, None).await
    });
    hold_copy_with_changes_confirmed(&client).await;
    let c = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.restart()).await.unwrap().unwrap();
    let client = common::connect(&url).await;
    client.batch_execute("UPDATE gate SET hold = false").await.unwrap();
    let out = migration.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the run should go on after the crash: {stderr}");
    load.wait_for_more(20).await;
    load.stop().await;
    common::items::assert_matches_oracle(&client).await;
    let lost = strings(&client, "SELECT message FROM ghostwire.events WHERE kind = 'change_log_lost'").await;
    assert_eq!(lost.len(), 1, "the lost log was not noticed: {stderr}");
    common::items::assert_swapped_then_finish(&url, &client).await;
    assert!(strings(&client, "SELECT slot_name FROM pg_replication_slots").await.is_empty());
}

/// The same crash while no ghostwire process runs (it was killed first): `resume` finds
/// the log emptied and copies again.
#[tokio::test]
async fn resume_after_a_crash_that_emptied_the_change_log_copies_again() {
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    common::items::create(&client, common::items::ROWS).await;
    client.batch_execute("CREATE TABLE gate (hold boolean NOT NULL); INSERT INTO gate VALUES (false)").await.unwrap();
    let load = Workload::start_tolerant(&url, Shape::items(), 2, common::items::ROWS, 55);
    load.wait_for_more(20).await;
    let args = [
        "migrate",
        "--capture",
        "logical",
        "--chunk-rows",
        "100",
        "--chunk-time",
        "5ms",
        "--throttle-query",
        "SELECT hold FROM gate",
        common::items::RETYPE,
    ];
    let run = common::running::Running::start(&url, &args).await;
    hold_copy_with_changes_confirmed(&client).await;
    drop(run); // SIGKILL
    let c = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.restart()).await.unwrap().unwrap();
    let client = common::connect(&url).await;
    client.batch_execute("UPDATE gate SET hold = false").await.unwrap();
    let out = ghostwire(&url, &["resume", "items"], None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume should copy again: {stderr}");
    load.wait_for_more(20).await;
    load.stop().await;
    common::items::assert_matches_oracle(&client).await;
    let lost = strings(&client, "SELECT phase FROM ghostwire.events WHERE kind = 'change_log_lost'").await;
    assert_eq!(lost.len(), 1, "the lost log was not noticed: {stderr}");
    common::items::assert_swapped_then_finish(&url, &client).await;
}

#[tokio::test]
async fn ddl_on_the_table_under_the_run_stops_it_before_the_swap() {
    for capture in [Choice::Logical, Choice::Trigger] {
        let db = TestDb::new().await;
        items(&db).await;
        let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 53);
        load.wait_for_more(20).await;
        let url = db.url.clone();
        let hook: PhaseHook = Arc::new(move |phase| {
            let url = url.clone();
            Box::pin(async move {
                if phase == Phase::Catchup {
                    exec(&url, "ALTER TABLE items ADD COLUMN extra int").await;
                }
            })
        });
        let opts = Options { capture, ..test_options() };
        let err = run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &opts, Some(hook))
            .await
            .expect_err("the table changed under the run");
        assert!(
            matches!(err, ghostwire::migrate::MigrateError::TableChanged { .. })
                && err.to_string().contains("extra integer"),
            "{capture:?}: {err}"
        );
        load.stop().await;
        // The original is untouched and writable; abort removes everything.
        assert_same_rows(&db.client, "SELECT id, qty, note, payload FROM items", "SELECT * FROM oracle").await;
        let out = ghostwire(&db.url, &["abort", "items"], None).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(debris(&db.client, 1).await.is_empty() && replication_debris(&db).await.is_empty());
    }
}

#[tokio::test]
async fn a_slot_over_its_critical_lag_aborts_the_run_and_drops_the_slot() {
    let db = TestDb::new().await;
    items(&db).await;
    let mut opts = logical();
    opts.settings.critical_slot_lag_bytes = Some(1024);
    let err = run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &opts, None)
        .await
        .expect_err("the copy's own WAL is more than 1 kB");
    let said = err.to_string();
    assert!(said.contains("the replication slot retains") && said.contains("critical limit 1.0 kB"), "{said}");
    assert!(matches!(err, ghostwire::migrate::MigrateError::Critical { cleaned: true, .. }), "{said}");
    assert!(replication_debris(&db).await.is_empty(), "{:?}", replication_debris(&db).await);
    // Bad input: a slot limit without logical capture.
    let out = ghostwire(
        &db.url,
        &["migrate", "--max-slot-lag", "1GB", "ALTER TABLE items ALTER COLUMN qty TYPE bigint"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn a_rehearsal_with_logical_capture_leaves_no_slot() {
    let db = TestDb::new().await;
    items(&db).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 54);
    load.wait_for_more(20).await;
    let opts = Options { rehearse: true, rehearse_baseline: Duration::from_millis(300), ..logical() };
    let hook = common::writes_each_phase(Arc::clone(&load.counters), 10);
    let outcome = run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &opts, Some(hook))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    load.stop().await;
    assert!(outcome.rehearsal.is_some() && outcome.swap.is_none());
    assert!(replication_debris(&db).await.is_empty(), "{:?}", replication_debris(&db).await);
    assert!(debris(&db.client, outcome.id).await.is_empty());
    assert_same_rows(&db.client, "SELECT * FROM items", "SELECT * FROM oracle").await;
    let t = strings(&db.client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'").await;
    assert_eq!(t, ["integer"], "a rehearsal changes nothing");
}

/// The trigger capture's oracle suites (`migrate`, `migrate_cutover`, `migrate_objects`)
/// again with `--capture logical`: their test binaries run with `GHOSTWIRE_TEST_CAPTURE`.
#[test]
fn the_trigger_oracle_suites_pass_in_logical_mode() {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    for suite in ["migrate", "migrate_cutover", "migrate_objects"] {
        let exe =
            common::test_binary(&deps, suite).unwrap_or_else(|| panic!("{suite}: not built (cargo test --workspace)"));
        let out = std::process::Command::new(&exe)
            .args(["--test-threads", "2"])
            .env("GHOSTWIRE_TEST_CAPTURE", "logical")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let from = stdout.find("failures:").unwrap_or(0);
        assert!(out.status.success(), "{suite} in logical mode:\n{}", &stdout[from..]);
        assert!(stdout.contains("test result: ok."), "{suite}: {stdout}");
    }
}

/// A commit is in the WAL, and can be decoded and streamed, a moment before other sessions
/// see it: its backend leaves the process array after the flush (and after a synchronous
/// standby answers). A log entry written in that moment and applied by reading the row as
/// it is then would copy the old row and lose the change. A synchronous standby that never
/// answers holds one writer exactly there, for as long as the test needs.
#[tokio::test]
async fn a_change_streamed_before_other_sessions_see_it_is_not_lost() {
    const KEY: i64 = 4321;
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    common::items::create(&client, common::items::ROWS).await;
    // Only the held writer waits for the standby: ghostwire keeps a setting stronger than off.
    client.batch_execute("ALTER DATABASE postgres SET synchronous_commit = local").await.unwrap();
    let held: Arc<tokio::sync::Mutex<Option<HeldWriter>>> = Arc::default();
    let (u, h) = (url.clone(), Arc::clone(&held));
    let hook: PhaseHook = Arc::new(move |phase| {
        let (url, held) = (u.clone(), Arc::clone(&h));
        Box::pin(async move {
            match phase {
                Phase::Copy => *held.lock().await = Some(hold_a_committed_update(&url, KEY).await),
                Phase::Cutover => {
                    let (pid, writer) = held.lock().await.take().expect("the writer was held at the copy");
                    let c = common::connect(&url).await;
                    c.execute("SELECT pg_cancel_backend($1)", &[&pid]).await.unwrap();
                    writer.await.unwrap();
                    c.batch_execute("ALTER SYSTEM RESET synchronous_standby_names").await.unwrap();
                    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
                }
                _ => {}
            }
        })
    });
    let outcome =
        run_migration(&url, common::items::RETYPE, &logical(), Some(hook)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(outcome.swap.is_some());
    assert_eq!(strings(&client, &format!("SELECT qty::text FROM items WHERE id = {KEY}")).await, ["-1"]);
    common::items::assert_matches_oracle(&client).await;
}

/// A writer's pid and task, its commit waiting for a standby.
type HeldWriter = (i32, tokio::task::JoinHandle<()>);

/// Commits `UPDATE … SET qty = -1` of row `key` (and the oracle's) on a session that then
/// waits for a synchronous standby that never answers; returns once the walsender has sent
/// the commit on. The session's pid and task are returned: cancelling the wait lets it go.
async fn hold_a_committed_update(url: &str, key: i64) -> HeldWriter {
    let c = common::connect(url).await;
    c.batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'ghostwire_test_nobody'").await.unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    loop {
        let writer = common::connect(url).await;
        let pid: i32 = writer.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        let sql = format!(
            "SET synchronous_commit = on; BEGIN; UPDATE items SET qty = -1 WHERE id = {key};
             UPDATE oracle SET qty = -1 WHERE id = {key}; COMMIT"
        );
        let mut task = tokio::spawn(async move { writer.batch_execute(&sql).await.unwrap() });
        // The server may not have taken the new setting in yet: then the commit returns.
        let waiting =
            format!("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'SyncRep')");
        loop {
            if task.is_finished() {
                break;
            }
            if c.query_one(&waiting, &[]).await.unwrap().get::<_, bool>(0) {
                let flushed: String = c.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]).await.unwrap().get(0);
                let sent =
                    format!("SELECT coalesce(bool_and(sent_lsn >= '{flushed}'), false) FROM pg_stat_replication");
                common::wait_for(&c, &sent).await;
                return (pid, task);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (&mut task).await.unwrap();
    }
}
