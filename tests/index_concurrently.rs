//! `migrate "CREATE [UNIQUE] INDEX …"`, `"DROP INDEX …"` and `"REINDEX INDEX …"` run
//! concurrently whatever the user wrote: under writers that are never blocked (the build is
//! made slow enough that a plain CREATE INDEX would block them for seconds), named as the
//! plain statement names them, with progress shown; and a failed build (a duplicate, a
//! cancel, a wait for a long transaction given up, the process killed) leaves no invalid
//! index behind.

mod common;

use std::time::Duration;

use common::items::{self, ghostwire};
use common::workload::{Shape, Workload};
use common::{TestDb, strings, wait_for};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const INVALID: &str = "SELECT count(*)::text FROM pg_index WHERE NOT indisvalid";

/// The definitions of a table's indexes, with its name taken out.
async fn indexes(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT replace(pg_get_indexdef(indexrelid), '{table}', 'T') || ' valid=' || indisvalid
           FROM pg_index WHERE indrelid = '{table}'::regclass ORDER BY 1"
    );
    strings(client, &sql).await
}

#[tokio::test]
async fn an_index_is_built_concurrently_under_writes_as_the_plain_statement_names_it() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    db.exec(items::SLOW_FN).await;
    db.exec(
        "CREATE TABLE twin (LIKE items INCLUDING ALL); ALTER INDEX twin_qty_idx RENAME TO twin_qty;
         CREATE INDEX ON twin (slow(id)); CREATE UNIQUE INDEX twin_id_note ON twin (id) INCLUDE (note) WHERE id > 0;",
    )
    .await;
    let load = Workload::start(&db.url, Shape::items(), 2, items::ROWS, 81);
    load.wait_for_more(20).await;
    // The plan accepts it, and says what a plain run would lock.
    let out = ghostwire(&db.url, &["plan", "--json", "CREATE INDEX ON items (slow(id))"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON plan");
    assert_eq!(plan["strategy"], "online", "{plan}");
    assert_eq!(plan["steps"][0]["naive"]["mode"], "SHARE", "{plan}");
    let out = ghostwire(&db.url, &["migrate", "--json", "CREATE INDEX ON items (slow(id))"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(r#""event":"progress""#) && stdout.contains(r#""phase":"index""#), "{stdout}");
    let out = ghostwire(
        &db.url,
        &["migrate", "CREATE UNIQUE INDEX items_id_note ON items (id) INCLUDE (note) WHERE id > 0"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    load.wait_for_more(20).await;
    load.assert_never_waited(Duration::from_millis(1000));
    load.stop().await;
    assert_eq!(indexes(&db.client, "items").await, indexes(&db.client, "twin").await);
    let m = "SELECT string_agg(phase || ':' || strategy, ',' ORDER BY id) FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, m).await, ["finished:online,finished:online"]);
    items::assert_matches_oracle(&db.client).await;
}

#[tokio::test]
async fn a_duplicate_a_cancel_and_a_long_transaction_leave_no_invalid_index() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    db.exec(items::SLOW_FN).await;
    db.exec("UPDATE items SET qty = 7 WHERE id IN (3, 4)").await;
    let before = indexes(&db.client, "items").await;

    // A duplicate: the build fails, its invalid index is dropped, the key is named.
    let out = ghostwire(&db.url, &["migrate", "CREATE UNIQUE INDEX ON items (qty)"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("Key (qty)=(7) is duplicated"), "{}", stderr(&out));
    assert_eq!(strings(&db.client, INVALID).await, ["0"]);

    // Cancelled midway (by someone else): dropped again.
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["migrate", "CREATE INDEX ON items (slow(id))"])
        .env("DATABASE_URL", &db.url)
        .env_remove("GHOSTWIRE_FAILPOINT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ghostwire");
    // (The view shows every database's builds: only this one's is cancelled.)
    let ours = "FROM pg_stat_progress_create_index WHERE datname = current_database()";
    wait_for(&db.client, &format!("SELECT EXISTS (SELECT {ours} AND blocks_done > 0)")).await;
    db.exec(&format!("SELECT pg_cancel_backend(pid) {ours}")).await;
    let out = child.wait_with_output().await.expect("ghostwire ends");
    assert_eq!(out.status.code(), Some(1), "{} {}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(stderr(&out).contains("canceling statement") && stderr(&out).contains("was dropped"), "{}", stderr(&out));
    assert_eq!(strings(&db.client, INVALID).await, ["0"]);

    // Blocked by an older transaction (an open REPEATABLE READ snapshot), then given up.
    let long = db.connect().await;
    long.batch_execute(
        "SET application_name = 'long-report'; BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM oracle",
    )
    .await
    .unwrap();
    let long_pid: i32 = long.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let out =
        ghostwire(&db.url, &["migrate", "--build-wait-timeout", "2s", "CREATE INDEX ON items (note)"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let named = format!("pid {long_pid} (long-report, user ");
    assert!(stderr(&out).contains(&named) && stderr(&out).contains("gave up"), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("waiting for pid"), "the wait is reported while it lasts: {said}");
    long.batch_execute("COMMIT").await.unwrap();
    assert_eq!(strings(&db.client, INVALID).await, ["0"]);
    assert_eq!(indexes(&db.client, "items").await, before, "no index is left behind");
    let phases = "SELECT string_agg(phase, ',' ORDER BY id) FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, phases).await, ["aborted,aborted,aborted"]);
}

#[tokio::test]
async fn an_invalid_index_of_the_same_name_is_replaced_only_with_consent() {
    let db = TestDb::new().await;
    items::create(&db.client, 1000).await;
    db.exec("UPDATE items SET qty = 7 WHERE id IN (3, 4)").await;
    assert!(db.client.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY items_lookup ON items (qty)").await.is_err());
    assert_eq!(strings(&db.client, INVALID).await, ["1"]);
    let create = "CREATE INDEX items_lookup ON items (note)";
    let out = ghostwire(&db.url, &["plan", create], None).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists and is invalid"), "{out:?}");
    let out = ghostwire(&db.url, &["migrate", create], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("pass --yes"), "{}", stderr(&out));
    assert_eq!(strings(&db.client, INVALID).await, ["1"], "nothing changed");
    let out = ghostwire(&db.url, &["migrate", "--yes", create], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let def = "SELECT pg_get_indexdef('items_lookup'::regclass) || ' ' || indisvalid FROM pg_index WHERE indexrelid = 'items_lookup'::regclass";
    assert_eq!(strings(&db.client, def).await, ["CREATE INDEX items_lookup ON public.items USING btree (note) true"]);
    // IF NOT EXISTS on a valid one: nothing to do.
    let out = ghostwire(&db.url, &["migrate", "CREATE INDEX IF NOT EXISTS items_lookup ON items (qty)"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(strings(&db.client, def).await, ["CREATE INDEX items_lookup ON public.items USING btree (note) true"]);
}

#[tokio::test]
async fn drop_and_reindex_run_concurrently() {
    let db = TestDb::new().await;
    items::create(&db.client, 1000).await;
    let node = "SELECT relfilenode::text FROM pg_class WHERE relname = 'items_qty'";
    let before = strings(&db.client, node).await;
    let out = ghostwire(&db.url, &["migrate", "REINDEX INDEX items_qty"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(strings(&db.client, node).await, before, "rebuilt");
    assert_eq!(strings(&db.client, INVALID).await, ["0"]);
    let out = ghostwire(&db.url, &["migrate", "DROP INDEX items_qty"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(strings(&db.client, node).await.is_empty(), "dropped");
    let kinds = "SELECT string_agg(kind, ',' ORDER BY id) FROM ghostwire.events WHERE kind LIKE 'index%'";
    assert_eq!(strings(&db.client, kinds).await, ["index_rebuilt,index_dropped"]);
}

#[tokio::test]
async fn a_build_killed_midway_resumes_or_aborts_leaving_nothing() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    db.exec(items::SLOW_FN).await;
    let ours = "SELECT string_agg(c.relname || ':' || i.indisvalid, ',' ORDER BY 1) FROM pg_index i
                  JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname LIKE 'items_slow%'";
    let out = ghostwire(&db.url, &["migrate", "CREATE INDEX ON items (slow(id))"], Some("in_place.building")).await;
    assert!(out.status.code().is_none(), "killed at the failpoint: {}", stderr(&out));
    let out = ghostwire(&db.url, &["resume", "items"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(strings(&db.client, ours).await, ["items_slow_idx:true"], "built once, under its name");

    let out = ghostwire(&db.url, &["migrate", "CREATE INDEX ON items (slow(qty))"], Some("in_place.building")).await;
    assert!(out.status.code().is_none(), "{}", stderr(&out));
    let out = ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(strings(&db.client, ours).await, ["items_slow_idx:true"], "the aborted build is gone");
    assert_eq!(strings(&db.client, INVALID).await, ["0"]);
}
