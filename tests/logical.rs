//! `ghostwire migrate --capture logical`: the change log filled from a replication slot
//! (pgoutput, through ghostwire's own replication client) instead of triggers. The same
//! oracle as trigger capture: concurrent writers with inserts, updates, deletes, key
//! updates, NULLs and TOASTed values, in every phase, each mirrored into an oracle table in
//! the same transaction; the swapped table must equal the oracle row for row.

mod common;

use common::workload::Shape;
use common::{TestDb, assert_same_rows, debris, migrate_under_load, strings, test_options};
use ghostwire::migrate::Options;
use ghostwire::migrate::capture::Choice;

const LONG: &str = "(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 300) i)";
const ROWS: i64 = 3000;

fn logical() -> Options {
    Options { capture: Choice::Logical, ..test_options() }
}

async fn items(db: &TestDb) {
    db.exec(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO items SELECT g, g * 3, CASE WHEN g % 11 = 0 THEN NULL ELSE 'n' || g END,
                                  CASE WHEN g % 50 = 0 THEN {LONG} END
           FROM generate_series(1, {ROWS}) g;
         INSERT INTO oracle SELECT * FROM items;"
    ))
    .await;
}

/// Slots and publications of the test's database (slots are the cluster's: named with the
/// database's oid).
async fn replication_debris(db: &TestDb) -> Vec<String> {
    strings(
        &db.client,
        "SELECT 'slot ' || slot_name FROM pg_replication_slots
          WHERE slot_name LIKE 'ghostwire\\_' || (SELECT oid FROM pg_database WHERE datname = current_database()) || '\\_%'
         UNION ALL SELECT 'publication ' || pubname FROM pg_publication",
    )
    .await
}

#[tokio::test]
async fn a_type_change_under_writes_matches_the_oracle() {
    let db = TestDb::new().await;
    items(&db).await;
    let (outcome, commits) =
        migrate_under_load(&db, Shape::items(), ROWS, "ALTER TABLE items ALTER COLUMN qty TYPE bigint", &logical())
            .await;
    assert!(outcome.swap.is_some() && outcome.rows_copied > 0);
    assert!(commits > 100, "only {commits} writer commits");
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty, note, payload FROM oracle",
    )
    .await;
    // No trigger was ever on the table; the slot and the publication went at the swap.
    let capture = strings(&db.client, "SELECT capture FROM ghostwire.migrations").await;
    assert_eq!(capture, ["logical"]);
    assert!(replication_debris(&db).await.is_empty(), "{:?}", replication_debris(&db).await);
    let out = common::items::ghostwire(&db.url, &["finish", "items"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(debris(&db.client, outcome.id).await.is_empty());
}
