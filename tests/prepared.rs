//! Prepared statements through the proxy survive changes to their table: a swap (int →
//! bigint), instant changes (varchar(n) → text, DROP COLUMN, ADD COLUMN). Clients of
//! tokio-postgres (binary results, no re-describe) and pgbench `-M prepared` see no error,
//! and every value they read is what a direct connection reads, inside transaction blocks
//! too when the migration drains the proxy (each session's statements are checked before it
//! starts anything after a drain); without a drain, a batch outside a transaction block is
//! replayed, and inside one the error goes to the client; a value the client's old type
//! cannot hold fails that query alone, with 22003.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::proxy::{ORDER_ROWS as ROWS, TestProxy, orders};
use common::{TestDb, connect, run_migration, test_options};
use ghostwire::ephemeral::Cluster;
use ghostwire::migrate::Options;
use tokio::process::Command;
use tokio_postgres::error::SqlState;

/// A client through the proxy with its statements prepared before any change, reading and
/// writing until told to stop (each round one transaction block, with `transactions`);
/// every error and every wrong value is counted.
struct Client {
    stop: Arc<AtomicBool>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn spawn_client(url: String, first_id: i32, transactions: bool) -> Client {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rounds = Arc::new(AtomicU64::new(0));
    let (s, e, r) = (Arc::clone(&stop), Arc::clone(&errors), Arc::clone(&rounds));
    let task = tokio::spawn(async move {
        let c = connect(&url).await;
        let all = c.prepare("SELECT * FROM orders WHERE id = $1").await.unwrap();
        let col = c.prepare("SELECT amount, note FROM orders WHERE id = $1").await.unwrap();
        let ins = c.prepare("INSERT INTO orders (id, amount, note) VALUES ($1, $2, $3) RETURNING *").await.unwrap();
        let upd = c.prepare("UPDATE orders SET note = $2 WHERE amount = $1").await.unwrap();
        let mut next = first_id;
        let fail = |what: String| e.lock().unwrap().push(what);
        while !s.load(Ordering::Relaxed) {
            let errors_before = e.lock().unwrap().len();
            if transactions && let Err(err) = c.batch_execute("BEGIN").await {
                fail(format!("BEGIN: {}", ghostwire::connect::describe(&err)));
            }
            let id = 1 + (next % ROWS);
            match c.query_one(&all, &[&id]).await {
                // The client was told: id int4, amount int4, note varchar, extra int4.
                Ok(row) => {
                    let (rid, amount, note): (i32, i32, Option<String>) = (row.get(0), row.get(1), row.get(2));
                    let extra: Option<i32> = row.get(3);
                    if rid != id || amount != id * 10 || note.as_deref() != Some(&format!("n{id}")) {
                        fail(format!("SELECT * read ({rid}, {amount}, {note:?}) for id {id}"));
                    }
                    if extra.is_some_and(|x| x != id) {
                        fail(format!("extra {extra:?} for id {id}"));
                    }
                }
                Err(err) => fail(format!("SELECT *: {}", ghostwire::connect::describe(&err))),
            }
            match c.query_one(&col, &[&id]).await {
                Ok(row) => {
                    let amount: i32 = row.get(0);
                    if amount != id * 10 {
                        fail(format!("SELECT amount read {amount} for id {id}"));
                    }
                }
                Err(err) => fail(format!("SELECT amount: {}", ghostwire::connect::describe(&err))),
            }
            let new_id = 1_000_000 + next;
            match c.query_one(&ins, &[&new_id, &(new_id * 2), &"ins"]).await {
                Ok(row) => {
                    let (rid, amount): (i32, i32) = (row.get(0), row.get(1));
                    if rid != new_id || amount != new_id * 2 {
                        fail(format!("INSERT RETURNING gave ({rid}, {amount}) for {new_id}"));
                    }
                }
                Err(err) => fail(format!("INSERT RETURNING: {}", ghostwire::connect::describe(&err))),
            }
            if let Err(err) = c.execute(&upd, &[&(new_id * 2), &"upd"]).await {
                fail(format!("UPDATE: {}", ghostwire::connect::describe(&err)));
            }
            if transactions {
                let end = if e.lock().unwrap().len() > errors_before { "ROLLBACK" } else { "COMMIT" };
                if let Err(err) = c.batch_execute(end).await {
                    fail(format!("{end}: {}", ghostwire::connect::describe(&err)));
                }
            }
            next += 1;
            r.fetch_add(1, Ordering::Relaxed);
        }
    });
    Client { stop, errors, rounds, task }
}

impl Client {
    async fn rounds_more(&self, n: u64) {
        let target = self.rounds.load(Ordering::Relaxed) + n;
        while self.rounds.load(Ordering::Relaxed) < target {
            assert!(!self.task.is_finished(), "the client stopped: {:?}", self.errors.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the client task");
        self.errors.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn tokio_postgres_statements_survive_a_swap_and_instant_changes() {
    let db = TestDb::new().await;
    orders(&db).await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let through = proxy.url_for(&db.url);
    // Two clients run each round as a transaction block, one outside any.
    let clients: Vec<Client> = (0..3).map(|i| spawn_client(through.clone(), i * 10_000, i > 0)).collect();
    for c in &clients {
        c.rounds_more(5).await;
    }
    let opts = Options { proxies: vec![proxy.control.clone()], ..test_options() };
    for statement in [
        "ALTER TABLE orders ALTER COLUMN amount TYPE bigint",
        "ALTER TABLE orders ALTER COLUMN note TYPE text",
        "ALTER TABLE orders DROP COLUMN extra",
        "ALTER TABLE orders ADD COLUMN added int DEFAULT 5",
    ] {
        run_migration(&db.url, statement, &opts, None).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
        for c in &clients {
            c.rounds_more(5).await;
        }
        common::items::ghostwire(&db.url, &["finish", "orders"], None).await;
    }
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.finish().await);
    }
    assert!(errors.is_empty(), "{} client error(s), the first: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    // Each session's statements were prepared again after each change that altered their
    // result, before the session went on: nothing to replay, no error passed on.
    let status = proxy.status();
    assert!(status.prepared.reprepared >= 9, "{:?}", status.prepared);
    assert!(status.prepared.reshaped_rows > 0, "{:?}", status.prepared);
    assert_eq!(status.prepared.errors_passed_on, 0, "{:?}", status.prepared);
    // The same counts over HTTP: /status, and /metrics (process-wide: at least these).
    let get = |path: &'static str| {
        let addr = proxy.control.clone();
        async move { ghostwire::control::call(&addr, None, "GET", path, Duration::from_secs(10)).await.unwrap().1 }
    };
    let over_http: serde_json::Value = serde_json::from_str(&get("/status").await).unwrap();
    assert_eq!(over_http["prepared"]["replayed"], status.prepared.replayed, "{over_http}");
    let metrics = get("/metrics").await;
    for (name, at_least) in [
        ("ghostwire_proxy_reprepared_total", status.prepared.reprepared),
        ("ghostwire_proxy_reshaped_rows_total", status.prepared.reshaped_rows),
    ] {
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        assert!(value >= at_least as f64, "{name} {value} < {at_least}");
    }
    // A client that prepares now sees the new table as it is.
    let fresh = connect(&through).await;
    let row = fresh.query_one("SELECT * FROM orders WHERE id = 1", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>("amount"), row.get::<_, i32>("added")), (10, 5));
}

/// Requests (Sync, Query) this proxy relayed, from its /status (the metrics count those of
/// every proxy of the process: the other tests' too).
async fn requests(proxy: &TestProxy) -> f64 {
    let (_, text) =
        ghostwire::control::call(&proxy.control, None, "GET", "/status", Duration::from_secs(10)).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    status["requests_total"].as_f64().unwrap()
}

async fn wait_for_requests(proxy: &TestProxy, at_least: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while requests(proxy).await < at_least {
        assert!(std::time::Instant::now() < deadline, "pgbench made fewer than {at_least} requests");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// pgbench `-M prepared` through the proxy, 4 clients running `script`, once they have run
/// a while. At a fixed rate: at full speed, two of these beside the other tests take the two
/// cores, and the migrations' lock waits and retries outlast pgbench's run.
struct Pgbench {
    task: tokio::task::JoinHandle<std::process::Output>,
    _script: tempfile::NamedTempFile,
}

impl Pgbench {
    async fn start(db: &TestDb, proxy: &TestProxy, script: &str) -> Pgbench {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), script).unwrap();
        let bin = Cluster::shared().unwrap().binaries().path("pgbench");
        let dbname = db.url.rsplit('/').next().unwrap().to_owned();
        let port = proxy.addr.port().to_string();
        let path = file.path().display().to_string();
        let before = requests(proxy).await;
        let task = tokio::spawn(async move {
            Command::new(bin)
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-n", "-M", "prepared", "-c", "4"])
                .args(["-R", "400", "-T", "15", "-f", &path, &dbname])
                .output()
                .await
                .unwrap()
        });
        wait_for_requests(proxy, before + 200.0).await;
        Pgbench { task, _script: file }
    }

    /// Waits for its end: no client saw an error.
    async fn finish_without_errors(self) {
        let out = self.task.await.unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
        assert!(text.contains("number of failed transactions: 0") || !text.contains("failed"), "{text}");
        assert!(!text.to_lowercase().contains("error"), "{text}");
    }
}

#[tokio::test]
async fn pgbench_prepared_sees_no_error_across_a_swap() {
    let db = TestDb::new().await;
    orders(&db).await;
    let proxy = TestProxy::start(&db.upstream()).await;
    // pgbench's clients have prepared their statements and run them a while.
    let script = format!(
        "\\set id random(1, {ROWS})\nSELECT * FROM orders WHERE id = :id;\nSELECT amount FROM orders WHERE id = :id;\n"
    );
    let bench = Pgbench::start(&db, &proxy, &script).await;
    // The migration does not drain the proxy: each stale statement fails once and its batch
    // (outside a transaction block) is replayed.
    let opts = test_options();
    run_migration(&db.url, "ALTER TABLE orders ALTER COLUMN amount TYPE bigint", &opts, None).await.unwrap();
    let out = common::items::ghostwire(&db.url, &["finish", "orders"], None).await;
    assert!(out.status.success(), "finish: {}", String::from_utf8_lossy(&out.stderr));
    // They run on the new table before the next change.
    wait_for_requests(&proxy, requests(&proxy).await + 200.0).await;
    run_migration(&db.url, "ALTER TABLE orders DROP COLUMN extra", &opts, None).await.unwrap();
    bench.finish_without_errors().await;
    assert!(proxy.status().prepared.replayed >= 1, "{:?}", proxy.status().prepared);
}

#[tokio::test]
async fn inside_a_transaction_the_error_goes_to_the_client_and_a_too_large_value_fails_alone() {
    let db = TestDb::new().await;
    orders(&db).await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let c = connect(&proxy.url_for(&db.url)).await;
    let all = c.prepare("SELECT * FROM orders WHERE id = $1").await.unwrap();
    let col = c.prepare("SELECT amount FROM orders WHERE id = $1").await.unwrap();
    // In a transaction block that has not touched the table, the table changes.
    c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    db.exec("ALTER TABLE orders ADD COLUMN late int").await;
    let err = c.query_one(&all, &[&1i32]).await.expect_err("inside a transaction: the server's error");
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{err:?}");
    c.batch_execute("ROLLBACK").await.unwrap();
    // Outside one, the same statement is replayed.
    let row = c.query_one(&all, &[&1i32]).await.unwrap();
    assert_eq!((row.len(), row.get::<_, i32>(1)), (4, 10));
    // After a widening, a value the client's int4 cannot hold fails that query alone.
    db.exec("ALTER TABLE orders ALTER COLUMN amount TYPE bigint; UPDATE orders SET amount = 5000000000 WHERE id = 2")
        .await;
    let err = c.query_one(&col, &[&2i32]).await.expect_err("out of the client's range");
    assert_eq!(err.code(), Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE), "{err:?}");
    assert_eq!(c.query_one(&col, &[&3i32]).await.unwrap().get::<_, i32>(0), 30);
    let status = proxy.status();
    assert_eq!(status.prepared.errors_passed_on, 1, "{:?}", status.prepared);
}

#[tokio::test]
async fn pgbench_prepared_sees_no_error_across_a_swap_and_its_revert() {
    let db = TestDb::new().await;
    orders(&db).await;
    let proxy = TestProxy::start(&db.upstream()).await;
    // One transaction block a round: the statements are checked after each drain.
    let script = format!(
        "\\set id random(1, {ROWS})\nBEGIN;\nSELECT * FROM orders WHERE id = :id;\nUPDATE orders SET amount = amount + 1 WHERE id = :id;\nEND;\n"
    );
    let bench = Pgbench::start(&db, &proxy, &script).await;
    let opts = Options { proxies: vec![proxy.control.clone()], ..test_options() };
    run_migration(&db.url, "ALTER TABLE orders ALTER COLUMN amount TYPE bigint", &opts, None).await.unwrap();
    // Writes to the new table, then back to the old one with the proxy drained.
    wait_for_requests(&proxy, requests(&proxy).await + 200.0).await;
    let out = common::items::ghostwire(&db.url, &["revert", "orders", "--proxy", &proxy.control], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_requests(&proxy, requests(&proxy).await + 200.0).await;
    bench.finish_without_errors().await;
    // Every client's SELECT was prepared again after each drain, before its next transaction.
    let prepared = proxy.status().prepared;
    assert!(prepared.reprepared >= 8 && prepared.errors_passed_on == 0, "{prepared:?}");
    let ty = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname = 'amount'";
    assert_eq!(common::strings(&db.client, ty).await, ["integer"]);
}
