//! The revert window: after the swap, `ghostwire revert` goes back to the old table, kept in
//! step by reverse capture, without losing a write. Under the concurrent-writer oracle (every
//! write mirrored into an oracle table in the same transaction), for both capture modes.

mod common;

use common::items::{self, RETYPE, ROWS, ghostwire};
use common::workload::{Shape, Workload};
use common::{TestDb, assert_same_rows, debris, strings};

fn ok(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn column_type(db: &TestDb, column: &str) -> String {
    strings(
        &db.client,
        &format!(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = '{column}'"
        ),
    )
    .await
    .remove(0)
}

#[tokio::test]
async fn a_revert_under_writes_brings_back_every_write() {
    for capture in ["trigger", "logical"] {
        let db = TestDb::new().await;
        items::create(&db.client, ROWS).await;
        let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 61);
        load.wait_for_more(20).await;
        ok(&ghostwire(&db.url, &["migrate", "--capture", capture, "--chunk-rows", "500", RETYPE], None).await);
        assert_eq!(column_type(&db, "qty").await, "bigint");
        assert_eq!(strings(&db.client, "SELECT phase FROM ghostwire.migrations").await, ["swapped"]);
        // Writes to the new table during the window.
        load.wait_for_more(100).await;
        let said = ok(&ghostwire(&db.url, &["revert", "items"], None).await);
        assert!(said.contains("the old table is live again"), "{said}");
        assert_eq!(column_type(&db, "qty").await, "integer", "{capture}: the old table is back");
        load.wait_for_more(50).await;
        load.stop().await;
        items::assert_matches_oracle(&db.client).await;
        assert_eq!(strings(&db.client, "SELECT phase FROM ghostwire.migrations").await, ["reverted"]);
        ok(&ghostwire(&db.url, &["finish", "items"], None).await);
        assert!(debris(&db.client, 1).await.is_empty(), "{capture}: {:?}", debris(&db.client, 1).await);
    }
}

#[tokio::test]
async fn a_value_beyond_the_old_type_stops_the_revert_with_the_row_named() {
    let db = TestDb::new().await;
    items::create(&db.client, 2000).await;
    ok(&ghostwire(&db.url, &["migrate", RETYPE], None).await);
    db.exec(
        "INSERT INTO items VALUES (900001, 3000000000, 'big', NULL); UPDATE items SET qty = qty + 1 WHERE id <= 10",
    )
    .await;
    let out = ghostwire(&db.url, &["revert", "items"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("(900001)") && stderr.contains("column qty"), "{stderr}");
    // Nothing live changed; the window is open.
    assert_eq!(column_type(&db, "qty").await, "bigint");
    assert_eq!(strings(&db.client, "SELECT phase FROM ghostwire.migrations").await, ["swapped"]);
    db.exec("DELETE FROM items WHERE id = 900001").await;
    ok(&ghostwire(&db.url, &["revert", "items"], None).await);
    assert_eq!(column_type(&db, "qty").await, "integer");
    let rows = "SELECT count(*)::text FROM items WHERE id <= 10 AND qty = id + 1";
    assert_eq!(strings(&db.client, rows).await, ["10"]);
    assert!(strings(&db.client, "SELECT id::text FROM items WHERE id = 900001").await.is_empty());
}

#[tokio::test]
async fn dropped_and_added_columns_go_back_with_the_old_values_kept() {
    let db = TestDb::new().await;
    items::create(&db.client, 2000).await;
    ok(&ghostwire(
        &db.url,
        &[
            "migrate",
            "--yes",
            "ALTER TABLE items DROP COLUMN note, ADD COLUMN extra int DEFAULT 7, ALTER COLUMN qty TYPE bigint",
        ],
        None,
    )
    .await);
    db.exec(
        "UPDATE items SET qty = -qty, extra = 8 WHERE id <= 100;
         DELETE FROM items WHERE id BETWEEN 101 AND 110;
         INSERT INTO items (id, qty, payload) VALUES (5001, 1, 'new');
         UPDATE items SET id = 6001 WHERE id = 111",
    )
    .await;
    ok(&ghostwire(&db.url, &["revert", "items"], None).await);
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT CASE WHEN id = 111 THEN 6001 ELSE id END, CASE WHEN id <= 100 THEN -qty ELSE qty END,
                CASE WHEN id = 111 THEN NULL ELSE note END, payload
           FROM oracle WHERE id NOT BETWEEN 101 AND 110
         UNION ALL SELECT 5001, 1, NULL, 'new'",
    )
    .await;
    let cols = "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped";
    assert_eq!(strings(&db.client, cols).await, ["id,qty,note,payload"]);
}

#[tokio::test]
async fn a_rename_through_a_version_schema_is_reverted_by_dropping_the_schema() {
    let db = TestDb::new().await;
    items::create(&db.client, 500).await;
    let rename = "ALTER TABLE items RENAME COLUMN qty TO amount";
    ok(&ghostwire(&db.url, &["migrate", "--version-schema", "app_v2", rename], None).await);
    db.exec("UPDATE app_v2.items SET amount = 0 WHERE id = 1").await;
    let said = ok(&ghostwire(&db.url, &["revert", "items"], None).await);
    assert!(said.contains("the table never changed"), "{said}");
    assert!(strings(&db.client, "SELECT nspname::text FROM pg_namespace WHERE nspname = 'app_v2'").await.is_empty());
    assert_eq!(strings(&db.client, "SELECT qty::text FROM items WHERE id = 1").await, ["0"]);
}

#[tokio::test]
async fn foreign_keys_both_ways_views_and_the_identity_sequence_survive_a_revert() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE customers (id int PRIMARY KEY);
         INSERT INTO customers SELECT g FROM generate_series(1, 10) g;
         CREATE TABLE orders (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, qty int NOT NULL,
                              customer_id int NOT NULL REFERENCES customers (id));
         INSERT INTO orders (qty, customer_id) SELECT g, 1 + g % 9 FROM generate_series(1, 1000) g;
         CREATE TABLE shipments (id serial PRIMARY KEY, order_id int NOT NULL REFERENCES orders (id));
         INSERT INTO shipments (order_id) SELECT g FROM generate_series(1, 100) g;
         CREATE VIEW big_orders AS SELECT id, qty FROM orders WHERE qty > 500;",
    )
    .await;
    ok(&ghostwire(&db.url, &["migrate", "ALTER TABLE orders ALTER COLUMN qty TYPE bigint"], None).await);
    // During the window: rows inserted (identity values used), a customer whose orders are
    // gone deleted (the kept old table must not stop it), a shipment of a new order.
    db.exec(
        "INSERT INTO orders (qty, customer_id) SELECT 2000 + g, 10 FROM generate_series(1, 5) g;
         DELETE FROM orders WHERE customer_id = 9 AND id NOT IN (SELECT order_id FROM shipments);
         DELETE FROM shipments WHERE order_id IN (SELECT id FROM orders WHERE customer_id = 9);
         DELETE FROM orders WHERE customer_id = 9;
         DELETE FROM customers WHERE id = 9;
         INSERT INTO shipments (order_id) SELECT max(id) FROM orders;",
    )
    .await;
    ok(&ghostwire(&db.url, &["revert", "orders"], None).await);
    let qty = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname = 'qty'";
    assert_eq!(strings(&db.client, qty).await, ["integer"]);
    // The identity sequence hands out no value already used; the foreign keys hold both ways.
    db.exec("INSERT INTO orders (qty, customer_id) VALUES (1, 1); INSERT INTO shipments (order_id) SELECT max(id) FROM orders")
        .await;
    // 1,005 values were used (1,000, then 5 during the window): the next is 1,006.
    assert_eq!(strings(&db.client, "SELECT max(id)::text FROM orders").await, ["1006"]);
    let fks = "SELECT conname::text || ':' || convalidated FROM pg_constraint WHERE contype = 'f' AND connamespace = 'public'::regnamespace ORDER BY 1";
    assert_eq!(strings(&db.client, fks).await, ["orders_customer_id_fkey:true", "shipments_order_id_fkey:true"]);
    let refs = "SELECT confrelid::regclass::text FROM pg_constraint WHERE conname = 'shipments_order_id_fkey'";
    assert_eq!(strings(&db.client, refs).await, ["orders"]);
    let bad = db.client.batch_execute("INSERT INTO shipments (order_id) VALUES (999999)").await;
    assert!(bad.is_err(), "the foreign key to the reverted table is enforced");
    let through_view = strings(&db.client, "SELECT count(*)::text FROM big_orders").await;
    assert_eq!(through_view, strings(&db.client, "SELECT count(*)::text FROM orders WHERE qty > 500").await);
    assert_eq!(through_view, ["449"], "500 over 500, 56 of them customer 9's, 5 added");
    let deps = "SELECT DISTINCT refobjid::regclass::text FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                 WHERE r.ev_class = 'big_orders'::regclass AND d.refobjid <> 'big_orders'::regclass";
    assert_eq!(strings(&db.client, deps).await, ["orders"]);
    ok(&ghostwire(&db.url, &["finish", "orders"], None).await);
    assert!(debris(&db.client, 1).await.is_empty(), "{:?}", debris(&db.client, 1).await);
}

#[tokio::test]
async fn a_revert_killed_in_its_catch_up_or_its_swap_goes_on_when_run_again() {
    for point in ["revert.batch", "revert.locked", "revert.before_commit", "revert.committed"] {
        let db = TestDb::new().await;
        items::create(&db.client, ROWS).await;
        let load = Workload::start(&db.url, Shape::items(), 2, ROWS, 62);
        ok(&ghostwire(&db.url, &["migrate", RETYPE], None).await);
        load.wait_for_more(50).await;
        let killed = ghostwire(&db.url, &["revert", "items"], Some(point)).await;
        assert_eq!(killed.status.code(), None, "{point}: the failpoint should kill the revert");
        load.wait_for_more(20).await;
        let said = ok(&ghostwire(&db.url, &["revert", "items"], None).await);
        assert!(said.contains("Reverted"), "{point}: {said}");
        load.wait_for_more(20).await;
        load.stop().await;
        items::assert_matches_oracle(&db.client).await;
        assert_eq!(column_type(&db, "qty").await, "integer", "{point}");
        ok(&ghostwire(&db.url, &["finish", "items"], None).await);
        assert!(debris(&db.client, 1).await.is_empty(), "{point}: {:?}", debris(&db.client, 1).await);
    }
}

#[tokio::test]
async fn a_revert_window_on_migrate_reverts_on_request_or_closes_by_itself() {
    let db = TestDb::new().await;
    items::create(&db.client, 2000).await;
    let mut run = common::running::Running::start(&db.url, &["migrate", "--revert-window", "10min", RETYPE]).await;
    common::wait_for(&db.client, "SELECT phase = 'swapped' FROM ghostwire.migrations").await;
    db.exec("UPDATE items SET qty = 0 WHERE id = 1").await;
    // `ghostwire revert --control ADDR` is `POST /revert`; paused first, the revert's
    // catch-up waits, and `/status` shows it.
    run.cli(&["pause"]).await;
    assert!(run.cli(&["revert"]).await.contains("revert requested"));
    let p = run.wait_until("the paused revert", |p| p["phase"] == "reverting" && !p["throttled"].is_null()).await;
    assert!(p["throttled"].as_str().unwrap_or("").contains("paused"), "{p}");
    assert_eq!(column_type(&db, "qty").await, "bigint", "held by the pause");
    run.cli(&["resume"]).await;
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    assert!(ended.output().contains("the old table is live again"), "{}", ended.output());
    assert_eq!(column_type(&db, "qty").await, "integer");
    assert_eq!(strings(&db.client, "SELECT qty::text FROM items WHERE id = 1").await, ["0"]);
    ok(&ghostwire(&db.url, &["finish", "items"], None).await);

    // A window that runs out closes as finish does.
    let run = common::running::Running::start(&db.url, &["migrate", "--revert-window", "1s", RETYPE]).await;
    let ended = run.wait().await;
    assert!(ended.status.success(), "{}", ended.output());
    assert_eq!(column_type(&db, "qty").await, "bigint");
    let phases = strings(&db.client, "SELECT phase FROM ghostwire.migrations ORDER BY id").await;
    assert_eq!(phases, ["finished", "finished"]);
    assert!(debris(&db.client, 2).await.is_empty(), "{:?}", debris(&db.client, 2).await);
}

#[tokio::test]
async fn a_lock_held_too_long_makes_the_revert_give_up_with_the_window_open() {
    let db = TestDb::new().await;
    items::create(&db.client, 1000).await;
    ok(&ghostwire(&db.url, &["migrate", RETYPE], None).await);
    let holder = common::connect(&db.url).await;
    holder.batch_execute("BEGIN; SELECT count(*) FROM items").await.unwrap();
    let out = ghostwire(&db.url, &["revert", "items", "--lock-timeout", "50ms", "--cutover-attempts", "2"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not swap back after 2 attempt(s)"));
    assert_eq!(strings(&db.client, "SELECT phase FROM ghostwire.migrations").await, ["swapped"]);
    assert_eq!(column_type(&db, "qty").await, "bigint");
    holder.batch_execute("COMMIT").await.unwrap();
    ok(&ghostwire(&db.url, &["revert", "items"], None).await);
    assert_eq!(column_type(&db, "qty").await, "integer");
}
