//! The cut-over under pressure, abort from every phase, and refusals: the table stays
//! consistent (checked against the oracle) and writable throughout.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::workload::{Shape, Workload};
use common::{TestDb, assert_same_rows, debris, run_migration, strings, test_options, workload};
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use ghostwire::migrate::{MigrateError, Options, PhaseHook, cleanup, retry::RetryPolicy};
use ghostwire::state::{self, Phase};
use tokio::sync::Mutex;
use tokio_postgres::Client;

const ROWS: i64 = 2000;
const RETYPE: &str = "ALTER TABLE items ALTER COLUMN qty TYPE bigint";

async fn items(db: &TestDb) {
    db.exec(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO items (id, qty, note) SELECT g, g, 'n' || g FROM generate_series(1, {ROWS}) g;
         INSERT INTO oracle SELECT * FROM items;"
    ))
    .await;
}

async fn unchanged(db: &TestDb) {
    let t = strings(&db.client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'").await;
    assert_eq!(t, ["integer"], "the table was changed");
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty, note, payload FROM oracle",
    )
    .await;
}

/// A hook: at `phase`, run `action`; at every phase, let some writes commit first.
fn at_phase<F, Fut>(counters: Arc<workload::Counters>, phase: Phase, action: F) -> PhaseHook
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let action = Arc::new(action);
    Arc::new(move |p| {
        let (counters, action) = (Arc::clone(&counters), Arc::clone(&action));
        Box::pin(async move {
            workload::wait_for_more(&counters, 5).await;
            if p == phase {
                action().await;
            }
        })
    })
}

/// A hook: at `phase`, run `sql` on a connection of its own (tampering with the shadow).
fn sql_at_phase(counters: Arc<workload::Counters>, phase: Phase, url: &str, sql: &'static str) -> PhaseHook {
    let url = url.to_owned();
    at_phase(counters, phase, move || {
        let url = url.clone();
        async move {
            common::connect(&url).await.batch_execute(sql).await.unwrap();
        }
    })
}

async fn migration_row(client: &Client) -> state::Migration {
    state::list(client, None, 10).await.unwrap().into_iter().next().expect("a migration")
}

#[tokio::test]
async fn a_long_lock_makes_the_cutover_retry_then_give_up_cleanly() {
    let db = TestDb::new().await;
    items(&db).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 11);
    load.wait_for_more(20).await;
    let holder: Arc<Mutex<Option<Client>>> = Arc::new(Mutex::new(None));
    let (h, url) = (Arc::clone(&holder), db.url.clone());
    let hook = at_phase(Arc::clone(&load.counters), Phase::Cutover, move || {
        let (h, url) = (Arc::clone(&h), url.clone());
        async move {
            // A long transaction that has read the table: its ACCESS SHARE lock blocks the swap
            // (not the writers).
            let c = common::connect(&url).await;
            c.batch_execute("BEGIN; SELECT count(*) AS long_reader FROM items;").await.unwrap();
            *h.lock().await = Some(c);
        }
    });
    let opts =
        ghostwire::migrate::Options { cutover_attempts: 4, lock_timeout: Duration::from_millis(50), ..test_options() };
    let started = Instant::now();
    let err = run_migration(&db.url, RETYPE, &opts, Some(hook)).await.expect_err("the swap cannot get its lock");
    assert!(matches!(err, MigrateError::CutoverGaveUp { attempts: 4, .. }), "{err}");
    assert!(err.to_string().contains("untouched and writable"), "{err}");
    // The reason names the session in the way, what it is doing, and for how long.
    let pid: i32 =
        holder.lock().await.as_ref().unwrap().query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let named = format!("held by pid {pid} (idle in transaction, in a transaction for ");
    assert!(err.to_string().contains(&named) && err.to_string().contains("long_reader"), "{err}");
    // The writers never waited long: each attempt gave up its lock request after 50 ms.
    load.wait_for_more(20).await;
    let worst = Duration::from_micros(load.counters.max_latency_us.load(Ordering::Relaxed));
    assert!(worst < Duration::from_secs(2), "a writer waited {worst:?} (run took {:?})", started.elapsed());
    holder.lock().await.take().unwrap().batch_execute("COMMIT").await.unwrap();
    let m = migration_row(&db.client).await;
    assert_eq!(m.phase, Phase::Cutover);
    assert!(m.error.as_deref().unwrap_or("").contains("gave up after 4 attempts"));
    assert_eq!(m.cutover_attempts, 4);
    let attempts: i64 = db
        .client
        .query_one("SELECT count(*) FROM ghostwire.events WHERE kind = 'cutover_attempt' AND details->>'outcome' = 'lock_timeout'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 4);
    load.stop().await;
    unchanged(&db).await;
    // Abort removes every trace; the table is as it was.
    cleanup::abort(&db.client, &m, &RetryPolicy::default()).await.unwrap();
    assert!(debris(&db.client, m.id).await.is_empty(), "{:?}", debris(&db.client, m.id).await);
    unchanged(&db).await;
}

#[tokio::test]
async fn an_open_repeatable_read_transaction_delays_the_swap_until_it_ends() {
    let db = TestDb::new().await;
    items(&db).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 12);
    load.wait_for_more(20).await;
    let rr: Arc<Mutex<Option<Client>>> = Arc::new(Mutex::new(None));
    let (r, url) = (Arc::clone(&rr), db.url.clone());
    let hook = at_phase(Arc::clone(&load.counters), Phase::Verify, move || {
        let (r, url) = (Arc::clone(&r), url.clone());
        async move {
            // A snapshot taken before the last catch-up, not touching the table yet.
            let c = common::connect(&url).await;
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM oracle;").await.unwrap();
            *r.lock().await = Some(c);
        }
    });
    let url = db.url.clone();
    let migration = tokio::spawn(async move { run_migration(&url, RETYPE, &test_options(), Some(hook)).await });
    // Wait for the engine to see the hazard.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM ghostwire.events WHERE kind = 'cutover_attempt' AND details->>'outcome' = 'snapshot_hazard'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot hazard was detected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(migration_row(&db.client).await.phase, Phase::Cutover, "swapped under an old snapshot");
    // The old snapshot reads the table, still the original, consistently.
    let c = rr.lock().await.take().unwrap();
    let seen: i64 = c.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert!(seen > 0);
    c.batch_execute("COMMIT").await.unwrap();
    let outcome = migration.await.unwrap().expect("the swap goes ahead once the snapshot is gone");
    assert!(outcome.swap.is_some() && outcome.cutover_attempts >= 2);
    load.wait_for_more(20).await;
    load.stop().await;
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty::bigint, note, payload FROM oracle",
    )
    .await;
}

#[tokio::test]
async fn abort_from_every_phase_before_the_swap_leaves_nothing_behind() {
    for phase in
        [Phase::Shadow, Phase::Capture, Phase::Copy, Phase::Index, Phase::Catchup, Phase::Verify, Phase::Cutover]
    {
        let db = TestDb::new().await;
        items(&db).await;
        let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 13);
        load.wait_for_more(10).await;
        let url = db.url.clone();
        let hook = at_phase(Arc::clone(&load.counters), phase, move || {
            let url = url.clone();
            async move {
                let c = common::connect(&url).await;
                let m = state::list(&c, None, 1).await.unwrap().into_iter().next().unwrap();
                cleanup::stop_runner(&c, &m).await.unwrap();
                cleanup::abort(&c, &m, &RetryPolicy::default()).await.unwrap();
            }
        });
        let result = run_migration(&db.url, RETYPE, &test_options(), Some(hook)).await;
        assert!(result.is_err(), "{phase}: the aborted migration carried on");
        load.wait_for_more(10).await;
        load.stop().await;
        let m = migration_row(&db.client).await;
        assert_eq!(m.phase, Phase::Aborted, "{phase}");
        assert!(debris(&db.client, m.id).await.is_empty(), "{phase}: {:?}", debris(&db.client, m.id).await);
        unchanged(&db).await;
    }
}

#[tokio::test]
async fn a_second_migration_of_the_same_table_is_refused() {
    let db = TestDb::new().await;
    items(&db).await;
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release_rx = Arc::new(Mutex::new(Some(release_rx)));
    let hook: PhaseHook = Arc::new(move |p| {
        let rx = Arc::clone(&release_rx);
        Box::pin(async move {
            if p == Phase::Copy
                && let Some(rx) = rx.lock().await.take()
            {
                let _ = rx.await;
            }
        })
    });
    let url = db.url.clone();
    let first = tokio::spawn(async move { run_migration(&url, RETYPE, &test_options(), Some(hook)).await });
    // Wait until the first one is in its copy phase.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !db
        .client
        .query_one("SELECT EXISTS (SELECT 1 FROM ghostwire.migrations WHERE phase = 'copy')", &[])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second =
        run_migration(&db.url, "ALTER TABLE items ALTER COLUMN note TYPE varchar(100)", &test_options(), None).await;
    let err = second.expect_err("two migrations of one table");
    assert!(matches!(err, MigrateError::Busy { .. }) && err.is_refusal(), "{err}");
    release_tx.send(()).unwrap();
    first.await.unwrap().expect("the first one completes");
    // Once swapped (not finished), a new migration is refused with the next step.
    let third =
        run_migration(&db.url, "ALTER TABLE items ALTER COLUMN note TYPE varchar(100)", &test_options(), None).await;
    let err = third.expect_err("unfinished migration");
    assert!(err.to_string().contains("unfinished migration") && err.to_string().contains("finish"), "{err}");
}

fn ghostwire(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ghostwire")).args(args).env("DATABASE_URL", url).output().unwrap()
}

#[tokio::test]
async fn the_command_line_end_to_end() {
    let db = TestDb::new().await;
    items(&db).await;
    // Bad input changes nothing, not even the state schema.
    let out = ghostwire(&db.url, &["migrate", "ALTER TABLE nope ALTER COLUMN x TYPE bigint"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(strings(&db.client, "SELECT (to_regnamespace('ghostwire') IS NULL)::text").await, ["true"]);
    // A narrowing change needs consent.
    let out = ghostwire(&db.url, &["migrate", "ALTER TABLE items ALTER COLUMN note TYPE varchar(10)"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    let out = ghostwire(&db.url, &["migrate", "--chunk-rows", "500", RETYPE]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[copy]") && text.contains("Done:") && text.contains("ghostwire finish"), "{text}");
    let out = ghostwire(&db.url, &["status", "--json", "items"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc[0]["migration"]["phase"], "swapped");
    assert!(doc[0]["migration"]["lock_hold_ms"].as_f64().unwrap() > 0.0);
    let out = ghostwire(&db.url, &["finish", "items"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ghostwire(&db.url, &["status", "items"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("phase finished"));
    assert!(debris(&db.client, 1).await.is_empty());
    // Nothing to abort any more.
    let out = ghostwire(&db.url, &["abort", "items"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no unfinished migration"));
}

#[tokio::test]
async fn verification_catches_a_corrupted_shadow_and_stops() {
    let db = TestDb::new().await;
    items(&db).await;
    // Rows the writers never touch (they pick positive keys), so that no write of theirs
    // explains a corruption by chance.
    db.exec(
        "INSERT INTO items (id, qty, note) VALUES (-42, 1, 'a'), (-43, 1, 'b');
         INSERT INTO oracle (id, qty, note) VALUES (-42, 1, 'a'), (-43, 1, 'b');",
    )
    .await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 14);
    load.wait_for_more(10).await;
    // Changes the capture never saw: exactly what verification exists to catch. And a
    // captured change not applied yet, so the log is not empty while it checks.
    let hook = sql_at_phase(
        Arc::clone(&load.counters),
        Phase::Verify,
        &db.url,
        "UPDATE ghostwire_1.items SET note = 'corrupted' WHERE id = -42;
         DELETE FROM ghostwire_1.items WHERE id = -43;
         INSERT INTO ghostwire_1.items (id, qty, note) VALUES (-5, 1, 'only in the shadow');
         UPDATE items SET note = note WHERE id = 7;",
    );
    let err = run_migration(&db.url, RETYPE, &test_options(), Some(hook)).await.expect_err("a corrupted shadow");
    assert!(matches!(err, MigrateError::Mismatch { count: 3, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("(-42)") && msg.contains("(-43)") && msg.contains("(-5)") && msg.contains("untouched"),
        "{err}"
    );
    load.stop().await;
    let m = migration_row(&db.client).await;
    assert_eq!(m.phase, Phase::Verify);
    unchanged(&db).await;
}

/// Verification starts once the shadow's key index exists, beside a slower index build;
/// the statistics are gathered after the builds. Rows, index and statistics are all there.
/// (No writers: every write would wait on the slow index too.)
#[tokio::test]
async fn verification_runs_beside_the_index_builds() {
    let db = TestDb::new().await;
    items(&db).await;
    // An index whose build takes seconds: each entry waits a millisecond.
    db.exec(
        "CREATE FUNCTION slow(bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE
           AS $$ BEGIN PERFORM pg_sleep(0.001); RETURN $1; END $$;
         CREATE INDEX items_slow ON items (slow(id));",
    )
    .await;
    let builds_seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let (seen, url) = (Arc::clone(&builds_seen), db.url.clone());
    let hook: PhaseHook = Arc::new(move |p| {
        let (seen, url) = (Arc::clone(&seen), url.clone());
        Box::pin(async move {
            if p == Phase::Verify {
                let c = common::connect(&url).await;
                // The slow build is running, or about to start on the session the key index
                // freed: wait for it to show, unless it is done already (that fails below).
                let sql = "SELECT query FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'CREATE INDEX%'";
                let built = "SELECT EXISTS (SELECT FROM pg_indexes WHERE schemaname = 'ghostwire_1' AND indexname LIKE '%slow%')";
                let mut found = strings(&c, sql).await;
                while !found.iter().any(|q| q.contains("items_slow")) {
                    if c.query_one(built, &[]).await.unwrap().get::<_, bool>(0) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    found = strings(&c, sql).await;
                }
                // Autovacuum stays off the shadow while it is built.
                let sql = "SELECT 'shadow: ' || array_to_string(reloptions, ',') FROM pg_class WHERE oid = 'ghostwire_1.items'::regclass";
                found.extend(strings(&c, sql).await);
                *seen.lock().await = found;
            }
        })
    });
    let outcome = run_migration(&db.url, RETYPE, &test_options(), Some(hook)).await.expect("the migration");
    assert!(outcome.swap.is_some());
    let seen = builds_seen.lock().await.clone();
    assert!(seen.len() == 2 && seen[0].contains("items_slow"), "builds running as verification began: {seen:?}");
    assert_eq!(seen[1], "shadow: autovacuum_enabled=false");
    let options = strings(
        &db.client,
        "SELECT coalesce(array_to_string(reloptions, ','), 'none') FROM pg_class WHERE oid = 'items'::regclass",
    )
    .await;
    assert_eq!(options, ["none"], "autovacuum is as it was on the new table");
    let verified =
        strings(&db.client, "SELECT details->>'rows' FROM ghostwire.events WHERE kind = 'verify_done'").await;
    assert_eq!(verified, [ROWS.to_string()]);
    let analyzed = strings(
        &db.client,
        "SELECT (last_analyze IS NOT NULL)::text FROM pg_stat_user_tables WHERE relid = 'public.items'::regclass",
    )
    .await;
    assert_eq!(analyzed, ["true"], "the new table has no statistics");
    let indexes = strings(
        &db.client,
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'items' ORDER BY 1",
    )
    .await;
    assert_eq!(indexes, ["items_pkey", "items_slow"]);
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty::bigint, note, payload FROM oracle",
    )
    .await;
}

/// A cluster of its own, where autovacuum wakes every second, with `items` (20,000 rows,
/// vacuumed) and its copy `oracle`.
async fn autovacuum_cluster() -> (Cluster, String, Client) {
    let options = ClusterOptions::default().with_setting("autovacuum_naptime", "1s");
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(options)).await.unwrap().unwrap();
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
             INSERT INTO items (id, qty, note) SELECT g, g, 'n' || g FROM generate_series(1, 20000) g;
             CREATE TABLE oracle AS SELECT * FROM items;",
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE items").await.unwrap();
    (cluster, url, client)
}

/// Dead rows in `items`, and an autovacuum of it that sleeps 100 ms after every page: it
/// takes minutes. Waits until it runs.
async fn start_crawling_autovacuum(c: &Client) {
    c.batch_execute(
        "ALTER TABLE items SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
                                autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1);
         UPDATE items SET note = note WHERE id % 10 = 0;",
    )
    .await
    .unwrap();
    wait_for_autovacuum(c).await;
}

async fn wait_for_autovacuum(c: &Client) {
    common::wait_for(
        c,
        "SELECT count(*) > 0 FROM pg_stat_activity
          WHERE backend_type = 'autovacuum worker' AND query LIKE '%VACUUM public.items%'",
    )
    .await;
}

/// An autovacuum worker crawling over the table would hold off the capture triggers and every
/// swap attempt for as long as it runs (it yields only to a lock wait of `deadlock_timeout`):
/// it is cancelled before each, and the migration goes through.
#[tokio::test]
async fn an_autovacuum_on_the_table_is_cancelled_for_the_triggers_and_the_swap() {
    let (_cluster, url, client) = autovacuum_cluster().await;
    let hook_url = url.clone();
    let hook: PhaseHook = Arc::new(move |p| {
        let url = hook_url.clone();
        Box::pin(async move {
            let c = common::connect(&url).await;
            if p == Phase::Capture {
                start_crawling_autovacuum(&c).await;
            }
            if p == Phase::Capture || p == Phase::Catchup {
                // Cancelled before the triggers, it starts again (the dead rows are still
                // there) before the swap.
                wait_for_autovacuum(&c).await;
            }
        })
    });
    let opts = Options { cutover_attempts: 5, ..test_options() };
    let outcome = run_migration(&url, RETYPE, &opts, Some(hook)).await.expect("migrated despite the autovacuum");
    assert!(outcome.swap.is_some());
    let cancelled = strings(
        &client,
        "SELECT details->>'before' FROM ghostwire.events
          WHERE kind = 'autovacuum' AND (details->>'cancelled')::boolean AND message LIKE '%VACUUM public.items%'
          ORDER BY id",
    )
    .await;
    let first = match common::capture_under_test() {
        ghostwire::migrate::capture::Choice::Trigger => "installing the capture triggers",
        _ => "creating the publication",
    };
    assert_eq!(cancelled.first().map(String::as_str), Some(first), "{cancelled:?}");
    assert!(cancelled.iter().any(|b| b.starts_with("cut-over attempt")), "{cancelled:?}");
    assert_same_rows(&client, "SELECT id, qty, note FROM items", "SELECT id, qty::bigint, note FROM oracle").await;
}

/// `abort` removes the capture triggers even while an autovacuum crawls over the table.
#[tokio::test]
async fn abort_cancels_an_autovacuum_in_its_way() {
    let (_cluster, url, client) = autovacuum_cluster().await;
    let hook_url = url.clone();
    let hook: PhaseHook = Arc::new(move |p| {
        let url = hook_url.clone();
        Box::pin(async move {
            if p == Phase::Catchup {
                let c = common::connect(&url).await;
                start_crawling_autovacuum(&c).await;
                let m = state::list(&c, None, 1).await.unwrap().into_iter().next().unwrap();
                cleanup::stop_runner(&c, &m).await.unwrap();
                cleanup::abort(&c, &m, &RetryPolicy::default()).await.expect("abort despite the autovacuum");
            }
        })
    });
    // Triggers: logical capture puts nothing on the table, so its abort needs no lock there.
    let opts = ghostwire::migrate::Options { capture: ghostwire::migrate::capture::Choice::Trigger, ..test_options() };
    let result = run_migration(&url, RETYPE, &opts, Some(hook)).await;
    assert!(result.is_err(), "the aborted migration carried on");
    let m = migration_row(&client).await;
    assert_eq!(m.phase, Phase::Aborted);
    assert!(debris(&client, m.id).await.is_empty(), "{:?}", debris(&client, m.id).await);
    let cancelled = strings(&client, "SELECT message FROM ghostwire.events WHERE kind = 'autovacuum'").await;
    assert!(cancelled.iter().any(|m| m.starts_with("removing the capture triggers: cancelled")), "{cancelled:?}");
}

/// Columns whose types have no equality operator (`json`, `point`) are compared through
/// their text form: a difference there is caught too.
#[tokio::test]
async fn verification_compares_types_without_equality_through_their_text() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, body json, spot point, n int);
         INSERT INTO docs SELECT g, json_build_object('g', g), point(g, -g), g FROM generate_series(1, 500) g;",
    )
    .await;
    let url = db.url.clone();
    let hook: PhaseHook = Arc::new(move |p| {
        let url = url.clone();
        Box::pin(async move {
            if p == Phase::Verify {
                let c = common::connect(&url).await;
                c.batch_execute(
                    "UPDATE ghostwire_1.docs SET body = '{\"g\": \"changed\"}' WHERE id = 17;
                     UPDATE ghostwire_1.docs SET spot = point(0, 0) WHERE id = 18;",
                )
                .await
                .unwrap();
            }
        })
    });
    let change = "ALTER TABLE docs ALTER COLUMN n TYPE bigint";
    let err = run_migration(&db.url, change, &test_options(), Some(hook)).await.expect_err("a corrupted shadow");
    assert!(matches!(err, MigrateError::Mismatch { count: 2, .. }), "{err}");
    assert!(err.to_string().contains("(17)") && err.to_string().contains("(18)"), "{err}");
    // Without the corruption, the same migration verifies and swaps.
    let out = ghostwire(&db.url, &["abort", "docs"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let outcome = run_migration(&db.url, change, &test_options(), None).await.expect("a clean migration");
    assert!(outcome.swap.is_some());
    let body = strings(&db.client, "SELECT body::text FROM docs WHERE id = 17").await;
    assert_eq!(body, [r#"{"g" : 17}"#]);
}

/// A shadow that lost its key after it was built (by hand, say) is never swapped in: the
/// run stops with the original untouched and writable, and `abort` cleans up.
#[tokio::test]
async fn a_shadow_missing_its_key_is_not_swapped_in() {
    let db = TestDb::new().await;
    items(&db).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 15);
    load.wait_for_more(10).await;
    let drop_key = "ALTER TABLE ghostwire_1.items DROP CONSTRAINT items_pkey";
    let hook = sql_at_phase(Arc::clone(&load.counters), Phase::Cutover, &db.url, drop_key);
    let err = run_migration(&db.url, RETYPE, &test_options(), Some(hook)).await.expect_err("a shadow without its key");
    assert!(matches!(err, MigrateError::ShadowIncomplete { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("index items_pkey, constraint items_pkey") && msg.contains("ghostwire abort"), "{msg}");
    load.wait_for_more(10).await; // still writable
    load.stop().await;
    unchanged(&db).await;
    let m = migration_row(&db.client).await;
    assert_eq!(m.phase, Phase::Cutover);
    cleanup::abort(&db.client, &m, &RetryPolicy::default()).await.unwrap();
    assert!(debris(&db.client, m.id).await.is_empty(), "{:?}", debris(&db.client, m.id).await);
}
