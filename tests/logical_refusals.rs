//! `--capture logical` is refused before anything changes (exit 2), with the reason and the
//! fix, where it cannot work: a replica identity that would not give the key (publishing
//! such a table would make the application's UPDATEs and DELETEs fail, so it never is), a
//! role without REPLICATION, a server without `wal_level = logical` or a free slot and WAL
//! sender. `--capture auto` falls back to triggers there, saying why.

mod common;

use common::items::ghostwire;
use common::{TestDb, role, strings};
use ghostwire::ephemeral::{Cluster, ClusterOptions};

const RETYPE: &str = "ALTER COLUMN qty TYPE bigint";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Nothing of a migration was made: no publication, no slot of this database, no state.
async fn nothing_made(client: &tokio_postgres::Client) {
    let made = strings(
        client,
        "SELECT 'publication ' || pubname FROM pg_publication
         UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database()
         UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname LIKE 'ghostwire%'",
    )
    .await;
    assert!(made.is_empty(), "{made:?}");
}

#[tokio::test]
async fn a_replica_identity_that_would_not_give_the_key_is_refused() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE nothing (id bigint PRIMARY KEY, qty int) ; ALTER TABLE nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE uniq (id bigint NOT NULL UNIQUE, qty int);
         CREATE TABLE other (id bigint PRIMARY KEY, code text NOT NULL, qty int);
         CREATE UNIQUE INDEX other_code ON other (code); ALTER TABLE other REPLICA IDENTITY USING INDEX other_code;
         INSERT INTO nothing SELECT g, g FROM generate_series(1, 100) g;
         INSERT INTO uniq SELECT g, g FROM generate_series(1, 100) g;
         INSERT INTO other SELECT g, 'c' || g, g FROM generate_series(1, 100) g;",
    )
    .await;
    for (table, reason, fix) in [
        ("nothing", "REPLICA IDENTITY NOTHING", "REPLICA IDENTITY USING INDEX nothing_pkey"),
        ("uniq", "no primary key and REPLICA IDENTITY DEFAULT", "REPLICA IDENTITY USING INDEX uniq_id_key"),
        ("other", "replica identity is index other_code", "REPLICA IDENTITY USING INDEX other_pkey"),
    ] {
        let statement = format!("ALTER TABLE {table} {RETYPE}");
        let out = ghostwire(&db.url, &["migrate", "--capture", "logical", &statement], None).await;
        assert_eq!(out.status.code(), Some(2), "{table}: {}", stderr(&out));
        let said = stderr(&out);
        assert!(said.contains(reason) && said.contains(fix) && said.contains("--capture trigger"), "{table}: {said}");
        nothing_made(&db.client).await;
    }
    // `plan` says which capture modes each table allows, and why not.
    let out = ghostwire(&db.url, &["plan", &format!("ALTER TABLE uniq {RETYPE}")], None).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("Capture:    trigger (the default): available"), "{said}");
    assert!(
        said.contains("Capture:    logical (--capture logical): not available: ") && said.contains("no primary key"),
        "{said}"
    );
    db.exec("CREATE TABLE fine (id bigint PRIMARY KEY, qty int)").await;
    let out = ghostwire(&db.url, &["plan", "--json", &format!("ALTER TABLE fine {RETYPE}")], None).await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["capture"][1], serde_json::json!({"mode": "logical", "available": true, "why_not": []}), "{doc}");
    // Never published: the application's updates and deletes still work.
    db.exec("UPDATE uniq SET qty = qty + 1; DELETE FROM uniq WHERE id = 1").await;
    // `auto` falls back to triggers and says why.
    let out = ghostwire(&db.url, &["migrate", "--capture", "auto", &format!("ALTER TABLE uniq {RETYPE}")], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("capturing with triggers") && said.contains("no primary key"), "{said}");
    assert_eq!(strings(&db.client, "SELECT capture FROM ghostwire.migrations").await, ["trigger"]);
    // And on the table with no identity at all, too.
    let out =
        ghostwire(&db.url, &["migrate", "--capture", "auto", "ALTER TABLE nothing ALTER COLUMN qty TYPE bigint"], None)
            .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn a_role_without_replication_is_refused() {
    let db = TestDb::new().await;
    let app = role(&db, "app");
    let dbname = db.url.rsplit('/').next().unwrap().to_owned();
    db.exec(&format!(
        "CREATE ROLE {app} LOGIN; ALTER DATABASE {dbname} OWNER TO {app};
         CREATE TABLE items (id bigint PRIMARY KEY, qty int); ALTER TABLE items OWNER TO {app};
         INSERT INTO items SELECT g, g FROM generate_series(1, 100) g;"
    ))
    .await;
    let url = db.url.replace("postgres@", &format!("{app}@"));
    let out = ghostwire(&url, &["migrate", "--capture", "logical", &format!("ALTER TABLE items {RETYPE}")], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no REPLICATION attribute") && stderr(&out).contains("ALTER ROLE"),
        "{}",
        stderr(&out)
    );
    nothing_made(&db.client).await;
    // With it, the same role runs it.
    db.exec(&format!("ALTER ROLE {app} REPLICATION")).await;
    let out = ghostwire(&url, &["migrate", "--capture", "logical", &format!("ALTER TABLE items {RETYPE}")], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(strings(&db.client, "SELECT capture FROM ghostwire.migrations").await, ["logical"]);
}

#[tokio::test]
async fn a_server_without_logical_wal_slots_or_senders_is_refused() {
    let options = ClusterOptions::default()
        .with_setting("wal_level", "replica")
        .with_setting("max_replication_slots", 0)
        .with_setting("max_wal_senders", 0);
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(options)).await.unwrap().unwrap();
    let url = cluster.url("postgres");
    let client = common::connect(&url).await;
    client.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, qty int)").await.unwrap();
    let out = ghostwire(&url, &["migrate", "--capture", "logical", &format!("ALTER TABLE items {RETYPE}")], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    for needle in ["wal_level is replica", "no free replication slot", "no free WAL sender"] {
        assert!(said.contains(needle), "{needle:?} in {said}");
    }
    nothing_made(&client).await;
}
