//! A role that is not a superuser: `plan` names, per missing privilege, what it stops and
//! what to grant; `migrate` refuses (exit 2, nothing changed) while one that the run needs
//! is missing, and runs once it is granted.

mod common;

use common::{TestDb, role, strings};
use tokio::process::Command;

async fn ghostwire(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test]
async fn missing_privileges_are_named_with_their_grant_and_refused_before_anything_changes() {
    let db = TestDb::new().await;
    let (app, reporter) = (role(&db, "app"), role(&db, "reporter"));
    let dbname = db.url.rsplit('/').next().unwrap().to_owned();
    db.exec(&format!(
        "CREATE ROLE {app} LOGIN; CREATE ROLE {reporter} LOGIN;
         REVOKE CREATE ON SCHEMA public FROM PUBLIC; REVOKE CREATE ON DATABASE {dbname} FROM PUBLIC;
         CREATE TABLE items (id bigint PRIMARY KEY, qty int);
         INSERT INTO items SELECT g, g FROM generate_series(1, 500) g;
         ALTER TABLE items OWNER TO {app};
         CREATE VIEW big_items AS SELECT id FROM items WHERE qty > 100;
         ALTER VIEW big_items OWNER TO {reporter};
         GRANT SELECT ON items TO {reporter};"
    ))
    .await;
    let url = db.url.replace("postgres@", &format!("{app}@"));
    let statement = "ALTER TABLE items ALTER COLUMN qty TYPE bigint";
    let out = ghostwire(&url, &["plan", statement]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    for needle in [
        format!("Missing:   CREATE on database {dbname}"),
        format!("GRANT CREATE ON DATABASE {dbname} TO {app}"),
        format!("GRANT CREATE ON SCHEMA public TO {app}"),
        format!("ownership of view big_items (its owner is {reporter})"),
        "Note:      the right to cancel autovacuum workers".to_owned(),
        format!("GRANT pg_read_all_stats TO {app}"),
        "ghostwire migrate refuses this".to_owned(),
    ] {
        assert!(shown.contains(&needle), "expected {needle:?} in:\n{shown}");
    }
    let out = ghostwire(&url, &["plan", "--json", statement]).await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let blocking = doc["privileges"].as_array().unwrap().iter().filter(|p| p["blocks"] == true).count();
    assert_eq!(blocking, 3, "{doc}");

    let out = ghostwire(&url, &["migrate", "--yes", statement]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("refused before changing anything"), "{}", text(&out));
    let state = strings(&db.client, "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'ghostwire%'").await;
    assert!(state.is_empty(), "something changed: {state:?}");

    db.exec(&format!(
        "GRANT CREATE ON DATABASE {dbname} TO {app}; GRANT CREATE ON SCHEMA public TO {app};
         ALTER VIEW big_items OWNER TO {app};"
    ))
    .await;
    let out = ghostwire(&url, &["plan", statement]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("Missing:"), "{}", text(&out));
    // A limit the role cannot judge is refused too.
    let out = ghostwire(&url, &["migrate", "--yes", "--max-active", "5", statement]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--max-active and --critical-active need"), "{}", text(&out));
    let out = ghostwire(&url, &["migrate", "--yes", statement]).await;
    assert!(out.status.success(), "{}", text(&out));
    let t = strings(&db.client, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'items'::regclass AND attname = 'qty'").await;
    assert_eq!(t, ["bigint"]);
    let owner =
        strings(&db.client, "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = 'items'::regclass").await;
    assert_eq!(owner, vec![app]);
    let out = ghostwire(&url, &["finish", "items"]).await;
    assert!(out.status.success(), "{}", text(&out));
}
