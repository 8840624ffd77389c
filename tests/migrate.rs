//! `ghostwire migrate` moving data under concurrent writes, checked row for row against an
//! oracle the writers fill in the same transactions.

mod common;

use common::workload::Shape;
use common::{TestDb, assert_same_rows, debris, migrate_under_load, strings, test_options};
use ghostwire::plan::Strategy;

/// 9,600 random hex characters: stored out of line (TOAST), not compressible below 2 kB.
const LONG: &str = "(SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 300) i)";
const ROWS: i64 = 3000;

/// `items` and its oracle, both filled with the same ROWS rows.
async fn items(db: &TestDb, qty_type: &str) {
    db.exec(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, qty {qty_type}, note text, payload text);
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty {qty_type}, note text, payload text);
         INSERT INTO items SELECT g, (g * 3)::text::{qty_type}, CASE WHEN g % 11 = 0 THEN NULL ELSE 'n' || g END,
                                  CASE WHEN g % 50 = 0 THEN {LONG} END
           FROM generate_series(1, {ROWS}) g;
         INSERT INTO oracle SELECT * FROM items;"
    ))
    .await;
}

async fn column_type(db: &TestDb, table: &str, column: &str) -> String {
    strings(&db.client, &format!("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attname = '{column}'"))
        .await
        .pop()
        .unwrap_or_default()
}

#[tokio::test]
async fn type_change_with_using_under_writes() {
    let db = TestDb::new().await;
    items(&db, "text").await;
    let (outcome, commits) = migrate_under_load(
        &db,
        Shape::items(),
        ROWS,
        "ALTER TABLE items ALTER COLUMN qty TYPE int USING qty::int",
        &test_options(),
    )
    .await;
    assert_eq!(outcome.strategy, Strategy::Copy);
    assert!(outcome.swap.is_some() && outcome.rows_copied > 0);
    assert!(commits > 100, "only {commits} writer commits");
    assert_eq!(column_type(&db, "items", "qty").await, "integer");
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty::int, note, payload FROM oracle",
    )
    .await;
    // TOASTed values made it through the copy and the catch-up.
    let long: i64 =
        db.client.query_one("SELECT count(*) FROM items WHERE length(payload) > 8000", &[]).await.unwrap().get(0);
    assert!(long > 10, "only {long} long values");
    // The old table is kept until finish.
    let kept = strings(&db.client, &format!("SELECT count(*)::text FROM ghostwire_{}_old.items", outcome.id)).await;
    assert!(kept[0].parse::<i64>().unwrap() > 0);
    // Captured as the suite runs it (tests/logical.rs runs it again in logical mode).
    let expected = match common::capture_under_test() {
        ghostwire::migrate::capture::Choice::Logical => "logical",
        _ => "trigger",
    };
    assert_eq!(strings(&db.client, "SELECT capture FROM ghostwire.migrations").await, [expected]);
}

#[tokio::test]
async fn volatile_default_is_evaluated_per_row() {
    let db = TestDb::new().await;
    items(&db, "int").await;
    let (outcome, _) = migrate_under_load(
        &db,
        Shape::items(),
        ROWS,
        "ALTER TABLE items ADD COLUMN r float8 NOT NULL DEFAULT random()",
        &test_options(),
    )
    .await;
    assert_eq!(outcome.strategy, Strategy::Copy);
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM items",
        "SELECT id, qty, note, payload FROM oracle",
    )
    .await;
    let r = db
        .client
        .query_one(
            "SELECT count(*) FILTER (WHERE r IS NULL OR r < 0 OR r >= 1), count(DISTINCT r), count(*) FROM items",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 0);
    assert!(r.get::<_, i64>(1) > r.get::<_, i64>(2) * 9 / 10, "the default was not evaluated per row");
}

#[tokio::test]
async fn drop_column_through_the_shadow() {
    let db = TestDb::new().await;
    items(&db, "int").await;
    let shape = Shape { note: None, ..Shape::items() };
    let (outcome, _) = migrate_under_load(
        &db,
        shape,
        ROWS,
        "ALTER TABLE items DROP COLUMN note, ALTER COLUMN qty TYPE bigint",
        &test_options(),
    )
    .await;
    assert_eq!(outcome.strategy, Strategy::Copy);
    assert_eq!(column_type(&db, "items", "note").await, "");
    assert_eq!(column_type(&db, "items", "qty").await, "bigint");
    assert_same_rows(&db.client, "SELECT id, qty, payload FROM items", "SELECT id, qty::bigint, payload FROM oracle")
        .await;
    // The pool after the copy vacuumed the new table: it has a visibility map (index-only scans).
    let visible = "SELECT (relallvisible > 0)::text FROM pg_class WHERE oid = 'items'::regclass";
    assert_eq!(strings(&db.client, visible).await, ["true"]);
}

#[tokio::test]
async fn composite_key_with_key_updates() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "CREATE TABLE events (tenant int, seq bigint, qty int, note text, payload text, PRIMARY KEY (tenant, seq));
         CREATE TABLE events_oracle (LIKE events, PRIMARY KEY (tenant, seq));
         INSERT INTO events SELECT g % 7, g, g, 'n' || g, CASE WHEN g % 40 = 0 THEN {LONG} END FROM generate_series(1, {ROWS}) g;
         INSERT INTO events_oracle SELECT * FROM events;"
    ))
    .await;
    let shape = Shape {
        table: "events".into(),
        oracle: "events_oracle".into(),
        key: vec!["tenant".into(), "seq".into()],
        ..Shape::items()
    };
    let (outcome, _) =
        migrate_under_load(&db, shape, ROWS, "ALTER TABLE events ALTER COLUMN qty TYPE bigint", &test_options()).await;
    assert!(outcome.swap.is_some());
    assert_same_rows(
        &db.client,
        "SELECT tenant, seq, qty, note, payload FROM events",
        "SELECT tenant, seq, qty, note, payload FROM events_oracle",
    )
    .await;
    assert_eq!(primary_key(&db, "events").await, ["PRIMARY KEY (tenant, seq)"]);
}

#[tokio::test]
async fn quoted_schema_table_and_columns() {
    let db = TestDb::new().await;
    db.exec(&format!(
        r#"CREATE SCHEMA "Sales";
           CREATE TABLE "Sales"."Order Items" ("Item ID" bigint PRIMARY KEY, "Qty" int, "Note" text, payload text);
           CREATE INDEX "Order Items by Qty" ON "Sales"."Order Items" ("Qty");
           CREATE TABLE "Sales"."Order Items Oracle" (LIKE "Sales"."Order Items", PRIMARY KEY ("Item ID"));
           INSERT INTO "Sales"."Order Items" SELECT g, g, 'n' || g, CASE WHEN g % 50 = 0 THEN {LONG} END FROM generate_series(1, {ROWS}) g;
           INSERT INTO "Sales"."Order Items Oracle" SELECT * FROM "Sales"."Order Items";"#
    ))
    .await;
    let shape = Shape {
        table: r#""Sales"."Order Items""#.into(),
        oracle: r#""Sales"."Order Items Oracle""#.into(),
        key: vec![r#""Item ID""#.into()],
        qty: Some(r#""Qty""#.into()),
        note: Some(r#""Note""#.into()),
        ..Shape::items()
    };
    let statement = r#"ALTER TABLE "Sales"."Order Items" ALTER COLUMN "Qty" TYPE bigint, ADD COLUMN "Added At" timestamptz DEFAULT clock_timestamp()"#;
    let (outcome, _) = migrate_under_load(&db, shape, ROWS, statement, &test_options()).await;
    assert!(outcome.swap.is_some());
    assert_same_rows(
        &db.client,
        r#"SELECT "Item ID", "Qty", "Note", payload FROM "Sales"."Order Items""#,
        r#"SELECT "Item ID", "Qty"::bigint, "Note", payload FROM "Sales"."Order Items Oracle""#,
    )
    .await;
    let idx = strings(&db.client, r#"SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = '"Sales"."Order Items"'::regclass ORDER BY 1"#).await;
    assert_eq!(idx, [r#""Sales"."Order Items by Qty""#, r#""Sales"."Order Items_pkey""#]);
    let nulls: i64 = db
        .client
        .query_one(r#"SELECT count(*) FROM "Sales"."Order Items" WHERE "Added At" IS NULL"#, &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nulls, 0);
}

#[tokio::test]
async fn identity_and_generated_columns() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "CREATE TABLE tickets (id bigint GENERATED ALWAYS AS IDENTITY (START WITH 10 INCREMENT BY 3) PRIMARY KEY,
                               qty int, twice bigint GENERATED ALWAYS AS (qty * 2) STORED, note text, payload text);
         CREATE TABLE tickets_oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO tickets (qty, note, payload) SELECT g, 'n' || g, CASE WHEN g % 50 = 0 THEN {LONG} END FROM generate_series(1, {ROWS}) g;
         INSERT INTO tickets_oracle SELECT id, qty, note, payload FROM tickets;"
    ))
    .await;
    let max_before: i64 = db.client.query_one("SELECT max(id) FROM tickets", &[]).await.unwrap().get(0);
    let shape = Shape {
        table: "tickets".into(),
        oracle: "tickets_oracle".into(),
        identity: true,
        key_updates: false,
        ..Shape::items()
    };
    // (PostgreSQL refuses to retype a column a generated column uses: force the copy otherwise.)
    let statement = "ALTER TABLE tickets ADD COLUMN r float8 DEFAULT random()";
    let (outcome, _) = migrate_under_load(&db, shape, max_before, statement, &test_options()).await;
    assert!(outcome.swap.is_some());
    assert_same_rows(
        &db.client,
        "SELECT id, qty, note, payload FROM tickets",
        "SELECT id, qty, note, payload FROM tickets_oracle",
    )
    .await;
    let bad: i64 = db
        .client
        .query_one("SELECT count(*) FROM tickets WHERE twice IS DISTINCT FROM qty * 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
    // The identity continues after every id handed out before and during the migration.
    let max_now: i64 = db.client.query_one("SELECT max(id) FROM tickets", &[]).await.unwrap().get(0);
    let next: i64 = db.client.query_one("INSERT INTO tickets (qty) VALUES (1) RETURNING id", &[]).await.unwrap().get(0);
    assert!(next > max_now && (next - 10) % 3 == 0, "next id {next} after {max_now}");
    let identity = strings(&db.client, "SELECT identity_generation FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'tickets' AND column_name = 'id'").await;
    assert_eq!(identity, ["ALWAYS"]);
}

#[tokio::test]
async fn catalog_only_change_runs_in_place() {
    let db = TestDb::new().await;
    items(&db, "int").await;
    let oid_before = strings(&db.client, "SELECT 'items'::regclass::oid::text").await;
    let (outcome, _) = migrate_under_load(
        &db,
        Shape::items(),
        ROWS,
        "ALTER TABLE items ADD COLUMN flag boolean DEFAULT false",
        &test_options(),
    )
    .await;
    assert_eq!(outcome.strategy, Strategy::Instant);
    assert!(outcome.swap.is_none() && outcome.finished);
    assert_eq!(strings(&db.client, "SELECT 'items'::regclass::oid::text").await, oid_before);
    assert_eq!(column_type(&db, "items", "flag").await, "boolean");
    assert!(debris(&db.client, outcome.id).await.is_empty());
}

/// The key's own type changes: to `bigint` (same order, converted bounds), then to `text`
/// (another order: the copy walks the original's order, verification matches rows by key).
#[tokio::test]
async fn key_type_changes_under_writes() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, qty int, note text, payload text);
         CREATE TABLE oracle (id int PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO items SELECT g, g * 3, 'n' || g, CASE WHEN g % 50 = 0 THEN {LONG} END FROM generate_series(1, {ROWS}) g;
         INSERT INTO oracle SELECT * FROM items;"
    ))
    .await;
    let opts = ghostwire::migrate::Options { finish: true, ..test_options() };
    let mut first_key = ROWS;
    for (change, shown) in [("bigint", "bigint"), ("text", "text")] {
        let statement = format!("ALTER TABLE items ALTER COLUMN id TYPE {change}");
        let (outcome, commits) = migrate_under_load(&db, Shape::items(), first_key, &statement, &opts).await;
        assert!(outcome.swap.is_some() && outcome.finished, "{change}");
        first_key += commits as i64 + 1000;
        assert_eq!(column_type(&db, "items", "id").await, shown);
        assert_same_rows(
            &db.client,
            "SELECT id::text, qty, note, payload FROM items",
            "SELECT id::text, qty, note, payload FROM oracle",
        )
        .await;
    }
    assert_eq!(primary_key(&db, "items").await, ["PRIMARY KEY (id)"]);
}

/// `table`'s primary key, as `pg_get_constraintdef` shows it.
async fn primary_key(db: &TestDb, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{table}'::regclass AND contype = 'p'"
    );
    strings(&db.client, &sql).await
}
