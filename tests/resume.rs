//! Crashes at any point lose no row and duplicate none: the ghostwire process is killed
//! (SIGKILL, through failpoints) at many points, PostgreSQL is restarted under it once, and
//! Ctrl-C stops it; each time `ghostwire resume` finishes the job, checked against the
//! oracle, with writers running throughout.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::items::{RETYPE, ROWS, assert_matches_oracle, assert_swapped_then_finish, ghostwire};
use common::workload::{Shape, Workload};
use common::{TestDb, debris, strings};
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use tokio::process::Command;

async fn items(client: &tokio_postgres::Client) {
    common::items::create(client, ROWS).await;
}

const SMALL_CHUNKS: [&str; 4] = ["--chunk-rows", "200", "--chunk-time", "5ms"];

async fn resumed_to_the_end(db_url: &str, client: &tokio_postgres::Client, load: Workload) -> String {
    resumed_with(db_url, client, load, &[]).await
}

/// Resumes the migration to its swap and checks the oracle; returns what `resume` printed.
async fn resumed_with(db_url: &str, client: &tokio_postgres::Client, load: Workload, options: &[&str]) -> String {
    load.wait_for_more(20).await; // writes while nothing runs
    let mut args = vec!["resume", "items"];
    args.extend(options);
    let out = ghostwire(db_url, &args, None).await;
    assert!(
        out.status.success(),
        "resume failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    load.wait_for_more(20).await;
    load.stop().await;
    assert_matches_oracle(client).await;
    assert_swapped_then_finish(db_url, client).await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `RETYPE` in small chunks with `jobs` sessions until the failpoint `point` kills it.
async fn migrate_killed_at(url: &str, point: &str, jobs: &str) {
    let mut args = vec!["migrate", "--jobs", jobs];
    args.extend(SMALL_CHUNKS);
    args.push(RETYPE);
    let out = ghostwire(url, &args, Some(point)).await;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{point}: not killed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the migration at `point`, then resumes it.
async fn killed_at(point: &str, expected_phase: &str) {
    killed_with_jobs(point, &[expected_phase], "2").await;
}

/// Kills the migration at `point` with `jobs` sessions at work, then resumes it.
/// The phase recorded must be one of `expected_phases`.
async fn killed_with_jobs(point: &str, expected_phases: &[&str], jobs: &str) {
    let db = TestDb::new().await;
    items(&db.client).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 31);
    load.wait_for_more(20).await;
    migrate_killed_at(&db.url, point, jobs).await;
    let phase = strings(&db.client, "SELECT phase FROM ghostwire.migrations").await;
    assert!(phase.len() == 1 && expected_phases.contains(&phase[0].as_str()), "{point}: {phase:?}");
    let printed = resumed_to_the_end(&db.url, &db.client, load).await;
    if phase[0] != "copy" {
        // Nothing is copied by a run resumed after the copy: no rate to speak of.
        assert!(!printed.contains("rows/s"), "{printed}");
        if phase[0] != "swapped" {
            assert!(printed.contains("rows copied (before this run)"), "{printed}");
        }
    }
}

#[tokio::test]
async fn killed_between_copy_chunks() {
    killed_at("copy.chunk:5", "copy").await;
}

#[tokio::test]
async fn killed_between_a_chunk_and_its_checkpoint() {
    killed_with_jobs("copy.in_chunk:4", &["copy"], "1").await;
}

/// With several jobs, chunks run in recorded rounds: killed inside one chunk of a round
/// (others of the round may have committed), the resumed run copies exactly the ranges not
/// marked done, here with fewer sessions than the round had.
#[tokio::test]
async fn killed_inside_a_round_of_concurrent_chunks() {
    let db = TestDb::new().await;
    items(&db.client).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 33);
    load.wait_for_more(20).await;
    migrate_killed_at(&db.url, "copy.in_chunk:5", "3").await;
    let round = db
        .client
        .query_one("SELECT count(*), count(*) FILTER (WHERE NOT done) FROM ghostwire.copy_round_1", &[])
        .await
        .unwrap();
    assert_eq!(round.get::<_, i64>(0), 3, "the second round of three ranges is recorded");
    assert!(round.get::<_, i64>(1) >= 1, "the killed chunk is not marked done");
    resumed_with(&db.url, &db.client, load, &["--jobs", "1"]).await;
    let jobs = strings(&db.client, "SELECT details->>'jobs' FROM ghostwire.events WHERE kind = 'copy_done'").await;
    assert_eq!(jobs, ["1"], "the resumed copy ran with the resumed run's --jobs");
    let left = strings(&db.client, "SELECT coalesce(to_regclass('ghostwire.copy_round_1')::text, 'gone')").await;
    assert_eq!(left, ["gone"], "the round record ends with the copy");
}

#[tokio::test]
async fn killed_during_the_index_builds() {
    killed_at("index.built:1", "index").await;
}

/// Both indexes built, the key's not yet made the primary key: the resumed run does that.
#[tokio::test]
async fn killed_after_the_index_builds() {
    // Verification starts once the key index exists: the phase is `verify` if the key
    // index was done first.
    killed_with_jobs("index.built:2", &["index", "verify"], "2").await;
}

#[tokio::test]
async fn killed_during_catch_up() {
    killed_at("catchup.batch:1", "catchup").await;
}

#[tokio::test]
async fn killed_during_verification() {
    killed_at("verify.range:1", "verify").await;
}

#[tokio::test]
async fn killed_inside_a_cutover_attempt_holding_the_lock() {
    killed_at("cutover.locked:1", "cutover").await;
}

#[tokio::test]
async fn killed_just_before_the_swap_commits() {
    killed_at("cutover.before_commit:1", "cutover").await;
}

#[tokio::test]
async fn killed_right_after_the_swap_committed() {
    killed_at("cutover.committed:1", "swapped").await;
}

#[tokio::test]
async fn postgres_restarted_mid_copy_is_ridden_out() {
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap());
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    items(&client).await;
    let load = Workload::start_tolerant(&url, Shape::items(), 2, ROWS, 32);
    load.wait_for_more(20).await;
    let url2 = url.clone();
    let migration = tokio::spawn(async move {
        let mut args = vec!["migrate", "--chunk-rows", "100", "--chunk-time", "5ms"];
        args.push(RETYPE);
        ghostwire(&url2, &args, None).await
    });
    // Restart (as a crash: immediate shutdown) once the copy is under way.
    common::wait_for(&client, common::COPY_UNDER_WAY).await;
    let c = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.restart()).await.unwrap().unwrap();
    // The run rides the restart out: it reconnects and goes on from its checkpoint.
    let out = migration.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the run should go on after the restart: {stderr}");
    assert!(stderr.contains("lost the connection to the database in phase copy"), "{stderr}");
    load.wait_for_more(20).await;
    load.stop().await;
    let client = common::connect(&url).await;
    assert_matches_oracle(&client).await;
    assert_swapped_then_finish(&url, &client).await;
}

#[tokio::test]
async fn ctrl_c_stops_at_a_safe_point_and_the_run_resumes() {
    let db = TestDb::new().await;
    items(&db.client).await;
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 33);
    load.wait_for_more(20).await;
    let child = Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["migrate", "--chunk-rows", "50", "--chunk-time", "5ms", RETYPE])
        .env("DATABASE_URL", &db.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while db
        .client
        .query_opt("SELECT rows_copied FROM ghostwire.migrations WHERE phase = 'copy' AND rows_copied > 0", &[])
        .await
        .ok()
        .flatten()
        .is_none()
    {
        assert!(Instant::now() < deadline, "the copy never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let out = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped at a safe point") && stderr.contains("ghostwire resume"), "{stderr}");
    resumed_to_the_end(&db.url, &db.client, load).await;
}

#[tokio::test]
async fn a_migration_whose_shadow_was_dropped_cannot_resume_and_says_to_abort() {
    let db = TestDb::new().await;
    items(&db.client).await;
    let out = ghostwire(&db.url, &["migrate", "--chunk-rows", "200", RETYPE], Some("copy.chunk:3")).await;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    db.exec("DROP TABLE ghostwire_1.items").await;
    let out = ghostwire(&db.url, &["resume", "items"], None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be resumed") && stderr.contains("ghostwire abort"), "{stderr}");
    let out = ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(debris(&db.client, 1).await.is_empty());
    // The same statement again, after a crash: resumed with --yes.
    let out = ghostwire(&db.url, &["migrate", "--chunk-rows", "200", RETYPE], Some("copy.chunk:2")).await;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    let out = ghostwire(&db.url, &["migrate", RETYPE], None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes to resume"));
    let out = ghostwire(&db.url, &["migrate", "--yes", RETYPE], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Done:"));
}

/// Rows of a round's copied ranges change before the resume, with a backlog limit that makes
/// the resumed run apply captured changes between chunks: their entries must survive until
/// the round is complete (applying the backlog drops entries the copy has yet to read).
#[tokio::test]
async fn changes_to_a_copied_range_of_an_unfinished_round_are_kept() {
    let db = TestDb::new().await;
    items(&db.client).await;
    migrate_killed_at(&db.url, "copy.chunk:5", "3").await;
    let done: i64 =
        db.client.query_one("SELECT count(*) FROM ghostwire.copy_round_1 WHERE done", &[]).await.unwrap().get(0);
    assert!(done >= 2, "two chunks of the second round committed before the kill");
    let in_round = "EXISTS (SELECT 1 FROM ghostwire.copy_round_1 r
                             WHERE id > coalesce(r.lower[1]::bigint, 0) AND id <= r.upper[1]::bigint)";
    db.exec(&format!(
        "BEGIN;
         UPDATE items SET note = 'changed after its chunk' WHERE {in_round};
         UPDATE oracle SET note = 'changed after its chunk' WHERE {in_round};
         COMMIT;"
    ))
    .await;
    let out = ghostwire(&db.url, &["resume", "--max-backlog", "10", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_matches_oracle(&db.client).await;
    assert_swapped_then_finish(&db.url, &db.client).await;
}

/// The first chunk of an integer key is found by walking the key index, not stepped by the
/// planner's estimate: a table analyzed at 100 rows and loaded to 20,100 since (autovacuum
/// off) would have its whole copy in the first chunk, one long transaction. Killed after the
/// first chunk's commit, the shadow holds at most the chunk size asked for; resumed, the
/// copy is complete.
#[tokio::test]
async fn the_first_chunk_is_not_sized_by_stale_statistics() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE stale (id int PRIMARY KEY, v int NOT NULL) WITH (autovacuum_enabled = false);
         INSERT INTO stale SELECT g, g FROM generate_series(1, 100) g;
         ANALYZE stale;
         INSERT INTO stale SELECT g, g FROM generate_series(101, 20100) g;",
    )
    .await;
    let change = "ALTER TABLE stale ALTER COLUMN v TYPE bigint";
    let out =
        ghostwire(&db.url, &["migrate", "--jobs", "1", "--chunk-rows", "500", change], Some("copy.chunk:1")).await;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", String::from_utf8_lossy(&out.stderr));
    let copied: i64 = db.client.query_one("SELECT count(*) FROM ghostwire_1.stale", &[]).await.unwrap().get(0);
    assert!((1..=500).contains(&copied), "the first chunk copied {copied} rows");
    let out = ghostwire(&db.url, &["resume", "stale"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sql = "SELECT count(*), sum(v)::int8, pg_typeof(min(v))::text FROM stale";
    let row = db.client.query_one(sql, &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 20_100);
    assert_eq!(row.get::<_, i64>(1), 20_100 * 20_101 / 2);
    assert_eq!(row.get::<_, String>(2), "bigint", "swapped");
}
