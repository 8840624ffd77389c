//! `migrate --version-schema`: a rename or a drop that old and new code run beside each
//! other. Two writers at once, the old names on the table and the new names through the
//! version schema (search_path in the connection's options), each inserting (identity and
//! defaults, RETURNING), updating, deleting and upserting (ON CONFLICT) with prepared
//! statements, every write mirrored into an oracle in the same transaction; after `finish`
//! the new-names writer goes on without an error and the table equals the oracle. `abort`
//! leaves the table as it was; what cannot work in both versions is refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::items::ghostwire;
use common::proxy::TestProxy;
use common::{TestDb, assert_same_rows, connect, strings};
use ghostwire::proxy::ClientLeg;

fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// A writer through `url`, naming the login column `name_col`; counts its transactions and
/// collects its errors.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

fn writer(url: String, name_col: &'static str, tag: &'static str, with_legacy: bool) -> Writer {
    writer_on(url, "users", name_col, tag, with_legacy)
}

fn writer_on(url: String, table: &'static str, name_col: &'static str, tag: &'static str, with_legacy: bool) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s, d, e) = (Arc::clone(&stop), Arc::clone(&done), Arc::clone(&errors));
    let task = tokio::spawn(async move {
        let mut c = connect(&url).await;
        let legacy = if with_legacy { ", legacy" } else { "" };
        let legacy_value = if with_legacy { ", 'x'" } else { "" };
        let insert = format!(
            "INSERT INTO {table} ({name_col}{legacy}) VALUES ($1{legacy_value}) RETURNING id, verified, visits"
        );
        let upsert = format!(
            "INSERT INTO {table} ({name_col}) VALUES ($1) ON CONFLICT ({name_col}) DO UPDATE SET visits = {table}.visits + 1
             RETURNING id, visits"
        );
        let mut n = 0u64;
        let mut mine: Vec<(i64, String)> = Vec::new();
        while !s.load(Ordering::Relaxed) {
            n += 1;
            let result: Result<(), tokio_postgres::Error> = async {
                let tx = c.transaction().await?;
                match n % 4 {
                    0 | 1 => {
                        let name = format!("{tag}{n}");
                        let row = tx.query_one(&insert, &[&name]).await?;
                        let (id, verified, visits): (i64, bool, i32) = (row.get(0), row.get(1), row.get(2));
                        tx.execute("INSERT INTO oracle VALUES ($1, $2, $3, $4)", &[&id, &name, &verified, &visits])
                            .await?;
                        mine.push((id, name));
                    }
                    2 if !mine.is_empty() => {
                        let (_, name) = mine[(n as usize * 7) % mine.len()].clone();
                        let row = tx.query_one(&upsert, &[&name]).await?;
                        let (id, visits): (i64, i32) = (row.get(0), row.get(1));
                        tx.execute("UPDATE oracle SET visits = $2 WHERE id = $1", &[&id, &visits]).await?;
                    }
                    3 if mine.len() > 5 => {
                        let (id, _) = mine.remove((n as usize * 3) % mine.len());
                        tx.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id]).await?;
                        tx.execute("DELETE FROM oracle WHERE id = $1", &[&id]).await?;
                    }
                    _ => {
                        let sql = format!(
                            "UPDATE {table} SET verified = NOT verified WHERE {name_col} = $1 RETURNING id, verified"
                        );
                        for row in tx.query(&sql, &[&format!("{tag}1")]).await? {
                            let (id, verified): (i64, bool) = (row.get(0), row.get(1));
                            tx.execute("UPDATE oracle SET verified = $2 WHERE id = $1", &[&id, &verified]).await?;
                        }
                    }
                }
                tx.commit().await
            }
            .await;
            if let Err(err) = result {
                e.lock().unwrap().push(ghostwire::connect::describe(&err));
            }
            d.fetch_add(1, Ordering::Relaxed);
        }
    });
    Writer { stop, done, errors, task }
}

impl Writer {
    async fn more(&self, n: u64) {
        let target = self.done.load(Ordering::Relaxed) + n;
        while self.done.load(Ordering::Relaxed) < target {
            assert!(!self.task.is_finished(), "the writer stopped: {:?}", self.errors.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer");
        self.errors.lock().unwrap().clone()
    }
}

/// Drains that succeeded, from the proxy's /metrics.
async fn drained_count(proxy: &TestProxy) -> f64 {
    let (_, text) =
        ghostwire::control::call(&proxy.control, None, "GET", "/metrics", Duration::from_secs(10)).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("ghostwire_proxy_drains_total") && l.contains("\"drained\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn with_search_path(url: &str, path: &str) -> String {
    with_param(url, &format!("options=-c%20search_path%3D{path}"))
}

/// Old and new code write side by side; the old code goes, `finish` contracts, and the
/// new code goes on without an error.
async fn roll_out(db: &TestDb, old: Writer, new: Writer) {
    old.more(30).await;
    new.more(30).await;
    assert!(old.finish().await.is_empty());
    let out = ghostwire(&db.url, &["finish", "users"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    new.more(30).await;
    let errors = new.finish().await;
    assert!(errors.is_empty(), "{errors:?}");
}

async fn users(db: &TestDb) {
    db.exec(
        "CREATE TABLE users (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, username text NOT NULL UNIQUE,
                             verified boolean NOT NULL DEFAULT false, visits int NOT NULL DEFAULT 0, legacy text);
         COMMENT ON COLUMN users.username IS 'the login';
         CREATE TABLE oracle (id bigint PRIMARY KEY, login text NOT NULL, verified boolean NOT NULL, visits int NOT NULL);
         INSERT INTO users (username) SELECT 'seed' || g FROM generate_series(1, 100) g;
         INSERT INTO oracle SELECT id, username, verified, visits FROM users;",
    )
    .await;
}

#[tokio::test]
async fn a_rename_runs_old_and_new_code_side_by_side_until_finish() {
    let db = TestDb::new().await;
    users(&db).await;
    let client = db.connect().await;
    let old = writer(db.url.clone(), "username", "o", false);
    old.more(20).await;
    let out = ghostwire(
        &db.url,
        &["migrate", "--version-schema", "app_v2", "ALTER TABLE users RENAME COLUMN username TO email"],
        None,
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("search_path=app_v2,public"), "{text}");
    let status = ghostwire(&db.url, &["status", "users"], None).await;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("version schema app_v2 open since"), "{status}");
    // The table is untouched; the view shows the new name, with the column's comment.
    let cols = "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attnum > 0 AND NOT attisdropped AND attrelid = ";
    assert_eq!(
        strings(&client, &format!("{cols} 'public.users'::regclass")).await,
        ["id,username,verified,visits,legacy"]
    );
    assert_eq!(
        strings(&client, &format!("{cols} 'app_v2.users'::regclass")).await,
        ["id,email,verified,visits,legacy"]
    );
    assert_eq!(strings(&client, "SELECT col_description('app_v2.users'::regclass, 2)").await, ["the login"]);

    // New code twice: the search_path in its own connection options, and set by the proxy's
    // route for its application_name.
    let new = writer(with_search_path(&db.url, "app_v2,public"), "email", "n", false);
    let proxy =
        TestProxy::start_with_routes(&db.upstream(), ClientLeg::default(), &["application_name=web-v2*:app_v2,public"])
            .await;
    let routed = writer(with_param(&proxy.url_for(&db.url), "application_name=web-v2-1"), "email", "r", false);
    new.more(40).await;
    routed.more(40).await;
    old.more(40).await;
    assert_eq!(proxy.status().routes[0].sessions, 1, "{:?}", proxy.status().routes);
    let status = ghostwire(&db.url, &["status", "users", "--proxy", &proxy.control], None).await;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("route application_name=web-v2*:app_v2,public (search_path app_v2,public): 1 session(s) now"),
        "{status}"
    );
    let old_errors = old.finish().await;
    assert!(old_errors.is_empty(), "the old code failed: {old_errors:?}");
    // The contract runs while the proxy holds new queries.
    let drains = drained_count(&proxy).await;
    let out = ghostwire(&db.url, &["finish", "users", "--proxy", &proxy.control], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(drained_count(&proxy).await, drains + 1.0, "drained once for the contract");
    assert_eq!(proxy.status().gate.state, ghostwire::proxy::gate::GateState::Open, "and opened again");
    new.more(40).await; // the same prepared statements, now on the table itself
    routed.more(40).await;
    let new_errors = new.finish().await;
    assert!(new_errors.is_empty(), "the new code failed: {new_errors:?}");
    let routed_errors = routed.finish().await;
    assert!(routed_errors.is_empty(), "the new code through the proxy failed: {routed_errors:?}");

    assert_eq!(
        strings(&client, &format!("{cols} 'public.users'::regclass")).await,
        ["id,email,verified,visits,legacy"]
    );
    assert!(strings(&client, "SELECT nspname FROM pg_namespace WHERE nspname = 'app_v2'").await.is_empty());
    assert_same_rows(&client, "SELECT id, email, verified, visits FROM users", "SELECT * FROM oracle").await;
    assert_eq!(strings(&client, "SELECT phase FROM ghostwire.migrations").await, ["finished"]);
}

#[tokio::test]
async fn a_dropped_column_stays_for_old_code_until_finish_and_abort_undoes_it() {
    let db = TestDb::new().await;
    users(&db).await;
    let client = db.connect().await;
    let reader = common::role(&db, "reader");
    client.batch_execute(&format!("CREATE ROLE {reader}; GRANT SELECT ON users TO {reader}")).await.unwrap();
    let out = ghostwire(
        &db.url,
        &["migrate", "--yes", "--version-schema", "app_v3", "ALTER TABLE users DROP COLUMN legacy"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The views carry the grants (and USAGE on the schema), and check them as the invoker.
    let granted = format!(
        "SELECT has_table_privilege('{reader}', 'app_v3.users', 'SELECT')::text,
                has_table_privilege('{reader}', 'app_v3.users', 'INSERT')::text,
                has_schema_privilege('{reader}', 'app_v3', 'USAGE')::text"
    );
    let row = client.query_one(&granted, &[]).await.unwrap();
    let seen: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(seen, ("true".into(), "false".into(), "true".into()));
    if common::major() >= 15 {
        assert_eq!(
            strings(
                &client,
                "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid = 'app_v3.users'::regclass"
            )
            .await,
            ["security_invoker=true"]
        );
    }
    let old = writer(db.url.clone(), "username", "o", true);
    let new = writer(with_search_path(&db.url, "app_v3,public"), "username", "n", false);
    roll_out(&db, old, new).await;
    assert_same_rows(&client, "SELECT id, username, verified, visits FROM users", "SELECT * FROM oracle").await;
    assert!(
        strings(&client, "SELECT attname FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'legacy'")
            .await
            .is_empty()
    );

    // Abort, before finish: the version schema goes, the table stays as it was.
    let out = ghostwire(
        &db.url,
        &["migrate", "--version-schema", "app_v4", "ALTER TABLE users RENAME COLUMN visits TO hits"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ghostwire(&db.url, &["abort", "users"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(strings(&client, "SELECT nspname FROM pg_namespace WHERE nspname = 'app_v4'").await.is_empty());
    assert_eq!(
        strings(&client, "SELECT attname FROM pg_attribute WHERE attrelid = 'users'::regclass AND attnum = 4").await,
        ["visits"]
    );
}

#[tokio::test]
async fn plan_warns_and_what_cannot_work_in_both_versions_is_refused() {
    let db = TestDb::new().await;
    users(&db).await;
    let out = ghostwire(&db.url, &["plan", "ALTER TABLE users RENAME COLUMN username TO email"], None).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--version-schema"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Inserts through the new version would leave out a NOT NULL column without a default.
    let out = ghostwire(
        &db.url,
        &["migrate", "--yes", "--version-schema", "v2", "ALTER TABLE users DROP COLUMN username"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("NOT NULL without a default") && said.contains("SET DEFAULT <value>, DROP COLUMN"), "{said}");
    // A SET DEFAULT goes with a DROP COLUMN of the same column only.
    let out = ghostwire(
        &db.url,
        &[
            "migrate",
            "--yes",
            "--version-schema",
            "v2",
            "ALTER TABLE users ALTER COLUMN visits SET DEFAULT 1, DROP COLUMN legacy",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("only go with a DROP COLUMN"), "{said}");
    let out = ghostwire(
        &db.url,
        &["migrate", "--version-schema", "v2", "ALTER TABLE users ALTER COLUMN visits TYPE bigint"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let client = db.connect().await;
    assert!(strings(&client, "SELECT nspname FROM pg_namespace WHERE nspname = 'v2'").await.is_empty());
}

#[tokio::test]
async fn a_not_null_column_is_dropped_with_a_default_the_expand_gives_it() {
    let db = TestDb::new().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, login text NOT NULL,
                                    region text NOT NULL)",
        )
        .await
        .unwrap();
    let drop = "ALTER TABLE accounts ALTER COLUMN region SET DEFAULT 'eu', DROP COLUMN region";
    let region_default = "SELECT coalesce(pg_get_expr(d.adbin, d.adrelid), 'none') FROM pg_attribute a
                            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                           WHERE a.attrelid = 'accounts'::regclass AND a.attname = 'region'";
    for (schema, end) in [("v5", "abort"), ("v6", "finish")] {
        let out = ghostwire(&db.url, &["migrate", "--yes", "--version-schema", schema, drop], None).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(strings(&client, region_default).await, ["'eu'::text"]);
        // New code leaves the column out and gets the default; old code still gives it.
        let new = connect(&with_search_path(&db.url, &format!("{schema},public"))).await;
        new.execute("INSERT INTO accounts (login) VALUES ($1)", &[&format!("new-{schema}")]).await.unwrap();
        client
            .execute("INSERT INTO accounts (login, region) VALUES ($1, 'us')", &[&format!("old-{schema}")])
            .await
            .unwrap();
        let out = ghostwire(&db.url, &[end, "accounts"], None).await;
        assert!(out.status.success(), "{end}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            strings(&client, &format!("SELECT nspname FROM pg_namespace WHERE nspname = '{schema}'")).await.is_empty()
        );
        if end == "abort" {
            // As it was: NOT NULL, no default; the rows written meanwhile keep their values.
            assert_eq!(strings(&client, region_default).await, ["none"]);
            assert_eq!(
                strings(&client, "SELECT login || ':' || region FROM accounts ORDER BY id").await,
                ["new-v5:eu", "old-v5:us"]
            );
            let err = client.execute("INSERT INTO accounts (login) VALUES ('x')", &[]).await.unwrap_err();
            assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION));
        } else {
            assert!(strings(&client, region_default).await.is_empty(), "the column is gone");
            new.execute("INSERT INTO accounts (login) VALUES ('after')", &[]).await.unwrap();
        }
    }
}

#[tokio::test]
async fn the_proxy_routes_sessions_to_a_search_path_by_application_name() {
    let db = TestDb::new().await;
    let routes = ["application_name=web-v2*:app_v2, public", "user=nobody:x"];
    let proxy = TestProxy::start_with_routes(&db.upstream(), ClientLeg::default(), &routes).await;
    let through = proxy.url_for(&db.url);
    let path = |url: String| async move {
        let c = connect(&url).await;
        let p: String = c.query_one("SELECT current_setting('search_path')", &[]).await.unwrap().get(0);
        (c, p)
    };
    let (_v2, p) = path(with_param(&through, "application_name=web-v2-7")).await;
    assert_eq!(p, "app_v2, public");
    // The route wins over a search_path the client asked for itself.
    let (_own, p) = path(with_param(&with_search_path(&through, "elsewhere"), "application_name=web-v2-8")).await;
    assert_eq!(p, "app_v2, public");
    let (_v1, p) = path(with_param(&through, "application_name=web-v1")).await;
    assert_eq!(p, "\"$user\", public");
    let (_none, p) = path(through.clone()).await;
    assert_eq!(p, "\"$user\", public");
    let status = proxy.status();
    assert_eq!((status.routes[0].sessions, status.routes[0].routed_total), (2, 2), "{:?}", status.routes);
    assert_eq!(status.routes[1].sessions, 0);
    // A bad rule is refused before the proxy starts.
    let out = ghostwire(
        &db.url,
        &["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--route", "app=x"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=PATTERN:SEARCH_PATH"));
}

#[tokio::test]
async fn a_table_rename_goes_through_a_version_schema_too() {
    let db = TestDb::new().await;
    users(&db).await;
    let client = db.connect().await;
    let out =
        ghostwire(&db.url, &["migrate", "--version-schema", "app_v5", "ALTER TABLE users RENAME TO accounts"], None)
            .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let old = writer(db.url.clone(), "username", "o", false);
    let new = writer_on(with_search_path(&db.url, "app_v5,public"), "accounts", "username", "n", false);
    roll_out(&db, old, new).await;
    assert_same_rows(&client, "SELECT id, username, verified, visits FROM accounts", "SELECT * FROM oracle").await;
    assert!(strings(&client, "SELECT to_regclass('users')::text").await.iter().all(|s| s.is_empty()));
}
