//! Online recipes in place, with no copy of the table: a CHECK or FOREIGN KEY constraint is
//! added NOT VALID (a short lock) and validated (reads and writes go on); SET NOT NULL goes
//! through a validated check; UNIQUE and PRIMARY KEY through a concurrent index build. Each
//! is checked under writers (none waits past the lock timeout, although the scans are made
//! slow enough that a plain ALTER would block them for seconds) and against the offline
//! statement run on a twin table. Violating data removes what was made and names a row;
//! a run killed midway resumes, or aborts leaving nothing.

mod common;

use std::time::Duration;

use common::items::{self, ghostwire};
use common::workload::{Shape, Workload};
use common::{TestDb, debris, strings};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The writers never waited much longer than the lock timeout (100 ms).
const NEVER_BLOCKED: Duration = Duration::from_millis(1000);

/// The table's constraints (kind, definition, deferrable) and index definitions, with the
/// table's name taken out, and which columns are NOT NULL: what must equal the offline
/// statement's result.
async fn shape_of(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    let sql = format!(
        "SELECT replace(conname::text, '{table}', 'T') || ' ' || contype::text || ' ' || pg_get_constraintdef(oid) || ' ' || condeferrable::text || condeferred::text
           FROM pg_constraint WHERE conrelid = '{table}'::regclass
         UNION ALL SELECT replace(pg_get_indexdef(indexrelid), '{table}', 'T') || ' valid=' || indisvalid
           FROM pg_index WHERE indrelid = '{table}'::regclass
         UNION ALL SELECT attname::text || ' not null=' || attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
           FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped
         ORDER BY 1"
    );
    strings(client, &sql).await
}

#[tokio::test]
async fn a_check_constraint_is_added_in_place_under_writes() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    db.exec(items::SLOW_FN).await;
    let load = Workload::start(&db.url, Shape::items(), 2, items::ROWS, 71);
    load.wait_for_more(20).await;
    let out = ghostwire(
        &db.url,
        &[
            "migrate",
            "ALTER TABLE items ALTER COLUMN note SET STATISTICS 150, ADD CONSTRAINT id_positive CHECK (slow(id) > 0)",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    load.wait_for_more(20).await;
    load.assert_never_waited(NEVER_BLOCKED);
    load.stop().await;
    // Each step under a table lock records how long it waited and held it.
    let held = "SELECT (details->>'lock_held_ms' IS NOT NULL AND details->>'attempts' IS NOT NULL)::text
                  FROM ghostwire.events WHERE kind = 'constraint_added'";
    assert_eq!(strings(&db.client, held).await, ["true"]);
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

#[tokio::test]
async fn not_null_and_unique_run_in_place_beside_an_instant_change_as_offline() {
    let db = TestDb::new().await;
    items::create(&db.client, items::ROWS).await;
    db.exec(
        "ALTER TABLE items ADD COLUMN tag text DEFAULT 'x';
         CREATE TABLE twin (LIKE items INCLUDING ALL); INSERT INTO twin SELECT * FROM items;
         ALTER INDEX twin_qty_idx RENAME TO twin_qty;",
    )
    .await;
    let change = "ALTER COLUMN tag SET NOT NULL, ADD UNIQUE (id, tag), ALTER COLUMN tag SET DEFAULT 'y'";
    db.exec(&format!("ALTER TABLE twin {change}")).await;
    let load = Workload::start(&db.url, Shape::items(), 2, items::ROWS, 72);
    load.wait_for_more(20).await;
    let out = ghostwire(&db.url, &["migrate", &format!("ALTER TABLE items {change}")], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    load.wait_for_more(20).await;
    load.assert_never_waited(NEVER_BLOCKED);
    load.stop().await;
    assert_eq!(shape_of(&db.client, "items").await, shape_of(&db.client, "twin").await);
    let kinds = "SELECT string_agg(kind, ',' ORDER BY id) FROM ghostwire.events
                  WHERE kind NOT IN ('plan', 'phase') AND kind NOT LIKE 'waiting%'";
    assert_eq!(
        strings(&db.client, kinds).await,
        [
            "statement,constraint_added,constraint_validated,not_null_set,index_build_started,index_built,constraint_attached"
        ]
    );
    let m = "SELECT phase || ':' || rows_copied FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, m).await, ["finished:0"]);
    let helpers = "SELECT count(*)::text FROM pg_constraint WHERE conname LIKE 'ghostwire%'";
    assert_eq!(strings(&db.client, helpers).await, ["0"]);
    items::assert_matches_oracle(&db.client).await;
}

#[tokio::test]
async fn a_primary_key_is_added_in_place_under_writes_as_offline() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE keyless (id bigint, qty int, note text, payload text);
         INSERT INTO keyless SELECT g, g, 'n' || g, NULL FROM generate_series(1, 6000) g;
         CREATE TABLE keyless_oracle AS SELECT * FROM keyless;
         CREATE TABLE twin (LIKE keyless); ALTER TABLE twin ADD PRIMARY KEY (id);",
    )
    .await;
    let shape = Shape { table: "keyless".into(), oracle: "keyless_oracle".into(), ..Shape::items() };
    let load = Workload::start(&db.url, shape, 2, 6000, 73);
    load.wait_for_more(20).await;
    let out = ghostwire(&db.url, &["migrate", "ALTER TABLE keyless ADD PRIMARY KEY (id)"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    load.wait_for_more(20).await;
    load.assert_never_waited(NEVER_BLOCKED);
    load.stop().await;
    let shape = |t: &'static str| {
        let client = &db.client;
        async move {
            strings(client, &format!(
                "SELECT replace(conname, '{t}', 'T') || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{t}'::regclass
                 UNION ALL SELECT replace(pg_get_indexdef(indexrelid), '{t}', 'T') FROM pg_index WHERE indrelid = '{t}'::regclass
                 UNION ALL SELECT attname || ' ' || attnotnull FROM pg_attribute WHERE attrelid = '{t}'::regclass AND attnum > 0
                 ORDER BY 1")).await
        }
    };
    assert_eq!(shape("keyless").await, shape("twin").await);
    common::assert_same_rows(&db.client, "SELECT * FROM keyless", "SELECT * FROM keyless_oracle").await;
}

#[tokio::test]
async fn nulls_and_duplicates_leave_the_table_as_it_was() {
    let db = TestDb::new().await;
    items::create(&db.client, 1000).await;
    db.exec("UPDATE items SET note = NULL WHERE id = 9; UPDATE items SET qty = 5 WHERE id = 10;").await;
    let before = shape_of(&db.client, "items").await;
    let out = ghostwire(&db.url, &["migrate", "ALTER TABLE items ALTER COLUMN note SET NOT NULL"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("NOT NULL on column note: the column holds NULLs; for example the row (9,9,"),
        "{}",
        stderr(&out)
    );
    let out = ghostwire(&db.url, &["migrate", "ALTER TABLE items ADD CONSTRAINT qty_key UNIQUE (qty)"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("Key (qty)=(5) is duplicated"), "{}", stderr(&out));
    assert_eq!(shape_of(&db.client, "items").await, before, "nothing is left behind");
    // A statement mixing a catalog-only subcommand with a recipe: the recipe's NOT NULL on
    // qty (the primary key's) is taken back, the catalog-only drop is named as done.
    let mixed = "ALTER TABLE items DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (qty)";
    let out = ghostwire(&db.url, &["migrate", mixed], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("also removed: NOT NULL on qty")
            && stderr(&out).contains("DROP CONSTRAINT items_pkey had already run and stay"),
        "{}",
        stderr(&out)
    );
    let now: Vec<String> = shape_of(&db.client, "items").await;
    let expected: Vec<String> = before.into_iter().filter(|l| !l.contains("pkey")).collect();
    assert_eq!(now, expected);
    let phases = "SELECT string_agg(phase, ',' ORDER BY id) FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, phases).await, ["aborted,aborted,aborted"]);
}

#[tokio::test]
async fn a_run_killed_between_not_valid_and_validate_resumes_or_aborts() {
    let db = TestDb::new().await;
    items::create(&db.client, 1000).await;
    let checks = "SELECT string_agg(conname || ':' || convalidated, ',' ORDER BY conname) FROM pg_constraint
                   WHERE conrelid = 'items'::regclass AND contype = 'c'";
    // An unnamed constraint: the resumed run finds it by the name recorded with it.
    let add = "ALTER TABLE items ADD CHECK (qty > -1)";
    let out = ghostwire(&db.url, &["migrate", add], Some("in_place.added")).await;
    assert!(out.status.code().is_none(), "killed at the failpoint: {}", stderr(&out));
    assert_eq!(strings(&db.client, checks).await, ["items_qty_check:false"]);
    let out = ghostwire(&db.url, &["resume", "items"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(strings(&db.client, checks).await, ["items_qty_check:true"], "validated, not added twice");

    let out = ghostwire(
        &db.url,
        &["migrate", "ALTER TABLE items ADD CONSTRAINT big CHECK (id < 1000000)"],
        Some("in_place.added"),
    )
    .await;
    assert!(out.status.code().is_none(), "{}", stderr(&out));
    let out = ghostwire(&db.url, &["abort", "items"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(strings(&db.client, checks).await, ["items_qty_check:true"], "abort removed what it added");
    let phases = "SELECT string_agg(phase, ',' ORDER BY id) FROM ghostwire.migrations";
    assert_eq!(strings(&db.client, phases).await, ["finished,aborted"]);
}

/// A statement with a catalog-only subcommand and a recipe, killed after the first ran: the
/// resumed run plans only what is left (planning the whole statement again would find the
/// new column there already) and keeps what each step recorded.
#[tokio::test]
async fn a_run_killed_after_its_catalog_only_part_resumes_with_the_rest() {
    let db = TestDb::new().await;
    items::create(&db.client, 1000).await;
    let change = "ALTER TABLE items ADD COLUMN tag int, ADD CONSTRAINT tag_ok CHECK (tag IS NULL OR tag > 0)";
    let out = ghostwire(&db.url, &["migrate", change], Some("in_place.added")).await;
    assert!(out.status.code().is_none(), "killed at the failpoint: {}", stderr(&out));
    let checks = "SELECT string_agg(conname || ':' || convalidated, ',' ORDER BY conname) FROM pg_constraint
                   WHERE conrelid = 'items'::regclass AND contype = 'c'";
    assert_eq!(strings(&db.client, checks).await, ["tag_ok:false"]);
    let out = ghostwire(&db.url, &["resume", "items"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(strings(&db.client, checks).await, ["tag_ok:true"], "validated, not added twice");
    let added = "SELECT count(*)::text FROM ghostwire.events WHERE kind IN ('statement', 'constraint_added')";
    assert_eq!(strings(&db.client, added).await, ["2"], "each step ran once");
    assert_eq!(strings(&db.client, "SELECT phase FROM ghostwire.migrations").await, ["finished"]);
}
