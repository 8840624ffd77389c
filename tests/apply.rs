//! `ghostwire apply FILE.sql`: a migration file of every kind of statement, under writers
//! (none waits past the lock timeout plus a margin, the oracle agrees); the same file killed
//! midway and applied again (what finished is skipped, what stopped goes on, nothing twice);
//! a file whose third statement fails, fixed and applied again; transaction control refused.

mod common;

use std::time::Duration;

use common::items::{self, ghostwire};
use common::workload::{Shape, Workload};
use common::{TestDb, strings};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `sql` to a file of its own; returns its path.
fn file(name: &str, sql: &str) -> String {
    let dir = std::env::temp_dir().join(format!("ghostwire-apply-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, sql).unwrap();
    path.display().to_string()
}

const EVERY_KIND: &str = "-- 0042: a flag, its values, NOT NULL, an index, and a wider qty
SET statement_timeout = 0;
CREATE TABLE audit (id bigserial PRIMARY KEY, what text);
ALTER TABLE items ADD COLUMN flag boolean, ALTER COLUMN flag SET DEFAULT false;
UPDATE items SET flag = coalesce(qty > 50000, false) WHERE flag IS NULL;
ALTER TABLE items ALTER COLUMN flag SET NOT NULL;
CREATE INDEX items_flag ON items (flag);
COMMENT ON TABLE items IS 'the items';
INSERT INTO audit (what) VALUES ('0042 applied');
VACUUM audit;
ALTER TABLE items ALTER COLUMN qty TYPE bigint;
";

#[tokio::test]
async fn a_file_of_every_kind_runs_under_writers_and_a_rerun_skips_it() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    // No key updates: a row whose key moves past the backfill's end while it runs is the
    // application's to write (README, backfill), and SET NOT NULL would find it.
    let load = Workload::start(&db.url, Shape { key_updates: false, ..Shape::items() }, 2, items::ROWS, 61);
    load.wait_for_more(20).await;
    let path = file("0042_flag.sql", EVERY_KIND);
    let out = ghostwire(&db.url, &["apply", &path], None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    load.wait_for_more(20).await;
    load.assert_never_waited(Duration::from_millis(1500));
    load.stop().await;
    items::assert_matches_oracle(&db.client).await;
    let text = stdout(&out);
    assert!(text.contains("Done: 10 statement(s), 10 run now"), "{text}");
    for way in [
        "setting (skipped)",
        "] direct:",
        "migrate (instant",
        "] backfill (",
        "migrate (online",
        "outside a transaction",
        "migrate (copy",
    ] {
        assert!(text.contains(way), "{way} not in {text}");
    }
    // Each statement did what it says, the safe way.
    let shape = "SELECT (SELECT attnotnull FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'flag')::text
                     || ' ' || (SELECT count(*) FROM items WHERE flag IS DISTINCT FROM coalesce(qty > 50000, false)) || ' '
                     || (SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_flag'::regclass)::text || ' '
                     || format_type((SELECT atttypid FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'), NULL)
                     || ' ' || obj_description('items'::regclass) || ' ' || (SELECT what FROM audit)";
    let flag_mismatch_ok = strings(&db.client, shape).await;
    // Rows the writers inserted after the backfill take the default (false), which may
    // differ from the formula: count only that the column is NOT NULL, valid, and typed.
    let parts: Vec<&str> = flag_mismatch_ok[0].split(' ').collect();
    assert_eq!(parts[0], "true", "{flag_mismatch_ok:?}");
    assert_eq!(&parts[2..], ["true", "bigint", "the", "items", "0042", "applied"], "{flag_mismatch_ok:?}");
    // The log: each statement once, finished, with its time and (where it locked) its lock.
    let log = "SELECT count(*)::text || ' ' || count(*) FILTER (WHERE finished_at IS NOT NULL AND duration_ms >= 0)::text
                      || ' ' || count(DISTINCT checksum)::text || ' ' || count(*) FILTER (WHERE lock_hold_ms IS NOT NULL)::text
                 FROM ghostwire.applied";
    assert_eq!(strings(&db.client, log).await, ["10 10 10 5"]);
    // The log knows the file by its name: the same file elsewhere is the same file.
    let elsewhere = std::env::temp_dir().join(format!("ghostwire-apply-{}-elsewhere", std::process::id()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let moved = elsewhere.join("0042_flag.sql");
    std::fs::copy(&path, &moved).unwrap();
    let out = ghostwire(&db.url, &["apply", "--json", &moved.display().to_string()], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let last: serde_json::Value = serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!((last["ran"].as_i64(), last["skipped"].as_i64()), (Some(0), Some(10)), "{last}");
    assert_eq!(strings(&db.client, "SELECT count(*)::text FROM ghostwire.applied").await, ["10"]);
    assert_eq!(strings(&db.client, "SELECT count(*)::text FROM audit").await, ["1"]);
}

#[tokio::test]
async fn killed_midway_it_goes_on_where_it_stopped() {
    for failpoint in ["backfill.committed:2", "copy.in_chunk:2"] {
        let db = TestDb::new().await;
        items::create(&db.client, items::ROWS).await;
        let path = file(&format!("0043_{}.sql", failpoint.replace([':', '.'], "_")), EVERY_KIND);
        let out = ghostwire(&db.url, &["apply", &path], Some(failpoint)).await;
        assert!(!out.status.success(), "{failpoint}: it should have been killed");
        let out = ghostwire(&db.url, &["apply", &path], None).await;
        assert!(out.status.success(), "{failpoint}: {}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).contains("skipped: done before"), "{}", stdout(&out));
        items::assert_matches_oracle(&db.client).await;
        // Each statement finished once; the stopped run was resumed, not started again.
        let once =
            "SELECT count(DISTINCT checksum)::text || ' ' || count(*) FILTER (WHERE finished_at IS NOT NULL)::text
                      FROM ghostwire.applied";
        assert_eq!(strings(&db.client, once).await, ["10 10"], "{failpoint}");
        let runs = "SELECT count(*)::text || ' ' || count(*) FILTER (WHERE phase = 'finished')::text FROM ghostwire.migrations";
        assert_eq!(strings(&db.client, runs).await, ["5 5"], "{failpoint}");
        let flags = "SELECT count(*)::text FROM items WHERE flag IS DISTINCT FROM coalesce(qty > 50000, false)";
        assert_eq!(strings(&db.client, flags).await, ["0"], "{failpoint}");
        assert_eq!(strings(&db.client, "SELECT count(*)::text FROM audit").await, ["1"], "{failpoint}");
    }
}

#[tokio::test]
async fn a_failing_third_statement_fixed_then_applied_again() {
    let db = TestDb::new().await;
    items::create(&db.client, 2000).await;
    db.exec("UPDATE items SET note = NULL WHERE id % 10 = 0; UPDATE oracle SET note = NULL WHERE id % 10 = 0").await;
    let broken = "CREATE TABLE tags (id int PRIMARY KEY);\nINSERT INTO tags VALUES (1);\n\n\
                  ALTER TABLE items ALTER COLUMN note SET NOT NULL;\nCOMMENT ON TABLE tags IS 'tags';\n";
    let path = file("0044_tags.sql", broken);
    let out = ghostwire(&db.url, &["apply", &path], None).await;
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("statement 3 (line 4) stopped") && err.contains("existing rows violate"), "{err}");
    assert!(err.contains("The 2 statement(s) before it are done"), "{err}");
    assert_eq!(strings(&db.client, "SELECT count(*)::text FROM tags").await, ["1"]);
    let fixed = broken.replace(
        "ALTER TABLE items ALTER COLUMN note SET NOT NULL;",
        "UPDATE items SET note = '' WHERE note IS NULL;\nALTER TABLE items ALTER COLUMN note SET NOT NULL;",
    );
    std::fs::write(&path, fixed).unwrap();
    let out = ghostwire(&db.url, &["apply", &path], None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("Done: 5 statement(s), 3 run now, 2 done before"), "{}", stdout(&out));
    assert_eq!(strings(&db.client, "SELECT count(*)::text FROM tags").await, ["1"]);
    let notes = "SELECT count(*)::text FROM items WHERE note IS NULL OR note = ''";
    assert_eq!(strings(&db.client, notes).await, ["200"]);
    let failed =
        "SELECT statement_number || ' ' || (error IS NOT NULL)::text FROM ghostwire.applied WHERE finished_at IS NULL";
    assert_eq!(strings(&db.client, failed).await, ["3 true"]);
}

#[tokio::test]
async fn transaction_control_is_refused_unless_one_transaction_is_asked_for() {
    let db = TestDb::new().await;
    items::create(&db.client, 100).await;
    let sql = "BEGIN;\nALTER TABLE items ADD COLUMN a int;\nCREATE TABLE t2 (id int);\nCOMMIT;\n";
    let path = file("0045_tx.sql", sql);
    let out = ghostwire(&db.url, &["apply", &path], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("line 1: BEGIN found") && stderr(&out).contains("--single-transaction"));
    let bad = file("0046_bad.sql", "CREATE TABLE t3 (id int);\nALTER TABLE items ADD COLUMN;\n");
    let out = ghostwire(&db.url, &["apply", &bad], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let untouched = "SELECT (to_regnamespace('ghostwire') IS NULL AND to_regclass('t2') IS NULL AND to_regclass('t3') IS NULL)::text";
    assert_eq!(strings(&db.client, untouched).await, ["true"]);
    let out = ghostwire(&db.url, &["apply", "--single-transaction", &path], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let done = "SELECT (to_regclass('t2') IS NOT NULL)::text || ' ' || way FROM ghostwire.applied";
    assert_eq!(strings(&db.client, done).await, ["true single transaction"]);
    // `plan FILE.sql` shows each statement's way and changes nothing.
    let plan_file =
        file("0047_plan.sql", "ALTER TABLE items ALTER COLUMN qty TYPE bigint;\nUPDATE items SET note = 'x';\n");
    let out = ghostwire(&db.url, &["plan", &plan_file], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("migrate, copy") && text.contains("backfill: about") && text.contains("plainly ACCESS EXCLUSIVE"),
        "{text}"
    );
}
