//! `ghostwire plan` against real PostgreSQL: every strategy class, locks, sizes,
//! revertibility, and every refusal (exit status 2) before anything is touched.

mod common;

use std::process::{Command, Output};

use common::TestDb;
use ghostwire::plan::{self, Action, LockMode, ProbeOutcome, Strategy};

const SCHEMA: &str = r#"
    CREATE TABLE orders (
        id bigserial PRIMARY KEY,
        customer_id int NOT NULL,
        status varchar(20) NOT NULL DEFAULT 'new',
        amount int,
        price numeric(10,2),
        big bigint,
        note text,
        created_at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX orders_customer ON orders (customer_id);
    CREATE TABLE customers (id int PRIMARY KEY);
    INSERT INTO customers SELECT g FROM generate_series(1, 10) g;
    INSERT INTO orders (customer_id, amount, price, big, note)
        SELECT 1 + g % 10, g, g, g, 'n' || g FROM generate_series(1, 2000) g;
    ANALYZE orders;
"#;

async fn db() -> TestDb {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    db
}

async fn plan_of(db: &mut TestDb, sql: &str) -> plan::Plan {
    match plan::plan(&mut db.client, sql).await {
        Ok(p) => p,
        Err(e) => panic!("plan of {sql:?} failed: {e}"),
    }
}

async fn single(db: &mut TestDb, sql: &str) -> plan::Step {
    let p = plan_of(db, sql).await;
    assert_eq!(p.steps.len(), 1);
    p.steps.into_iter().next().unwrap()
}

#[tokio::test]
async fn instant_changes() {
    let mut db = db().await;
    for sql in [
        "ALTER TABLE orders ADD COLUMN flag boolean DEFAULT false",
        "ALTER TABLE orders ADD COLUMN ts timestamptz DEFAULT now()", // stable, evaluated once
        "ALTER TABLE orders ADD COLUMN plain int",
        "ALTER TABLE orders DROP COLUMN note",
        "ALTER TABLE orders ALTER COLUMN status SET DEFAULT 'open'",
        "ALTER TABLE orders ALTER COLUMN status DROP DEFAULT",
        "ALTER TABLE orders ALTER COLUMN status TYPE text", // binary coercible
        "ALTER TABLE orders ALTER COLUMN status TYPE varchar(50)", // wider
        "ALTER TABLE orders ALTER COLUMN price TYPE numeric(12,2)",
        "ALTER TABLE orders ALTER COLUMN amount DROP NOT NULL",
        "ALTER TABLE orders ADD CONSTRAINT amount_pos CHECK (amount > 0) NOT VALID",
        "ALTER TABLE orders ALTER COLUMN note SET STATISTICS 200",
        "ALTER TABLE orders SET (fillfactor = 90)",
        "ALTER TABLE orders RENAME COLUMN note TO remark",
    ] {
        let p = plan_of(&mut db, sql).await;
        assert_eq!(p.strategy, Strategy::Instant, "{sql}: {:?}", p.steps[0].reason);
        assert_eq!(p.disk_needed_bytes, 0, "{sql}");
        assert!(p.carried_over.is_empty());
        assert!(p.key.is_none());
    }
    let s = single(&mut db, "ALTER TABLE orders ALTER COLUMN status TYPE text").await;
    assert!(matches!(s.probe, ProbeOutcome::Accepted { rewrites: false, .. }));
    assert_eq!(s.naive.mode, LockMode::AccessExclusive);
    assert!(s.revert.revertible);
    let s = single(&mut db, "ALTER TABLE orders SET (fillfactor = 90)").await;
    assert_eq!(s.naive.mode, LockMode::ShareUpdateExclusive);
}

#[tokio::test]
async fn online_recipes() {
    let mut db = db().await;
    for (sql, naive) in [
        ("ALTER TABLE orders ADD CONSTRAINT amount_pos CHECK (amount > 0)", LockMode::AccessExclusive),
        ("ALTER TABLE orders ALTER COLUMN amount SET NOT NULL", LockMode::AccessExclusive),
        (
            "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id)",
            LockMode::ShareRowExclusive,
        ),
        ("ALTER TABLE orders ADD CONSTRAINT orders_note_key UNIQUE (note)", LockMode::AccessExclusive),
    ] {
        let p = plan_of(&mut db, sql).await;
        assert_eq!(p.strategy, Strategy::Online, "{sql}");
        let s = &p.steps[0];
        assert_eq!(s.naive.mode, naive, "{sql}");
        assert_eq!(s.ghostwire.mode, LockMode::ShareUpdateExclusive, "{sql}");
        assert!(s.naive.estimated_seconds.is_some(), "{sql}");
    }
    // Already NOT NULL: nothing to scan.
    let s = single(&mut db, "ALTER TABLE orders ALTER COLUMN customer_id SET NOT NULL").await;
    assert_eq!(s.strategy, Strategy::Instant);
}

#[tokio::test]
async fn copy_changes_with_size_key_and_disk() {
    let mut db = db().await;
    for sql in [
        "ALTER TABLE orders ALTER COLUMN amount TYPE bigint",
        "ALTER TABLE orders ALTER COLUMN note TYPE int USING length(note)",
        "ALTER TABLE orders ADD COLUMN r float8 DEFAULT random()",
        "ALTER TABLE orders ADD COLUMN s bigserial",
        "ALTER TABLE orders ADD COLUMN g int GENERATED ALWAYS AS (amount * 2) STORED",
        "ALTER TABLE orders SET UNLOGGED",
        "ALTER TABLE orders ADD COLUMN flag bool DEFAULT true, ALTER COLUMN amount TYPE bigint",
    ] {
        let p = plan_of(&mut db, sql).await;
        assert_eq!(p.strategy, Strategy::Copy, "{sql}: {:?}", p.steps.iter().map(|s| &s.reason).collect::<Vec<_>>());
        let key = p.key.as_ref().expect("a key");
        assert_eq!(key.columns, ["id"]);
        assert_eq!(p.estimated_rows, 2000);
        assert!(p.total_bytes > 0 && p.disk_needed_bytes == p.total_bytes, "{sql}");
        let kinds: Vec<(&str, &str)> = p.carried_over.iter().map(|c| (c.kind, c.name.as_str())).collect();
        assert!(kinds.contains(&("index", "orders_customer")), "{kinds:?}");
        assert!(kinds.contains(&("sequence", "public.orders_id_seq")), "{kinds:?}");
        assert!(kinds.iter().any(|k| k.0 == "owner"));
    }
    let s = single(&mut db, "ALTER TABLE orders ALTER COLUMN amount TYPE bigint").await;
    assert!(matches!(s.probe, ProbeOutcome::Accepted { rewrites: true, .. }));
    assert_eq!(s.ghostwire.mode, LockMode::AccessExclusive);
    assert!(s.ghostwire.held_for.contains("swap only"));
    assert!(s.naive.held_for.contains("rewrite"));
}

#[tokio::test]
async fn revertibility() {
    let mut db = db().await;
    let widening = single(&mut db, "ALTER TABLE orders ALTER COLUMN amount TYPE bigint").await;
    assert!(widening.revert.revertible);
    assert!(widening.revert.note.contains("fit the old type"), "{}", widening.revert.note);
    for sql in [
        "ALTER TABLE orders ALTER COLUMN big TYPE int",
        "ALTER TABLE orders ALTER COLUMN price TYPE numeric(10,0)",
        "ALTER TABLE orders ALTER COLUMN note TYPE varchar(5)",
        "ALTER TABLE orders ALTER COLUMN note TYPE int USING length(note)",
        "ALTER TABLE orders DROP COLUMN note",
    ] {
        let p = plan_of(&mut db, sql).await;
        assert!(!p.revertible, "{sql}");
        assert!(!p.revert_notes.is_empty(), "{sql}");
    }
    assert!(plan_of(&mut db, "ALTER TABLE orders ADD COLUMN x int DEFAULT 1").await.revertible);
}

#[tokio::test]
async fn plan_changes_nothing() {
    let mut db = db().await;
    let snapshot = "SELECT relfilenode, (SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum)
                      FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attnum > 0 AND NOT attisdropped)
                    FROM pg_class WHERE oid = 'orders'::regclass";
    let before: (u32, String) = {
        let r = db.client.query_one(snapshot, &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    let p = plan_of(
        &mut db,
        "ALTER TABLE orders ALTER COLUMN amount TYPE bigint, DROP COLUMN note, ADD COLUMN r float8 DEFAULT random()",
    )
    .await;
    assert_eq!(p.steps.len(), 3);
    let r = db.client.query_one(snapshot, &[]).await.unwrap();
    assert_eq!((r.get::<_, u32>(0), r.get::<_, String>(1)), before);
    // No temporary probe table survives, and no lock is left behind.
    let temp: i64 =
        db.client.query_one("SELECT count(*) FROM pg_class WHERE relpersistence = 't'", &[]).await.unwrap().get(0);
    assert_eq!(temp, 0);
    let locks: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_locks WHERE relation = 'orders'::regclass AND pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(locks, 0);
}

#[tokio::test]
async fn unique_index_key_and_quoted_names() {
    let mut db = TestDb::new().await;
    db.exec(
        r#"CREATE SCHEMA "Sales";
           CREATE TABLE "Sales"."Order Items" ("Order ID" int NOT NULL, line int NOT NULL, qty int);
           CREATE UNIQUE INDEX "Order Items_key" ON "Sales"."Order Items" ("Order ID", line);"#,
    )
    .await;
    let p = plan_of(&mut db, r#"ALTER TABLE "Sales"."Order Items" ALTER COLUMN qty TYPE bigint"#).await;
    assert_eq!(p.strategy, Strategy::Copy);
    assert_eq!(p.table.to_string(), "\"Sales\".\"Order Items\"");
    let key = p.key.unwrap();
    assert_eq!(key.index_name, "Order Items_key");
    assert_eq!(key.columns, ["Order ID", "line"]);
    assert!(matches!(p.steps[0].action, Action::AlterType { .. }));
}

// ---- the binary: output formats and exit statuses ----

fn ghostwire(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ghostwire")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn human_and_json_output() {
    let db = db().await;
    let out = ghostwire(&db.url, &["plan", "ALTER TABLE orders ALTER COLUMN amount TYPE bigint"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "Strategy: copy",
        "Key:      primary key orders_pkey (id)",
        "ACCESS EXCLUSIVE",
        "Disk:",
        "Revertible: yes, but",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let out =
        ghostwire(&db.url, &["plan", "--json", "ALTER TABLE orders ALTER COLUMN amount TYPE bigint, ADD COLUMN x int"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["strategy"], "copy");
    assert_eq!(doc["table"]["name"], "orders");
    assert_eq!(doc["key"]["columns"][0], "id");
    assert_eq!(doc["steps"].as_array().unwrap().len(), 2);
    assert_eq!(doc["steps"][0]["strategy"], "copy");
    assert_eq!(doc["steps"][1]["strategy"], "instant");
    assert_eq!(doc["steps"][0]["naive"]["mode"], "ACCESS_EXCLUSIVE");
    assert_eq!(doc["steps"][1]["action"]["kind"], "add_column");
    assert!(doc["estimated_rows"].as_i64().unwrap() > 0);
    assert!(doc["disk_needed_bytes"].as_i64().unwrap() > 0);
    assert_eq!(doc["revertible"], true);
}

#[tokio::test]
async fn refusals_exit_with_status_2_before_touching_anything() {
    let db = db().await;
    db.exec(
        "CREATE TABLE nokey (a int, b text);
         CREATE TABLE parted (id int, at date) PARTITION BY RANGE (at);
         CREATE TABLE src (id int PRIMARY KEY, v int); CREATE MATERIALIZED VIEW mv AS SELECT * FROM src;
         CREATE VIEW orders_notes AS SELECT id, note FROM orders;
         CREATE TABLE k (id int PRIMARY KEY, v int);",
    )
    .await;
    let cases: &[(&str, &str)] = &[
        ("ALTER TABLE orders ADD COLUMN x int DEFALT 5", "syntax error at or near \"DEFALT\" at character 37"),
        ("ALTER TABLE orders ADD COLUMN x int; ALTER TABLE orders ADD COLUMN y int", "2 statements given"),
        ("SELECT * FROM orders", "this is a SELECT statement: ghostwire runs ALTER TABLE, CREATE [UNIQUE] INDEX"),
        ("CREATE INDEX ON orders (nosuch)", "column \"nosuch\" does not exist"),
        ("CREATE INDEX orders_pkey ON orders (note)", "relation orders_pkey already exists"),
        ("CREATE INDEX ON parted (id)", "is partitioned"),
        ("DROP INDEX nosuch_idx", "index nosuch_idx does not exist"),
        ("DROP INDEX IF EXISTS nosuch_idx", "there is nothing to do"),
        ("DROP INDEX orders_pkey", "belongs to constraint orders_pkey"),
        ("DROP INDEX orders_pkey, k_pkey", "one index per statement"),
        ("DROP INDEX k_pkey CASCADE", "cannot cascade"),
        ("REINDEX TABLE orders", "only REINDEX INDEX"),
        ("ALTER TABLE nope ADD COLUMN x int", "table nope does not exist"),
        ("ALTER TABLE nokey ALTER COLUMN a TYPE bigint", "neither a primary key nor a unique index"),
        ("ALTER TABLE parted ADD COLUMN x int", "is partitioned"),
        ("ALTER TABLE orders RENAME TO orders2", "renaming a table"),
        ("ALTER TABLE orders SET SCHEMA public", "moving a table to another schema"),
        ("ALTER TABLE orders ALTER COLUMN amount TYPE nosuchtype", "type \"nosuchtype\" does not exist"),
        ("ALTER TABLE orders DROP COLUMN nosuch", "column \"nosuch\" of relation"),
        ("ALTER TABLE k DROP COLUMN id, ALTER COLUMN v TYPE bigint", "part of the key"),
        ("ALTER TABLE k DROP CONSTRAINT k_pkey, ALTER COLUMN v TYPE bigint", "the key ghostwire copies by"),
        ("ALTER TABLE orders DROP COLUMN note", "view public.orders_notes reads column note"),
        ("ALTER TABLE src ALTER COLUMN v TYPE bigint", "materialized view public.mv"),
        ("ALTER TABLE orders INHERIT customers", "not supported"),
        ("ALTER TABLE pg_catalog.pg_class ADD COLUMN x int", "is a system catalog"),
        ("ALTER TABLE information_schema.sql_features ALTER COLUMN comments TYPE varchar(10)", "is a system catalog"),
    ];
    for (sql, needle) in cases {
        let out = ghostwire(&db.url, &["plan", sql]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{sql}: {err}");
        assert!(err.contains(needle), "{sql}: expected {needle:?} in {err}");
        assert!(out.stdout.is_empty(), "{sql}: printed a plan");
    }
    // Nothing changed.
    let cols: i64 = db
        .client
        .query_one("SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cols, 8);
}

#[test]
fn unreachable_database_is_exit_status_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out =
        ghostwire(&format!("postgres://postgres@127.0.0.1:{port}/x"), &["plan", "ALTER TABLE t ADD COLUMN x int"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("could not connect to the database"), "{}", stderr(&out));
    // No URL and no PG* variable: libpq's defaults (the local socket) are tried, and the
    // message says how to name the database.
    let out = Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["plan", "ALTER TABLE t ADD COLUMN x int"])
        .env_remove("DATABASE_URL")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATABASE")
        .env_remove("PGUSER")
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--database-url"), "{}", stderr(&out));
}
