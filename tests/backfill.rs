//! `ghostwire backfill`: an UPDATE or DELETE in keyset batches. Under writers the result is
//! checked row by row against an oracle and a log of who wrote each row last (a trigger
//! records every write, and the checkpoint the writer saw); a run killed inside a batch or
//! between batches resumes without writing any row twice; each throttle signal holds it;
//! `--dry-run` and every refusal change nothing.

mod common;

use std::time::Duration;

use common::items::{self, ghostwire};
use common::running::Running;
use common::workload::{Shape, Workload};
use common::{TestDb, strings};
use ghostwire::ephemeral::{Cluster, ClusterOptions};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every insert or update of `items`, in order: by the backfill or not, and the backfill's
/// checkpoint (its last committed key) when the write happened.
const WRITE_LOG: &str = "
    CREATE TABLE writes (seq bigserial PRIMARY KEY, id bigint, by_backfill boolean, checkpoint bigint);
    CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE cp bigint;
    BEGIN
        IF to_regclass('ghostwire.migrations') IS NOT NULL THEN
            EXECUTE 'SELECT checkpoint[1]::bigint FROM ghostwire.migrations WHERE strategy = ''backfill''
                      ORDER BY id DESC LIMIT 1' INTO cp;
        END IF;
        INSERT INTO writes (id, by_backfill, checkpoint)
        VALUES (NEW.id, current_setting('application_name') LIKE 'ghostwire backfill%', cp);
        RETURN NULL;
    END $$;
    CREATE TRIGGER log_write AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION log_write();";

const FILL: &str = "UPDATE items SET note = 'filled ' || id WHERE note IS NULL OR note LIKE 'v1%'";

/// Rows that break what the backfill promises: a row the backfill wrote last holds its value
/// and the writers' other columns; any other row holds exactly the writers' values; and a
/// row the writers never touched, within the key range fixed at the start, does not match
/// the condition any more. (A row a writer changed back into matching after its batch
/// looked at it is the writer's to keep; the checkpoint it saw cannot tell that apart from
/// a batch about to come, so only the untouched rows say whether a batch skipped one.)
const BROKEN: &str = "
    WITH last AS (SELECT DISTINCT ON (id) id, by_backfill, checkpoint FROM writes ORDER BY id, seq DESC),
         e AS (SELECT copy_end[1]::bigint AS e FROM ghostwire.migrations WHERE strategy = 'backfill')
    SELECT coalesce(i.id, o.id)::text FROM items i FULL JOIN oracle o USING (id) LEFT JOIN last l USING (id), e
     WHERE (CASE WHEN l.by_backfill THEN
                i.id IS NOT NULL AND o.id IS NOT NULL AND i.note = 'filled ' || i.id
                AND i.qty IS NOT DISTINCT FROM o.qty AND i.payload IS NOT DISTINCT FROM o.payload
            ELSE
                (i.id, i.qty, i.note, i.payload) IS NOT DISTINCT FROM (o.id, o.qty, o.note, o.payload)
                AND NOT (l.id IS NULL AND i.id <= e.e AND (i.note IS NULL OR i.note LIKE 'v1%'))
            END) IS NOT TRUE
     ORDER BY 1 LIMIT 10";

#[tokio::test]
async fn a_backfill_under_writers_keeps_every_write() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    db.exec("UPDATE items SET note = NULL WHERE id % 3 = 0; UPDATE oracle SET note = NULL WHERE id % 3 = 0;").await;
    db.exec(WRITE_LOG).await;
    let shape = Shape { key_updates: false, ..Shape::items() };
    let load = Workload::start(&db.url, shape, 2, items::ROWS, 91);
    load.wait_for_more(20).await;
    let out = ghostwire(&db.url, &["backfill", "--batch-rows", "100", "--batch-time", "20ms", FILL], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    load.wait_for_more(20).await;
    load.assert_never_waited(Duration::from_millis(1500));
    load.stop().await;
    assert_eq!(strings(&db.client, BROKEN).await, Vec::<String>::new());
    // It changed rows, in many batches, and none beyond the key fixed at the start.
    let filled = "SELECT (count(*) > 1000)::text FROM writes WHERE by_backfill";
    assert_eq!(strings(&db.client, filled).await, ["true"]);
    let beyond = "SELECT count(*)::text FROM writes w, ghostwire.migrations m
                   WHERE w.by_backfill AND w.id > m.copy_end[1]::bigint";
    assert_eq!(strings(&db.client, beyond).await, ["0"]);
    let twice =
        "SELECT count(*)::text FROM (SELECT id FROM writes WHERE by_backfill GROUP BY id HAVING count(*) > 1) t";
    assert_eq!(strings(&db.client, twice).await, ["0"]);
    let m = "SELECT phase || ' ' || (rows_copied = (SELECT count(*) FROM writes WHERE by_backfill))::text
               FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, m).await, ["finished true"]);
    let done = "SELECT (details->>'batches')::int > 20 FROM ghostwire.events WHERE kind = 'backfill_done'";
    assert_eq!(strings(&db.client, &format!("SELECT ({done})::text")).await, ["true"]);
}

#[tokio::test]
async fn killed_in_or_between_batches_it_resumes_writing_each_row_once() {
    for failpoint in ["backfill.batch:4", "backfill.committed:4"] {
        let db = TestDb::new().await;
        items::create(&db.client, 3000).await;
        db.exec(WRITE_LOG).await;
        // Not idempotent: a batch run twice would add twice.
        let add = "UPDATE items SET qty = qty + 100000";
        let args = ["backfill", "--batch-rows", "100", "--batch-time", "10ms", add];
        let out = ghostwire(&db.url, &args, Some(failpoint)).await;
        assert!(!out.status.success(), "{failpoint}: it should have been killed");
        let state = "SELECT phase || ' ' || (rows_copied > 0)::text FROM ghostwire.migrations";
        assert_eq!(strings(&db.client, state).await, ["backfill true"], "{failpoint}");
        // A second backfill of the table waits for this one to be resumed or aborted.
        let again = ghostwire(&db.url, &["backfill", add], None).await;
        assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
        assert!(stderr(&again).contains("ghostwire resume public.items"), "{}", stderr(&again));
        let out = ghostwire(&db.url, &["resume", "items"], None).await;
        assert!(out.status.success(), "{failpoint}: {}", stderr(&out));
        let once = "SELECT count(*)::text || ' ' || count(DISTINCT id)::text FROM writes WHERE by_backfill";
        assert_eq!(strings(&db.client, once).await, ["3000 3000"], "{failpoint}");
        let sums = "SELECT count(*)::text FROM items i JOIN oracle o USING (id) WHERE i.qty = o.qty + 100000";
        assert_eq!(strings(&db.client, sums).await, ["3000"], "{failpoint}");
        let state = "SELECT phase || ' ' || rows_copied FROM ghostwire.migrations";
        assert_eq!(strings(&db.client, state).await, ["finished 3000"], "{failpoint}");
    }
}

#[tokio::test]
async fn a_rerun_writes_nothing_and_abort_ends_a_stopped_run() {
    let db = TestDb::new().await;
    items::create(&db.client, 3000).await;
    db.exec(WRITE_LOG).await;
    let set = "UPDATE items SET note = 'done', payload = NULL WHERE id % 2 = 0";
    let out = ghostwire(&db.url, &["backfill", "--batch-rows", "200", set], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("updated 1,500 row(s)"));
    // The same statement again: every row is already so, and the filter skips it.
    let out = ghostwire(&db.url, &["backfill", "--batch-rows", "200", set], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("updated 0 row(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(strings(&db.client, "SELECT count(*)::text FROM writes").await, ["1500"]);
    // A DELETE, stopped midway, then aborted: the batches done stay done, and a new run may
    // start.
    let delete = "DELETE FROM items WHERE qty % 5 = 0";
    let out =
        ghostwire(&db.url, &["backfill", "--batch-rows", "100", "--json", delete], Some("backfill.committed:2")).await;
    assert!(!out.status.success());
    let out = ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let left = "SELECT count(*)::text FROM items WHERE qty % 5 = 0";
    let remaining: i64 = strings(&db.client, left).await[0].parse().unwrap();
    assert!(remaining > 0 && remaining < 600, "{remaining}");
    let out = ghostwire(&db.url, &["backfill", "--json", delete], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let done: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(done["event"], "done", "{stdout}");
    assert_eq!(done["outcome"]["rows_changed"], remaining, "{stdout}");
    assert_eq!(strings(&db.client, left).await, ["0"]);
    let phases = "SELECT string_agg(phase, ',' ORDER BY id) FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, phases).await, ["finished,finished,aborted,finished"]);
}

async fn stands_still(run: &mut Running, reason: &str) -> i64 {
    let p = run.wait_until(reason, |p| p["throttled"].as_str().is_some_and(|t| t.contains(reason))).await;
    let before = p["rows_changed"].as_i64().unwrap_or(-1);
    // Held: a few polls later, still nothing more done.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = run.progress().await;
        assert_eq!(now["rows_changed"].as_i64(), Some(before), "it went on while {reason}: {now}");
    }
    before
}

#[tokio::test]
async fn each_throttle_signal_holds_the_batches() {
    // A cluster of its own: a replication slot and the signals are the whole cluster's.
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await.unwrap().unwrap();
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    items::create(&client, 4000).await;
    client.batch_execute("CREATE TABLE gate (hold boolean); INSERT INTO gate VALUES (true);").await.unwrap();
    let fill = "UPDATE items SET note = 'x' || id";
    let mut run = Running::start(
        &url,
        &["backfill", "--batch-rows", "20", "--batch-time", "5ms", "--throttle-query", "SELECT hold FROM gate", fill],
    )
    .await;
    assert_eq!(stands_still(&mut run, "the throttle query returned true").await, 0);
    client.batch_execute("UPDATE gate SET hold = false").await.unwrap();
    run.wait_until("batches", |p| p["rows_changed"].as_i64().unwrap_or(0) > 0).await;
    client.batch_execute("UPDATE gate SET hold = true").await.unwrap();
    let held = stands_still(&mut run, "the throttle query returned true").await;
    assert!(held > 0 && held < 4000, "{held}");
    // The operator's pause comes before the query; resume takes it back.
    run.cli(&["pause"]).await;
    assert_eq!(stands_still(&mut run, "paused by the operator").await, held);
    run.cli(&["resume"]).await;
    stands_still(&mut run, "the throttle query returned true").await;
    // A replica gone away (its physical slot inactive), once a lag limit is set live.
    client.batch_execute("SELECT pg_create_physical_replication_slot('gone')").await.unwrap();
    run.cli(&["settings", "max_replica_lag_ms=300"]).await;
    assert_eq!(stands_still(&mut run, "the replica of slot gone is not connected").await, held);
    client.batch_execute("SELECT pg_drop_replication_slot('gone')").await.unwrap();
    // Active sessions: one waits on a lock another holds.
    client.batch_execute("CREATE TABLE blocker ()").await.unwrap();
    let holder = common::connect(&url).await;
    holder.batch_execute("BEGIN; LOCK TABLE blocker IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let waiter = common::connect(&url).await;
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT count(*) FROM blocker").await.map(|_| ()) });
    run.cli(&["settings", "max_active=0"]).await;
    assert_eq!(stands_still(&mut run, "active sessions (limit 0)").await, held);
    holder.batch_execute("COMMIT").await.unwrap();
    let _ = waiting.await;
    run.cli(&["settings", "max_active=null", "throttle_query=null"]).await;
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    assert_eq!(strings(&client, "SELECT count(*)::text FROM items WHERE note = 'x' || id").await, ["4000"]);
    let reasons = "SELECT string_agg(DISTINCT split_part(details->>'reason', ' (', 1), '; ') FROM ghostwire.events
                    WHERE kind = 'throttle_start'";
    let reasons = strings(&client, reasons).await.join("");
    for r in
        ["paused by the operator", "the throttle query returned true", "the replica of slot gone", "active sessions"]
    {
        assert!(reasons.contains(r), "{reasons}");
    }
}

#[tokio::test]
async fn a_dry_run_and_every_refusal_change_nothing() {
    let db = TestDb::new().await;
    items::create(&db.client, 3000).await;
    db.exec("CREATE TABLE nokey (a int); CREATE TABLE parts (id bigint PRIMARY KEY, item bigint)").await;
    let untouched = "SELECT (to_regnamespace('ghostwire') IS NULL
                            AND NOT EXISTS (SELECT FROM items i JOIN oracle o USING (id)
                                            WHERE (i.qty, i.note) IS DISTINCT FROM (o.qty, o.note)))::text";
    let dry =
        ghostwire(&db.url, &["backfill", "--dry-run", "UPDATE items SET note = 'n' WHERE qty <= 1000"], None).await;
    assert!(dry.status.success(), "{}", stderr(&dry));
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(text.contains("would update about") && text.contains("Nothing was changed"), "{text}");
    assert!(text.contains("IS DISTINCT FROM ('n')"), "{text}");
    let counted = ghostwire(
        &db.url,
        &["backfill", "--dry-run", "--count", "--json", "UPDATE items SET note = 'n' WHERE qty <= 1000"],
        None,
    )
    .await;
    assert!(counted.status.success(), "{}", stderr(&counted));
    let report: serde_json::Value = serde_json::from_slice(&counted.stdout).unwrap();
    assert_eq!(report["report"]["exact_rows"], 1000, "{report}");
    assert_eq!(report["report"]["key"], serde_json::json!(["id"]), "{report}");
    let again = ghostwire(&db.url, &["backfill", "--dry-run", "UPDATE items SET qty = qty + 1"], None).await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("reads what it sets"));
    assert_eq!(strings(&db.client, untouched).await, ["true"]);

    for (sql, why) in [
        ("SELECT * FROM items", "this is a SELECT statement"),
        ("ALTER TABLE items ADD COLUMN x int", "this is an ALTER TABLE statement"),
        ("UPDATE items SET note = 'a'; UPDATE items SET note = 'b'", "2 statements given"),
        ("UPDATE nokey SET a = 1", "no primary key or unique index"),
        ("UPDATE items SET id = id + 10000", "part of the key"),
        ("UPDATE items SET note = 'a' RETURNING id", "RETURNING is not supported"),
        ("UPDATE items SET note = 'a' LIMIT 10", "LIMIT is not PostgreSQL syntax"),
        ("DELETE FROM items WHERE id IN (SELECT id FROM items LIMIT 5) LIMIT 5", "LIMIT"),
        (
            "WITH gone AS (DELETE FROM parts RETURNING item) UPDATE items SET note = 'a' WHERE id IN (SELECT item FROM gone)",
            "writes (DELETE)",
        ),
        ("UPDATE items SET nope = 1", "no column \"nope\""),
        ("UPDATE items SET note = $1", "parameters"),
        ("UPDATE items SET qty = 'many'", "does not run on"),
        ("DELETE FROM missing WHERE true", "does not exist"),
    ] {
        let out = ghostwire(&db.url, &["backfill", sql], None).await;
        assert_eq!(out.status.code(), Some(2), "{sql}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{sql}: {}", stderr(&out));
    }
    assert_eq!(strings(&db.client, untouched).await, ["true"]);
}

#[tokio::test]
async fn quoted_names_and_a_composite_key() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE SCHEMA "Sales";
           CREATE TABLE "Sales"."Order Items" ("Tenant" int, "Seq" bigint, "Note" text, PRIMARY KEY ("Tenant", "Seq"));
           INSERT INTO "Sales"."Order Items" SELECT g % 7, g, NULL FROM generate_series(1, 2000) g;"#,
    )
    .await;
    let fill = r#"UPDATE "Sales"."Order Items" AS oi SET "Note" = 'x' || oi."Seq" WHERE oi."Tenant" < 3"#;
    let out = ghostwire(&db.url, &["backfill", "--batch-rows", "70", fill], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let done = r#"SELECT count(*) FILTER (WHERE "Note" = 'x' || "Seq")::text || ' ' || count(*) FILTER (WHERE "Note" IS NULL)::text
                    FROM "Sales"."Order Items""#;
    let expected: Vec<String> = strings(
        &db.client,
        r#"SELECT count(*) FILTER (WHERE "Tenant" < 3)::text || ' ' || count(*) FILTER (WHERE "Tenant" >= 3)::text
             FROM "Sales"."Order Items""#,
    )
    .await;
    assert_eq!(strings(&db.client, done).await, expected);
    let status = ghostwire(&db.url, &["status"], None).await;
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(text.contains(r#""Sales"."Order Items": phase finished, backfill:"#), "{text}");
}
