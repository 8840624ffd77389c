//! Online recipes in place: a CHECK or FOREIGN KEY constraint is added NOT VALID (a short
//! lock) and validated (reads and writes go on), with no copy of the table; violating data
//! removes the constraint again and names a failing row.

mod common;

use common::items::{self, ghostwire};
use common::workload::{Shape, Workload};
use common::{TestDb, debris, strings};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_check_constraint_is_added_in_place_under_writes() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    let load = Workload::start(&db.url, Shape::items(), 2, items::ROWS, 71);
    load.wait_for_more(20).await;
    let out = ghostwire(
        &db.url,
        &[
            "migrate",
            "ALTER TABLE items ALTER COLUMN note SET STATISTICS 150, ADD CONSTRAINT id_positive CHECK (id > 0)",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    load.wait_for_more(20).await;
    load.stop().await;
    let valid = "SELECT convalidated::text FROM pg_constraint WHERE conname = 'id_positive'";
    assert_eq!(strings(&db.client, valid).await, ["true"]);
    let target = "SELECT attstattarget::text FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'note'";
    assert_eq!(strings(&db.client, target).await, ["150"]);
    // No copy: no shadow was made, nothing was copied, and the steps are events.
    let kinds = "SELECT string_agg(DISTINCT kind, ',' ORDER BY kind) FROM ghostwire.events WHERE kind LIKE 'constraint%' OR kind = 'statement'";
    assert_eq!(strings(&db.client, kinds).await, ["constraint_added,constraint_validated,statement"]);
    let m = "SELECT phase || ':' || rows_copied FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, m).await, ["finished:0"]);
    assert!(debris(&db.client, 1).await.is_empty(), "{:?}", debris(&db.client, 1).await);
    items::assert_matches_oracle(&db.client).await;
}

#[tokio::test]
async fn violating_rows_remove_the_constraint_and_are_named() {
    let db = TestDb::new().await;
    items::create(&db.client, 1000).await;
    db.exec(
        "UPDATE items SET qty = -5 WHERE id = 7;
         CREATE TABLE customers (id int PRIMARY KEY); INSERT INTO customers VALUES (1);
         ALTER TABLE items ADD COLUMN customer_id int; UPDATE items SET customer_id = 1; UPDATE items SET customer_id = 99 WHERE id = 8;",
    )
    .await;
    let out =
        ghostwire(&db.url, &["migrate", "ALTER TABLE items ADD CONSTRAINT qty_nonneg CHECK (qty >= 0)"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("violate constraint qty_nonneg") && stderr(&out).contains("the row (7,-5,"),
        "{}",
        stderr(&out)
    );
    let fk = "ALTER TABLE items ADD CONSTRAINT items_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id)";
    let out = ghostwire(&db.url, &["migrate", fk], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("(customer_id)=(99) is not present in table"), "{}", stderr(&out));
    let none = "SELECT count(*)::text FROM pg_constraint WHERE conrelid = 'items'::regclass AND contype IN ('c', 'f')";
    assert_eq!(strings(&db.client, none).await, ["0"], "the constraints are removed");
    let phases = "SELECT string_agg(phase, ',' ORDER BY id) FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, phases).await, ["aborted,aborted"]);
    // Corrected, the foreign key goes in valid.
    db.exec("INSERT INTO customers VALUES (99)").await;
    let out = ghostwire(&db.url, &["migrate", fk], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let valid = "SELECT convalidated::text FROM pg_constraint WHERE conname = 'items_customer_fk'";
    assert_eq!(strings(&db.client, valid).await, ["true"]);
}
