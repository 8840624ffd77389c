//! The drain gate with real sessions, and migrations that drain proxies around the swap:
//! clients through the proxies see a short wait, never an error.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::TestProxy;
use common::workload::{Shape, Workload};
use common::{TestDb, assert_same_rows, connect, run_migration, strings, test_options, writes_each_phase};
use ghostwire::migrate::{MigrateError, Options};
use ghostwire::proxy::gate::GateState;

#[tokio::test]
async fn the_gate_holds_idle_sessions_while_transactions_finish() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0);").await;
    let proxy = Arc::new(TestProxy::start(&db.upstream()).await);
    let url = proxy.url_for(&db.url);
    let (idle, busy) = (connect(&url).await, connect(&url).await);
    busy.batch_execute("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1;").await.unwrap();
    let p = Arc::clone(&proxy);
    let drain = tokio::spawn(async move { p.post("/drain?deadline_ms=10000").await });
    proxy.wait_until("draining", |s| s.gate.state == GateState::Draining).await;
    // The idle session's next query is held, not refused.
    let held = tokio::spawn(async move {
        let t = Instant::now();
        let r = idle.query_one("SELECT v FROM t WHERE id = 1", &[]).await.map(|r| r.get::<_, i32>(0));
        (r, t.elapsed())
    });
    proxy.wait_until("the idle session to be held", |s| s.gate.held_sessions == 1).await;
    // The session inside a transaction runs on to its end; then the gate is drained.
    busy.execute("UPDATE t SET v = v + 1 WHERE id = 1", &[]).await.unwrap();
    busy.batch_execute("COMMIT").await.unwrap();
    let (code, body) = drain.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["state"], "drained");
    assert_eq!(proxy.status().gate.state, GateState::Drained);
    tokio::time::sleep(Duration::from_millis(100)).await; // still held while drained
    assert!(!held.is_finished());
    let (code, body) = proxy.post("/open").await;
    assert_eq!(code, 200);
    assert!(body["closed_ms"].as_f64().unwrap() >= 100.0);
    let (value, waited) = held.await.unwrap();
    assert_eq!(value.unwrap(), 2, "the held query ran after the transaction it waited for");
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
}

#[tokio::test]
async fn a_drain_that_misses_its_deadline_reopens_and_nobody_sees_an_error() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let url = proxy.url_for(&db.url);
    let (idle, busy) = (connect(&url).await, connect(&url).await);
    busy.batch_execute("BEGIN; SELECT 1;").await.unwrap(); // and never finishes in time
    let t = Instant::now();
    let (code, body) = proxy.post("/drain?deadline_ms=300").await;
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("1 session(s)"), "{body}");
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(proxy.status().gate.state, GateState::Open);
    assert_eq!(idle.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    busy.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn a_drained_proxy_whose_engine_never_calls_back_reopens_at_the_deadline() {
    let db = TestDb::new().await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let client = connect(&proxy.url_for(&db.url)).await;
    let (code, _) = proxy.post("/drain?deadline_ms=400").await;
    assert_eq!(code, 200);
    let t = Instant::now();
    assert_eq!(client.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(proxy.status().gate.state, GateState::Open);
}

async fn items(db: &TestDb) {
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO items (id, qty, note) SELECT g, g, 'n' || g FROM generate_series(1, 3000) g;
         INSERT INTO oracle SELECT * FROM items;",
    )
    .await;
}

#[tokio::test]
async fn a_migration_through_two_proxies_under_load_has_no_client_errors() {
    let db = TestDb::new().await;
    items(&db).await;
    let (a, b) = (TestProxy::start(&db.upstream()).await, TestProxy::start(&db.upstream()).await);
    // Writers through both proxies (two application instances).
    let first = Workload::start(&a.url_for(&db.url), Shape::items(), 2, 3000, 21);
    let second = Workload::start(&b.url_for(&db.url), Shape::items(), 2, 1_000_000, 22);
    first.wait_for_more(20).await;
    second.wait_for_more(20).await;
    let opts = Options { proxies: vec![a.control.clone(), b.control.clone()], ..test_options() };
    let hook = writes_each_phase(Arc::clone(&first.counters), 10);
    let outcome = run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &opts, Some(hook))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(outcome.swap.is_some());
    first.wait_for_more(20).await;
    second.wait_for_more(20).await;
    let worst = first.counters.max_latency_us.load(std::sync::atomic::Ordering::Relaxed);
    first.stop().await; // panics on any client error
    second.stop().await;
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty::bigint, note, payload FROM oracle",
    )
    .await;
    // The swap happened with both proxies drained, and the event says how long clients waited.
    let swap = strings(
        &db.client,
        "SELECT (details->>'stall_ms') FROM ghostwire.events WHERE kind = 'cutover_attempt' AND details->>'outcome' = 'swapped'",
    )
    .await;
    let stall: f64 = swap[0].parse().unwrap();
    assert!(stall > 0.0 && stall < 2000.0, "stall {stall} ms");
    assert!(worst < 2_000_000, "a client waited {worst} µs");
    for p in [&a, &b] {
        assert_eq!(p.status().gate.state, GateState::Open);
    }
}

#[tokio::test]
async fn a_proxy_that_cannot_drain_makes_every_attempt_back_off_and_the_table_stays() {
    let db = TestDb::new().await;
    items(&db).await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let stuck = connect(&proxy.url_for(&db.url)).await;
    stuck.batch_execute("BEGIN; SELECT count(*) FROM oracle;").await.unwrap(); // idle in transaction
    let opts = Options {
        proxies: vec![proxy.control.clone()],
        drain_timeout: Duration::from_millis(200),
        cutover_attempts: 3,
        ..test_options()
    };
    let err = run_migration(&db.url, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &opts, None).await.unwrap_err();
    assert!(matches!(err, MigrateError::CutoverGaveUp { attempts: 3, .. }), "{err}");
    assert!(err.to_string().contains("did not drain"), "{err}");
    assert_eq!(proxy.status().gate.state, GateState::Open);
    let drains =
        strings(&db.client, "SELECT count(*)::text FROM ghostwire.events WHERE details->>'outcome' = 'drain_failed'")
            .await;
    assert_eq!(drains, ["3"]);
    // The stuck client was never disturbed, and the table is as it was.
    assert_eq!(stuck.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    stuck.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        strings(&db.client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'").await,
        ["integer"]
    );
}
