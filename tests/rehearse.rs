//! `migrate --rehearse`: every phase but the swap, under writers, then no trace: the table,
//! its catalog and the database's objects are as they were (a fingerprint before and
//! after), the writers saw no error and the table holds what they wrote (the oracle); the
//! report says what was measured and stays in `ghostwire.events`. A rehearsal killed
//! mid-copy resumes as a rehearsal, or is aborted, and leaves no trace either way.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::items::{self, ROWS};
use common::workload::{Shape, Workload};
use common::{TestDb, debris, run_migration, strings, test_options, writes_each_phase};
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use ghostwire::migrate::Options;

/// Everything a user would see of the database's own objects: relations (with their
/// storage: a rewrite changes it), columns, constraints, indexes, triggers, functions and
/// schemas; ghostwire's state schema left out, and temporary tables (a session's own, gone
/// with it: a killed run's server session may still be ending).
async fn fingerprint(client: &tokio_postgres::Client) -> String {
    let sql = "SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
        SELECT 'rel ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text || ' ' || c.relfilenode
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'ghostwire') AND n.nspname NOT LIKE 'pg\\_toast%'
           AND n.nspname NOT LIKE 'pg\\_temp%'
        UNION ALL
        SELECT 'col ' || a.attrelid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relnamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'con ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'idx ' || pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
         WHERE c.relnamespace = 'public'::regnamespace
        UNION ALL
        SELECT 'trg ' || tgrelid::regclass || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
        UNION ALL
        SELECT 'fn ' || p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
        UNION ALL
        SELECT 'ns ' || nspname FROM pg_namespace
         WHERE nspname NOT LIKE 'pg\\_%' AND nspname NOT IN ('information_schema', 'ghostwire')
    ) f(x)";
    client.query_one(sql, &[]).await.unwrap().get::<_, Option<String>>(0).unwrap_or_default()
}

fn rehearsal_options() -> Options {
    Options { rehearse: true, rehearse_baseline: Duration::from_millis(2500), ..test_options() }
}

/// The query README gives for comparing rehearsals.
const COMPARE: &str = "SELECT m.id, m.settings->>'jobs' AS jobs,
       (e.details->>'total_seconds')::float8 AS seconds,
       (e.details->'copy'->>'rows_per_second')::float8 AS copy_rows_per_second,
       (e.details->>'wal_bytes')::float8 AS wal_bytes,
       (e.details->'trial_lock'->>'wait_ms')::float8 AS lock_wait_ms
  FROM ghostwire.migrations m JOIN ghostwire.events e ON e.migration_id = m.id AND e.kind = 'rehearsal'
 ORDER BY m.id";

#[tokio::test]
async fn a_rehearsal_under_writers_changes_nothing_and_reports_what_it_measured() {
    let db = TestDb::new().await;
    let client = db.connect().await;
    items::create(&client, ROWS).await;
    let before = fingerprint(&client).await;
    let load = Workload::start(&db.url, Shape::items(), 2, 1_000_000, 11);
    load.wait_for_more(30).await;
    let hook = writes_each_phase(Arc::clone(&load.counters), 10);
    let outcome = run_migration(&db.url, items::RETYPE, &rehearsal_options(), Some(hook)).await.expect("rehearsal");
    let report = outcome.rehearsal.clone().expect("a rehearsal's report");
    assert!(outcome.swap.is_none(), "nothing was swapped");
    // A second rehearsal with one job, to compare with.
    let one_job = Options { parallel: 1, ..rehearsal_options() };
    let second = run_migration(&db.url, items::RETYPE, &one_job, None).await.expect("second rehearsal");
    load.wait_for_more(20).await;
    load.stop().await;

    assert_eq!(fingerprint(&client).await, before, "the database's objects changed");
    for id in [outcome.id, second.id] {
        assert!(debris(&client, id).await.is_empty(), "{:?}", debris(&client, id).await);
    }
    assert_eq!(
        strings(&client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'").await,
        ["integer"]
    );
    items::assert_matches_oracle(&client).await;
    assert_eq!(
        strings(&client, "SELECT phase || ' ' || (settings->>'rehearsal') FROM ghostwire.migrations ORDER BY id").await,
        ["aborted true", "aborted true"]
    );

    // What was measured.
    assert!(report.copy.as_ref().is_some_and(|c| c.rows >= ROWS && c.rows_per_second > 0.0), "{report:?}");
    assert!(report.wal_bytes > 0.0 && report.extra_disk_bytes > 0, "{report:?}");
    assert!(report.trial_lock.granted && report.trial_lock.wait_ms < report.trial_lock.lock_timeout_ms, "{report:?}");
    let phases: Vec<&str> = report.phases.iter().map(|p| p.phase.as_str()).collect();
    for phase in ["shadow", "capture", "copy", "index", "catchup", "cutover"] {
        assert!(phases.contains(&phase), "{phase} missing from {phases:?}");
    }
    assert!(report.backlog.is_some() && report.writes.during_capture_per_second.is_some(), "{report:?}");
    assert!(report.writes.before_per_second.is_some_and(|w| w > 0.0), "writers were busy: {report:?}");
    assert!(report.plan.as_ref().is_some_and(|p| p.estimated_rows > 0), "{report:?}");
    assert!(report.statement.contains("ALTER TABLE items"), "{report:?}");
    // Kept for SQL.
    let rows = client.query(COMPARE, &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows.iter().map(|r| r.get::<_, Option<String>>(1)).collect::<Vec<_>>(),
        [Some("2".into()), Some("1".into())]
    );
    assert!(rows.iter().all(|r| r.get::<_, Option<f64>>(2).is_some_and(|s| s > 0.0)));
}

#[tokio::test]
async fn a_rehearsal_killed_mid_copy_resumes_as_one_or_aborts_without_a_trace() {
    let db = TestDb::new().await;
    let client = db.connect().await;
    items::create(&client, ROWS).await;
    let before = fingerprint(&client).await;
    let args = ["migrate", "--rehearse", "--chunk-rows", "300", "--chunk-time", "20ms", items::RETYPE];
    let out = items::ghostwire(&db.url, &args, Some("copy.chunk:3")).await;
    assert!(!out.status.success(), "the failpoint kills it");
    assert_eq!(strings(&client, "SELECT phase FROM ghostwire.migrations").await, ["copy"]);
    // Resumed, it is still a rehearsal: it ends without a swap, and without a trace.
    let out = items::ghostwire(&db.url, &["resume", "items", "--json"], None).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "rehearsal", "{last}");
    assert_eq!(last["report"]["resumed_from"], "copy", "{last}");
    assert!(debris(&client, 1).await.is_empty(), "{:?}", debris(&client, 1).await);
    assert_eq!(fingerprint(&client).await, before);
    items::assert_matches_oracle(&client).await;

    // Killed again, then aborted.
    let out = items::ghostwire(&db.url, &args, Some("copy.chunk:2")).await;
    assert!(!out.status.success());
    let out = items::ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(debris(&client, 2).await.is_empty(), "{:?}", debris(&client, 2).await);
    assert_eq!(fingerprint(&client).await, before);
    assert_eq!(strings(&client, "SELECT phase FROM ghostwire.migrations ORDER BY id").await, ["aborted", "aborted"]);
}

#[tokio::test]
async fn the_cli_prints_the_report_and_refuses_what_cannot_be_rehearsed() {
    let db = TestDb::new().await;
    let client = db.connect().await;
    items::create(&client, 2000).await;
    let out = items::ghostwire(&db.url, &["migrate", "--rehearse", items::RETYPE], None).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for expected in
        ["Rehearsal of migration #1", "nothing was swapped", "copy:", "WAL written", "cut-over lock: granted"]
    {
        assert!(text.contains(expected), "{expected:?} missing from\n{text}");
    }
    // A catalog-only change has nothing to rehearse; --finish makes no sense with it.
    let out = items::ghostwire(&db.url, &["migrate", "--rehearse", "ALTER TABLE items ADD COLUMN x int"], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to rehearse"));
    for bad in [
        &["migrate", "--rehearse", "--finish", items::RETYPE][..],
        &["migrate", "--sample", "0.1", items::RETYPE],
        &["migrate", "--rehearse", "--sample", "0", items::RETYPE],
        &["migrate", "--rehearse", "--sample", "1.5", items::RETYPE],
    ] {
        let out = items::ghostwire(&db.url, bad, None).await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A sampled one says so.
    let out = items::ghostwire(&db.url, &["migrate", "--rehearse", "--sample", "0.25", items::RETYPE], None).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("one copy round and one verification range in 4"), "{text}");
    assert_eq!(
        strings(&client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 ORDER BY attnum").await,
        ["bigint", "integer", "text", "text"]
    );
}

#[tokio::test]
async fn a_sampled_rehearsal_copies_a_share_and_projects_the_whole() {
    let db = TestDb::new().await;
    let client = db.connect().await;
    items::create(&client, ROWS).await;
    let before = fingerprint(&client).await;
    // New keys right after the table's: the key range stays dense, so one round in ten of
    // the copy (stepped by key value) is about a tenth of the rows.
    let load = Workload::start(&db.url, Shape::items(), 2, ROWS + 1, 13);
    load.wait_for_more(30).await;
    // Rounds of 2 x 300 rows: one in ten copied; verification ranges of 100 rows, one in ten
    // checked, most of them where the copy skipped (only the shadow's rows are compared).
    let sampled = Options { sample: Some(0.1), verify_range_rows: 100, ..rehearsal_options() };
    let hook = writes_each_phase(Arc::clone(&load.counters), 10);
    let outcome = run_migration(&db.url, items::RETYPE, &sampled, Some(hook)).await.expect("sampled rehearsal");
    let whole = run_migration(&db.url, items::RETYPE, &rehearsal_options(), None).await.expect("whole rehearsal");
    load.wait_for_more(20).await;
    load.stop().await;

    let (s, w) = (outcome.rehearsal.expect("a report"), whole.rehearsal.expect("a report"));
    assert_eq!((s.sample_one_in, w.sample_one_in), (Some(10), None));
    let copied = s.copy.as_ref().map_or(0, |c| c.rows);
    assert!(copied > 0 && copied < ROWS / 3, "copied {copied} of {ROWS} rows");
    assert!(w.copy.as_ref().is_some_and(|c| c.rows >= ROWS));
    assert!(s.projected_seconds > s.total_seconds, "{s:?}");
    eprintln!(
        "projected from one round in ten: {:.2} s (it took {:.2} s); the whole table rehearsed: {:.2} s",
        s.projected_seconds, s.total_seconds, w.projected_seconds
    );
    assert_eq!(fingerprint(&client).await, before, "the database's objects changed");
    for id in [outcome.id, whole.id] {
        assert!(debris(&client, id).await.is_empty(), "{:?}", debris(&client, id).await);
    }
    items::assert_matches_oracle(&client).await;
    assert_eq!(
        strings(&client, "SELECT coalesce(settings->>'sample', '-') FROM ghostwire.migrations ORDER BY id").await,
        ["0.1", "-"]
    );
}

#[tokio::test]
async fn the_trial_lock_names_who_held_the_table_and_replicas_are_watched() {
    let primary = Arc::new(
        tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().expect("a cluster"),
    );
    let with_standby = common::has_client_for_server(&primary, "pg_basebackup", "rehearsal replica lag");
    let url = primary.url("postgres");
    let client = common::connect(&url).await;
    items::create(&client, ROWS).await;
    let standby = if with_standby {
        let p = Arc::clone(&primary);
        let s = tokio::task::spawn_blocking(move || p.start_standby()).await.unwrap().expect("a standby");
        common::wait_for(&client, "SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming'").await;
        Some(s)
    } else {
        None
    };
    let load = Workload::start(&url, Shape::items(), 2, ROWS + 1, 17);
    load.wait_for_more(20).await;
    // As the cut-over phase begins, a session reads the table in a transaction it keeps
    // open until the trial lock is over: the trial lock waits its lock timeout out, and
    // names it; then the clean-up gets the table.
    let holder_url = url.clone();
    let holder_pid = Arc::new(std::sync::Mutex::new(0));
    let pid_seen = Arc::clone(&holder_pid);
    let hook: ghostwire::migrate::PhaseHook = Arc::new(move |phase| {
        let (url, pid_seen) = (holder_url.clone(), Arc::clone(&pid_seen));
        Box::pin(async move {
            if phase != ghostwire::state::Phase::Cutover {
                return;
            }
            let holder = common::connect(&url).await;
            let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
            *pid_seen.lock().unwrap() = pid;
            holder.batch_execute("BEGIN; SELECT count(*) FROM items").await.unwrap();
            tokio::spawn(async move {
                common::wait_for(&holder, "SELECT EXISTS (SELECT 1 FROM ghostwire.events WHERE kind = 'trial_lock')")
                    .await;
                let _ = holder.batch_execute("COMMIT").await;
            });
        })
    });
    let outcome = run_migration(&url, items::RETYPE, &rehearsal_options(), Some(hook)).await.expect("rehearsal");
    load.stop().await;
    let report = outcome.rehearsal.expect("a report");
    let t = &report.trial_lock;
    assert!(!t.granted && t.wait_ms >= t.lock_timeout_ms * 0.9, "{t:?}");
    let pid = *holder_pid.lock().unwrap();
    assert!(t.holders.iter().any(|h| h.pid == pid), "pid {pid} not among {:?}", t.holders);
    assert!(debris(&client, outcome.id).await.is_empty(), "{:?}", debris(&client, outcome.id).await);
    items::assert_matches_oracle(&client).await;
    if standby.is_some() {
        assert_eq!(report.replicas, 1, "{report:?}");
        assert!(report.max_replica_lag_seconds.is_some(), "{report:?}");
    }
}
