//! Lost connections are ridden out, never waited on forever: ghostwire's backends
//! terminated, and the server restarted, in each phase (throttled and not), while writers
//! change the table; the run goes on from its last checkpoint in the same process, or stops
//! resumable within `--reconnect-timeout`; an abort from elsewhere stops it at once.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::items::{self, RETYPE, assert_matches_oracle};
use common::running::Running;
use common::workload::{Shape, Workload};
use common::{TestDb, connect, debris, run_migration, strings, test_options};
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use ghostwire::migrate::PhaseHook;
use ghostwire::state::Phase;

/// The phases a hook can act at before the swap.
const PHASES: [Phase; 7] =
    [Phase::Shadow, Phase::Capture, Phase::Copy, Phase::Index, Phase::Verify, Phase::Catchup, Phase::Cutover];

const TERMINATE: &str = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                          WHERE datname = current_database() AND application_name LIKE 'ghostwire%'
                            AND pid <> pg_backend_pid()";

/// A hook that runs `act` once at the start of each phase in `PHASES`, after `writes` more
/// writer commits.
fn once_per_phase<F, Fut>(load: &Workload, act: F) -> (PhaseHook, Arc<Mutex<BTreeSet<Phase>>>)
where
    F: Fn(Phase) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let done = Arc::new(Mutex::new(BTreeSet::new()));
    let (seen, counters, act) = (Arc::clone(&done), Arc::clone(&load.counters), Arc::new(act));
    let hook: PhaseHook = Arc::new(move |phase| {
        let (seen, counters, act) = (Arc::clone(&seen), Arc::clone(&counters), Arc::clone(&act));
        Box::pin(async move {
            common::workload::wait_for_more(&counters, 5).await;
            if PHASES.contains(&phase) && seen.lock().unwrap().insert(phase) {
                act(phase).await;
            }
        })
    });
    (hook, done)
}

#[tokio::test]
async fn terminated_sessions_in_every_phase_are_ridden_out() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    let load = Workload::start(&db.url, Shape::items(), 2, items::ROWS, 41);
    load.wait_for_more(20).await;
    let admin = Arc::new(db.connect().await);
    let a = Arc::clone(&admin);
    let (hook, hit) = once_per_phase(&load, move |_phase| {
        let a = Arc::clone(&a);
        async move {
            let ended: i64 = a.query_one(TERMINATE, &[]).await.unwrap().get(0);
            assert!(ended > 0, "no ghostwire session to end");
        }
    });
    let outcome = run_migration(&db.url, RETYPE, &test_options(), Some(hook)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(outcome.swap.is_some() && outcome.resumed_from.is_none());
    load.wait_for_more(20).await;
    load.stop().await;
    assert_eq!(hit.lock().unwrap().len(), PHASES.len());
    assert_matches_oracle(&db.client).await;
    let reconnects =
        strings(&db.client, "SELECT count(*)::text FROM ghostwire.events WHERE kind = 'reconnected'").await;
    assert_eq!(reconnects, [PHASES.len().to_string()]);
}

#[tokio::test]
async fn server_restarts_in_every_phase_are_ridden_out() {
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    let url = cluster.url("postgres");
    let client = connect(&url).await;
    items::create(&client, items::ROWS).await;
    // Writers that reconnect too, so the oracle keeps being written through the restarts.
    let load = Workload::start_tolerant(&url, Shape::items(), 2, items::ROWS, 43);
    load.wait_for_more(20).await;
    let c = Arc::clone(&cluster);
    let (hook, hit) = once_per_phase(&load, move |_phase| {
        let c = Arc::clone(&c);
        async move { tokio::task::spawn_blocking(move || c.restart()).await.unwrap().expect("restart") }
    });
    let outcome = run_migration(&url, RETYPE, &test_options(), Some(hook)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(outcome.swap.is_some());
    load.wait_for_more(20).await;
    load.stop().await;
    assert_eq!(hit.lock().unwrap().len(), PHASES.len());
    let client = connect(&url).await;
    assert_matches_oracle(&client).await;
    items::assert_swapped_then_finish(&url, &client).await;
}

#[tokio::test]
async fn a_throttled_run_rides_out_terminated_sessions_then_stops_at_once_for_an_abort() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    let mut run = Running::start(
        &db.url,
        &["migrate", "--yes", "--chunk-rows", "500", "--throttle-query", "SELECT true", RETYPE],
    )
    .await;
    run.wait_until("throttled by the query", |p| p["throttled"].as_str().is_some_and(|r| r.contains("throttle query")))
        .await;
    let ended: i64 = db.client.query_one(TERMINATE, &[]).await.unwrap().get(0);
    assert!(ended > 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while strings(&db.client, "SELECT count(*)::text FROM ghostwire.events WHERE kind = 'reconnected'").await != ["1"] {
        assert!(Instant::now() < deadline, "no reconnection: {:?}", run.stdout());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.wait_until("throttled again after reconnecting", |p| {
        p["throttled"].as_str().is_some_and(|r| r.contains("throttle query"))
    })
    .await;
    let out = items::ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let aborted = Instant::now();
    let ended = run.wait().await;
    assert!(aborted.elapsed() < Duration::from_secs(1), "took {:?} to stop", aborted.elapsed());
    assert_eq!(ended.status.code(), Some(1), "{}", ended.output());
    assert!(ended.stderr.contains("aborted by `ghostwire abort` from elsewhere"), "{}", ended.output());
    assert!(debris(&db.client, 1).await.is_empty());
}

#[tokio::test]
async fn a_server_down_longer_than_the_timeout_stops_the_run_resumable() {
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    let url = cluster.url("postgres");
    let client = connect(&url).await;
    items::create(&client, items::ROWS).await;
    drop(client);
    let mut run = Running::start(
        &url,
        &[
            "migrate",
            "--yes",
            "--reconnect-timeout",
            "2s",
            "--chunk-rows",
            "500",
            "--throttle-query",
            "SELECT true",
            RETYPE,
        ],
    )
    .await;
    run.wait_until("throttled in the copy", |p| p["throttled"].is_string() && p["phase"] == "copy").await;
    let c = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.stop()).await.unwrap();
    let stopped = Instant::now();
    let ended = run.wait().await;
    let took = stopped.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "stopped after {took:?}");
    assert_eq!(ended.status.code(), Some(1), "{}", ended.output());
    assert!(
        ended.stderr.contains("could not get it back within 2 s")
            && ended.stderr.contains("`ghostwire resume public.items`"),
        "{}",
        ended.output()
    );
    let c = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.restart()).await.unwrap().unwrap();
    let out = items::ghostwire(&url, &["resume", "items"], None).await;
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let client = connect(&url).await;
    assert_matches_oracle(&client).await;
    items::assert_swapped_then_finish(&url, &client).await;
}
