//! What differs between PostgreSQL majors, checked on each (tests/majors.rs runs this on
//! every major installed): PostgreSQL 18's VIRTUAL generated columns, named and NOT VALID
//! NOT NULL constraints and NOT ENFORCED checks, 17's direct TLS and MAINTAIN privilege,
//! 18's pg_signal_autovacuum_worker. A test for a feature the major lacks checks what the
//! major does instead, or says it is skipped.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::tls::tls_cluster;
use common::workload::Shape;
use common::{TestDb, major, migrate_under_load, role, strings, test_options, try_connect};
use ghostwire::ephemeral::HostAuth;

fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "skipped {test} on PostgreSQL {}: {why}", major());
}

#[tokio::test]
async fn postgresql_18s_columns_and_constraints_survive_the_swap() {
    let db = TestDb::new().await;
    if major() < 18 {
        return skipped("postgresql_18s_columns_and_constraints_survive_the_swap", "needs PostgreSQL 18");
    }
    db.exec(
        "CREATE TABLE items (
             id bigint PRIMARY KEY,
             qty int CONSTRAINT items_qty_present NOT NULL DEFAULT 0,
             note text, payload text,
             region text DEFAULT 'eu',
             doubled bigint GENERATED ALWAYS AS (qty * 2) VIRTUAL,
             tripled bigint GENERATED ALWAYS AS (qty * 3),
             plus_one bigint GENERATED ALWAYS AS (qty + 1) STORED,
             CONSTRAINT qty_below_a_billion CHECK (qty < 1000000000) NOT ENFORCED);
         ALTER TABLE items ADD CONSTRAINT region_present NOT NULL region NOT VALID;
         COMMENT ON CONSTRAINT items_qty_present ON items IS 'always counted';
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty int DEFAULT 0, note text, payload text);
         INSERT INTO items (id, qty, note) SELECT g, g, 'n' || g FROM generate_series(1, 3000) g;
         INSERT INTO oracle SELECT id, qty, note, payload FROM items;",
    )
    .await;
    let before = constraints(&db).await;
    // qty is never NULL here: the writers give it a value or leave it to its default.
    let shape = Shape { qty: None, ..Shape::items() };
    let statement = "ALTER TABLE items ADD COLUMN token uuid DEFAULT gen_random_uuid()";
    let (outcome, _) = migrate_under_load(&db, shape, 3000, statement, &test_options()).await;
    assert!(outcome.swap.is_some(), "a volatile default is a copy");
    common::assert_same_rows(&db.client, "SELECT id, qty, note, payload FROM items", "SELECT * FROM oracle").await;
    let kinds = strings(
        &db.client,
        "SELECT attname || ' ' || attgenerated::text FROM pg_attribute
          WHERE attrelid = 'items'::regclass AND attgenerated <> '' ORDER BY attnum",
    )
    .await;
    assert_eq!(kinds, ["doubled v", "tripled v", "plus_one s"]);
    let wrong = strings(
        &db.client,
        "SELECT count(*)::text FROM items
          WHERE doubled IS DISTINCT FROM qty * 2 OR tripled IS DISTINCT FROM qty * 3 OR plus_one IS DISTINCT FROM qty + 1",
    )
    .await;
    assert_eq!(wrong, ["0"]);
    assert_eq!(constraints(&db).await, before, "every constraint kept its name, kind, validity and enforcement");
    assert_eq!(
        strings(&db.client, "SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint WHERE conname = 'items_qty_present' AND conrelid = 'items'::regclass").await,
        ["always counted"]
    );
    // The NOT VALID NOT NULL still holds for new rows; the NOT ENFORCED check does not.
    assert!(db.client.batch_execute("INSERT INTO items (id, region) VALUES (-1, NULL)").await.is_err());
    db.exec("INSERT INTO items (id, qty) VALUES (-2, 2000000000)").await;
}

/// Name, kind, validated, enforced (where the major has it) of each constraint on `items`.
async fn constraints(db: &TestDb) -> Vec<String> {
    let enforced = if major() >= 18 { "conenforced::text" } else { "'-'" };
    strings(
        &db.client,
        &format!(
            "SELECT conname || ' ' || contype::text || ' ' || convalidated::text || ' ' || {enforced}
               FROM pg_constraint WHERE conrelid = 'items'::regclass ORDER BY conname"
        ),
    )
    .await
}

#[tokio::test]
async fn direct_tls_works_from_postgresql_17_and_never_hangs_before() {
    let (cluster, pki) = tls_cluster(HostAuth::Trust, true).await;
    let url = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} sslnegotiation=direct",
        cluster.port(),
        pki.ca_file.display()
    );
    let started = Instant::now();
    let result = try_connect(&url).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    if cluster.major() >= 17 {
        let c = result.unwrap_or_else(|e| panic!("direct TLS on PostgreSQL {}: {e}", cluster.major()));
        let ssl: bool =
            c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
        assert!(ssl);
        assert!(common::tls::server_log(&cluster).contains("connection authorized"), "logged in");
    } else {
        let err = result.err().unwrap_or_else(|| panic!("PostgreSQL {} accepted direct TLS", cluster.major()));
        assert!(!err.is_refusal(), "a failed connection, not bad settings: {err}");
    }
}

#[tokio::test]
async fn grants_of_each_major_are_carried_over() {
    let db = TestDb::new().await;
    let (maintainer, reader) = (role(&db, "maintainer"), role(&db, "reader"));
    // MAINTAIN (VACUUM, ANALYZE, REINDEX … without owning the table): PostgreSQL 17 and later.
    let maintain = if major() >= 17 { format!("GRANT MAINTAIN ON items TO {maintainer};") } else { String::new() };
    db.exec(&format!(
        "CREATE ROLE {maintainer}; CREATE ROLE {reader};
         CREATE TABLE items (id bigint PRIMARY KEY, qty int, note text, payload text);
         CREATE TABLE oracle (id bigint PRIMARY KEY, qty int, note text, payload text);
         INSERT INTO items (id, qty) SELECT g, g FROM generate_series(1, 2000) g; INSERT INTO oracle SELECT * FROM items;
         GRANT SELECT, UPDATE (qty) ON items TO {reader}; {maintain}"
    ))
    .await;
    let grants = "SELECT grantee::regrole::text || ' ' || privilege_type FROM pg_class, aclexplode(relacl)
                   WHERE oid = 'items'::regclass ORDER BY 1";
    let before = strings(&db.client, grants).await;
    let (outcome, _) = migrate_under_load(
        &db,
        Shape::items(),
        2000,
        "ALTER TABLE items ALTER COLUMN qty TYPE bigint",
        &test_options(),
    )
    .await;
    assert!(outcome.swap.is_some());
    assert_eq!(strings(&db.client, grants).await, before);
    if major() >= 17 {
        assert!(before.contains(&format!("{maintainer} MAINTAIN")), "{before:?}");
    }
}

#[tokio::test]
async fn who_may_cancel_an_autovacuum_depends_on_the_major() {
    let mut db = TestDb::new().await;
    let app = role(&db, "app");
    let dbname = db.url.rsplit('/').next().unwrap().to_owned();
    let grant = if major() >= 18 { format!("GRANT pg_signal_autovacuum_worker TO {app};") } else { String::new() };
    db.exec(&format!(
        "CREATE ROLE {app} LOGIN; GRANT CREATE ON DATABASE {dbname} TO {app}; GRANT CREATE ON SCHEMA public TO {app};
         CREATE TABLE items (id bigint PRIMARY KEY, qty int); ALTER TABLE items OWNER TO {app}; {grant}"
    ))
    .await;
    db.exec(&format!("SET ROLE {app}")).await;
    let plan = ghostwire::plan::plan(&mut db.client, "ALTER TABLE items ALTER COLUMN qty TYPE bigint").await.unwrap();
    let notes: Vec<&str> = plan.privileges.iter().map(|p| p.missing.as_str()).collect();
    let cannot_cancel = notes.contains(&"the right to cancel autovacuum workers");
    // PostgreSQL 18's pg_signal_autovacuum_worker is enough; before it, only a superuser may.
    assert_eq!(cannot_cancel, major() < 18, "{notes:?}");
    assert!(plan.privileges.iter().all(|p| !p.blocks), "{:?}", plan.privileges);
}
