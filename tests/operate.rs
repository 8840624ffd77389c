//! Operating a long migration: live control (pause, resume, settings, postponed cut-over),
//! each throttle signal, the progress output and the metrics, with writers running and the
//! oracle checked at the end.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::items::{self, RETYPE, assert_matches_oracle, ghostwire};
use common::running::Running;
use common::workload::{Shape, Workload};
use common::{TestDb, assert_same_rows, strings};
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use serde_json::Value;

fn rows(p: &Value) -> i64 {
    p["rows_copied"].as_i64().unwrap_or(0)
}

fn throttled(p: &Value) -> &str {
    p["throttled"].as_str().unwrap_or("")
}

/// While the run is throttled, rows copied stays where it is: checked across `commits` more
/// writer transactions (time passing, and the capture busy meanwhile).
async fn assert_copy_stands_still(run: &mut Running, load: &Workload, reason: &str) -> i64 {
    let p = run.wait_until(reason, |p| throttled(p).contains(reason)).await;
    assert_eq!(p["phase"], "copy", "{p}");
    let before = rows(&p);
    load.wait_for_more(150).await;
    let p = run.progress().await;
    assert!(throttled(&p).contains(reason), "{p}");
    assert_eq!(rows(&p), before, "rows were copied while throttled ({reason}): {p}");
    before
}

/// The value of an unlabelled series in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn event_kinds(client: &tokio_postgres::Client) -> Vec<String> {
    strings(client, "SELECT kind FROM ghostwire.events ORDER BY id").await
}

/// The query README.md gives operators for "which step was slow, how long was the table
/// locked", taken from the README itself.
fn readme_events_query() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("<!-- events-query -->").expect("README marks the events query");
    let end = readme.find("<!-- /events-query -->").expect("README marks the end of the events query");
    let block = &readme[start..end];
    let sql = block.split("```sql").nth(1).and_then(|b| b.split("```").next()).expect("a ```sql block");
    sql.to_owned()
}

#[tokio::test]
async fn pause_live_settings_resume_and_a_postponed_cutover() {
    let db = TestDb::new().await;
    items::create(&db.client, 40_000).await;
    let load = Workload::start(&db.url, Shape::items(), 2, 40_000, 41);
    let mut run = Running::start(
        &db.url,
        &["migrate", "--chunk-rows", "100", "--chunk-time", "5ms", "--postpone-cutover", RETYPE],
    )
    .await;
    run.wait_until("the copy to start", |p| p["phase"] == "copy" && rows(p) >= 300).await;

    assert!(run.cli(&["pause"]).await.contains("paused"));
    let paused_at = assert_copy_stands_still(&mut run, &load, "paused by the operator").await;
    assert!(paused_at < 40_000);
    // The state in the database says so too, and `status` shows it.
    assert_eq!(strings(&db.client, "SELECT throttled FROM ghostwire.migrations").await, ["paused by the operator"]);
    let out = ghostwire(&db.url, &["status", "items"], None).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("throttled: paused by the operator"));
    assert!(run.cli(&["status"]).await.contains("throttled: paused by the operator"));

    // Settings change without a restart: bigger chunks once resumed.
    let shown = run.cli(&["settings", "chunk_rows=1000", "chunk_time_ms=100"]).await;
    assert!(shown.contains("\"chunk_rows\": 1000"), "{shown}");
    assert_eq!(run.status().await["settings"]["chunk_rows"], 1000);
    assert!(run.cli(&["resume"]).await.contains("resumed"));
    let p = run.wait_until("chunks larger than the old limit", |p| p["chunk_rows"].as_i64().unwrap_or(0) > 100).await;
    assert!(throttled(&p).is_empty(), "{p}");
    assert!(rows(&p) > paused_at, "{p}");

    // The copy ends; the cut-over waits for the operator while the shadow is kept in step.
    let p = run.wait_until("the postponed cut-over", |p| p["awaiting_cutover"] == true).await;
    assert_eq!(p["phase"], "catchup");
    assert!(run.cli(&["status"]).await.contains("ready for the cut-over"));
    assert_eq!(p["cutover_attempts"], 0);
    // Kept in step: captured changes go on being applied while it waits.
    let applied_before = metric(&run.get("/metrics").await, "ghostwire_changes_applied_total");
    load.wait_for_more(300).await;
    let deadline = std::time::Instant::now() + common::running::PATIENCE;
    while metric(&run.get("/metrics").await, "ghostwire_changes_applied_total") <= applied_before {
        assert!(std::time::Instant::now() < deadline, "no captured change applied while the cut-over waits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = run.progress().await;
    assert_eq!((p["phase"].as_str(), p["cutover_attempts"].as_i64()), (Some("catchup"), Some(0)), "{p}");

    assert!(run.cli(&["cutover"]).await.contains("cut-over allowed"));
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    assert!(ended.stdout.iter().any(|l| l.contains("Done:")), "{}", ended.output());
    load.stop().await;
    assert_matches_oracle(&db.client).await;

    let kinds = event_kinds(&db.client).await;
    for kind in ["throttle_start", "throttle_end", "cutover_postponed", "cutover_allowed", "cutover_attempt"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} event in {kinds:?}");
    }
    let phases = strings(&db.client, "SELECT phase FROM ghostwire.events WHERE kind = 'phase' ORDER BY id").await;
    assert_eq!(phases, ["shadow", "capture", "copy", "index", "verify", "catchup", "catchup", "cutover", "swapped"]);

    // The README's query answers "which step was slow, how long was the table locked".
    let sql = readme_events_query();
    let rows = db.client.simple_query(&sql).await.unwrap_or_else(|e| panic!("the README's query fails: {e:?}\n{sql}"));
    let text: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).unwrap_or("").to_owned()).collect())
            }
            _ => None,
        })
        .collect();
    for phase in ["copy", "catchup", "cutover"] {
        assert!(text.iter().any(|r| r.first().map(String::as_str) == Some(phase)), "no {phase} in {text:?}");
    }
    assert!(
        text.iter().any(|r| r.iter().any(|c| c.contains("swapped")) && r.iter().any(|c| c.parse::<f64>().is_ok())),
        "no cut-over lock timing in {text:?}"
    );
}

#[tokio::test]
async fn a_throttle_query_holds_the_copy_and_fails_closed() {
    let db = TestDb::new().await;
    items::create(&db.client, 8000).await;
    db.exec("CREATE TABLE gate (hold boolean); INSERT INTO gate VALUES (true);").await;
    let load = Workload::start(&db.url, Shape::items(), 2, 8000, 42);
    let mut run = Running::start(
        &db.url,
        &["migrate", "--chunk-rows", "100", "--chunk-time", "5ms", "--throttle-query", "SELECT hold FROM gate", RETYPE],
    )
    .await;
    // Held before the first chunk.
    assert_eq!(assert_copy_stands_still(&mut run, &load, "the throttle query returned true").await, 0);
    // A query that cannot run holds the copy too (fails closed).
    db.exec("DROP TABLE gate").await;
    assert_eq!(assert_copy_stands_still(&mut run, &load, "the throttle query failed").await, 0);
    db.exec("CREATE TABLE gate (hold boolean); INSERT INTO gate VALUES (false);").await;
    run.wait_until("the copy to go on", |p| throttled(p).is_empty() && rows(p) > 0).await;
    // A new throttle query, set live, holds it again; clearing it lets it finish.
    run.cli(&["settings", "throttle_query=SELECT true"]).await;
    let held = assert_copy_stands_still(&mut run, &load, "the throttle query returned true").await;
    assert!(held > 0);
    run.cli(&["settings", "throttle_query=null"]).await;
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    load.stop().await;
    assert_matches_oracle(&db.client).await;
    let reasons = strings(
        &db.client,
        "SELECT details->>'reason' FROM ghostwire.events WHERE kind = 'throttle_start' ORDER BY id",
    )
    .await;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[1].starts_with("the throttle query failed") && reasons[1].contains("gate"), "{reasons:?}");
}

#[tokio::test]
async fn active_sessions_throttle_and_a_critical_limit_aborts_the_run_cleanly() {
    // A cluster of its own: the signal counts the whole cluster's sessions.
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap();
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    items::create(&client, 8000).await;
    client.batch_execute("CREATE TABLE blocker ()").await.unwrap();
    let load = Workload::start(&url, Shape::items(), 2, 8000, 43);
    // Three sessions stay active, waiting on a lock another transaction holds.
    let holder = common::connect(&url).await;
    holder.batch_execute("BEGIN; LOCK TABLE blocker IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let c = common::connect(&url).await;
        waiters.push(tokio::spawn(async move { c.simple_query("SELECT count(*) FROM blocker").await.map(|_| ()) }));
    }
    let mut run =
        Running::start(&url, &["migrate", "--chunk-rows", "100", "--chunk-time", "5ms", "--max-active", "2", RETYPE])
            .await;
    assert_eq!(assert_copy_stands_still(&mut run, &load, "active sessions (limit 2)").await, 0);

    // A critical limit, set live, aborts the run: everything it made is removed.
    run.cli(&["settings", "critical_active=2"]).await;
    let ended = run.wait().await;
    assert_eq!(ended.status.code(), Some(1), "{}", ended.output());
    assert!(ended.stderr.contains("critical limit 2") && ended.stderr.contains("removed"), "{}", ended.output());
    let state = strings(&client, "SELECT phase || ': ' || error FROM ghostwire.migrations").await;
    assert_eq!(state.len(), 1);
    assert!(state[0].starts_with("aborted: ") && state[0].contains("active sessions"), "{state:?}");
    assert!(event_kinds(&client).await.iter().any(|k| k == "critical"));
    assert!(common::debris(&client, 1).await.is_empty(), "{:?}", common::debris(&client, 1).await);
    load.wait_for_more(50).await; // the table is as it was, and in use
    assert_same_rows(&client, "SELECT id, qty, note, payload FROM items", "SELECT * FROM oracle").await;

    // Once the cause is gone, the migration runs again from the start.
    holder.batch_execute("COMMIT").await.unwrap();
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    let out = ghostwire(&url, &["migrate", RETYPE], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    load.stop().await;
    assert_matches_oracle(&client).await;
}

#[tokio::test]
async fn a_paused_copy_stops_and_catch_up_keeps_the_backlog_bounded_once_resumed() {
    let db = TestDb::new().await;
    items::create(&db.client, 40_000).await;
    let load = Workload::start(&db.url, Shape::items(), 2, 40_000, 44);
    let mut run = Running::start(
        &db.url,
        &["migrate", "--chunk-rows", "100", "--chunk-time", "5ms", "--max-backlog", "300", RETYPE],
    )
    .await;
    run.wait_until("the copy to start", |p| p["phase"] == "copy" && rows(p) >= 200).await;
    run.cli(&["pause"]).await;
    let paused_at = assert_copy_stands_still(&mut run, &load, "paused").await;
    // The writers go on: the backlog grows well past the limit while nothing is applied.
    let p = run.wait_until("the backlog to grow", |p| p["backlog"].as_i64().unwrap_or(0) > 1500).await;
    assert_eq!(rows(&p), paused_at, "{p}");
    run.cli(&["resume"]).await;
    // Catch-up runs between chunks: the backlog comes down below the limit during the copy,
    // and stays bounded while the copy goes on.
    let p = run.wait_until("the backlog to come down", |p| p["backlog"].as_i64().unwrap_or(i64::MAX) < 300).await;
    let mut highest = 0;
    let mut copied = rows(&p);
    loop {
        let p = run.progress().await;
        if p["phase"] != "copy" {
            break;
        }
        highest = highest.max(p["backlog"].as_i64().unwrap_or(0));
        copied = copied.max(rows(&p));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(copied > paused_at);
    assert!(highest < 1500, "the backlog reached {highest} after catch-up started");
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    load.stop().await;
    assert_matches_oracle(&db.client).await;
    let reasons =
        strings(&db.client, "SELECT details->>'reason' FROM ghostwire.events WHERE kind = 'throttle_start'").await;
    assert!(reasons.iter().any(|r| r.contains("captured changes waiting (limit 300)")), "{reasons:?}");
    let during =
        strings(&db.client, "SELECT message FROM ghostwire.events WHERE kind = 'index_done' AND phase = 'copy'").await;
    assert_eq!(during.len(), 1, "the key index is built once, during the copy: {during:?}");
}

#[tokio::test]
async fn replica_lag_throttles_until_the_standby_replays() {
    let primary =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    if !common::has_client_for_server(&primary, "pg_basebackup", "replica_lag_throttles_until_the_standby_replays") {
        return;
    }
    let url = primary.url("postgres");
    let client = common::connect(&url).await;
    items::create(&client, 60_000).await;
    let p = Arc::clone(&primary);
    let standby = tokio::task::spawn_blocking(move || p.start_standby()).await.unwrap().unwrap();
    let replica = common::connect(&standby.url("postgres")).await;
    common::wait_for(&client, "SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming'").await;
    let load = Workload::start(&url, Shape::items(), 2, 60_000, 45);
    let mut run = Running::start(
        &url,
        &["migrate", "--chunk-rows", "100", "--chunk-time", "5ms", "--max-replica-lag", "300ms", RETYPE],
    )
    .await;
    run.wait_until("the copy to start", |p| p["phase"] == "copy" && rows(p) >= 200).await;
    // The operator's pause holds the copy while the standby's lag builds up (the copy could
    // otherwise end before 300 ms of lag exist); the lag, judged first, then names the hold, and
    // it goes on holding the copy once the operator resumes.
    assert!(run.cli(&["pause"]).await.contains("paused"));
    replica.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();
    run.wait_until("the replica lag to show", |p| throttled(p).contains("behind (limit 300 ms)")).await;
    assert!(run.cli(&["resume"]).await.contains("resumed"));
    assert_copy_stands_still(&mut run, &load, "behind (limit 300 ms)").await;
    replica.batch_execute("SELECT pg_wal_replay_resume()").await.unwrap();
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    load.stop().await;
    assert_matches_oracle(&client).await;
    let ends = strings(&client, "SELECT message FROM ghostwire.events WHERE kind = 'throttle_end'").await;
    assert!(ends.iter().any(|m| m.contains("replica")), "{ends:?}");

    // A replica that went away entirely (its physical slot is inactive) holds the run too.
    let out = ghostwire(&url, &["finish", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    client.batch_execute("SELECT pg_create_physical_replication_slot('gone')").await.unwrap();
    let load = Workload::start(&url, Shape::items(), 1, 100_000, 49);
    let mut run = Running::start(
        &url,
        &["migrate", "--max-replica-lag", "300ms", "ALTER TABLE items ALTER COLUMN qty TYPE numeric"],
    )
    .await;
    assert_copy_stands_still(&mut run, &load, "the replica of slot gone is not connected").await;
    client.batch_execute("SELECT pg_drop_replication_slot('gone')").await.unwrap();
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    load.stop().await;
    assert_matches_oracle(&client).await;
}

#[tokio::test]
async fn json_lines_and_metrics() {
    let db = TestDb::new().await;
    items::create(&db.client, 5000).await;
    let load = Workload::start(&db.url, Shape::items(), 1, 5000, 46);
    let mut run = Running::start(
        &db.url,
        &["migrate", "--json", "--chunk-rows", "100", "--chunk-time", "5ms", "--postpone-cutover", RETYPE],
    )
    .await;
    run.wait_until("the postponed cut-over", |p| p["awaiting_cutover"] == true).await;
    let metrics = run.get("/metrics").await;
    for name in [
        "ghostwire_rows_copied_total",
        "ghostwire_chunk_seconds",
        "ghostwire_backlog",
        "ghostwire_throttled_seconds_total",
        "ghostwire_changes_applied_total",
        "ghostwire_throttled_seconds_total{reason=\"paused\"} 0",
        "ghostwire_cutover_attempts_total{outcome=\"swapped\"} 0",
    ] {
        assert!(metrics.contains(name), "no {name} in\n{metrics}");
    }
    assert!(metric(&metrics, "ghostwire_rows_copied_total") > 4000.0, "{metrics}");
    run.cli(&["cutover"]).await;
    let addr = run.addr.clone();
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    load.stop().await;
    let lines: Vec<Value> = ended
        .stdout
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let events: Vec<&str> = lines.iter().filter_map(|v| v["event"].as_str()).collect();
    for e in ["phase", "progress", "note", "done"] {
        assert!(events.contains(&e), "no {e} event in {events:?}");
    }
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "done", "{last}");
    assert!(last["rows_copied"].as_i64().unwrap() > 4000, "{last}");
    assert!(lines.iter().any(|v| v["event"] == "progress" && v["rows"].as_i64().is_some()));
    // The control API is gone with the process.
    assert!(ghostwire::control::call(&addr, None, "GET", "/status", Duration::from_secs(2)).await.is_err());
    assert_matches_oracle(&db.client).await;
}

#[tokio::test]
async fn plain_lines_when_piped_and_bars_on_a_terminal() {
    let db = TestDb::new().await;
    items::create(&db.client, 3000).await;
    let out = ghostwire(&db.url, &["migrate", "--chunk-rows", "100", "--chunk-time", "5ms", RETYPE], None).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("[copy] ") && l.contains("rows/s")), "{stdout}");
    assert!(!stdout.contains('\u{1b}'), "escape codes in piped output: {stdout}");
    ghostwire(&db.url, &["finish", "items"], None).await;

    // On a terminal (`script` gives the process one): bars, and the summary intact.
    // With writers, so notes ("applied … captured changes") print between the bars.
    let load = Workload::start(&db.url, Shape::items(), 1, 3000, 47);
    let statement = "ALTER TABLE items ALTER COLUMN qty TYPE numeric";
    let command =
        format!("{} migrate --chunk-rows 100 --chunk-time 5ms '{statement}'", env!("CARGO_BIN_EXE_ghostwire"));
    let out = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("DATABASE_URL", &db.url)
        .env("TERM", "xterm")
        .output()
        .await
        .expect("run script (util-linux)");
    load.stop().await;
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains('\u{1b}') && tty.contains("[copy] ") && tty.contains(" rows in "), "{tty}");
    // Each finished phase and each note is a line of its own; the summary starts a line.
    assert!(tty.contains("[verify] comparing") && tty.contains("\nDone:"), "{tty}");
    assert!(!tty.contains(" of ~"), "plain lines on a terminal: {tty}");
}

#[tokio::test]
async fn abort_through_the_control_api_removes_everything() {
    let db = TestDb::new().await;
    items::create(&db.client, 4000).await;
    let load = Workload::start(&db.url, Shape::items(), 2, 4000, 48);
    let mut run = Running::start(
        &db.url,
        &["migrate", "--chunk-rows", "100", "--chunk-time", "5ms", "--postpone-cutover", RETYPE],
    )
    .await;
    run.wait_until("the postponed cut-over", |p| p["awaiting_cutover"] == true).await;
    assert!(run.cli(&["abort"]).await.contains("abort requested"));
    let ended = run.wait().await;
    assert_eq!(ended.status.code(), Some(1), "{}", ended.output());
    assert!(ended.stderr.contains("was aborted") && ended.stderr.contains("removed"), "{}", ended.output());
    assert_eq!(strings(&db.client, "SELECT phase FROM ghostwire.migrations").await, ["aborted"]);
    assert!(common::debris(&db.client, 1).await.is_empty(), "{:?}", common::debris(&db.client, 1).await);
    load.wait_for_more(50).await;
    load.stop().await;
    // The table is untouched: the old type, every row as the writers left it.
    let ty = strings(&db.client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'").await;
    assert_eq!(ty, ["integer"]);
    assert_same_rows(&db.client, "SELECT * FROM items", "SELECT * FROM oracle").await;
}
