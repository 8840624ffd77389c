//! Helpers shared by the integration tests: a fresh database on the shared throwaway
//! cluster, and a connected client.
#![allow(dead_code)]

use ghostwire::ephemeral::Cluster;
use tokio_postgres::Client;

/// A fresh, empty database on the process-wide throwaway cluster.
pub struct TestDb {
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let cluster = Cluster::shared().expect("start the throwaway PostgreSQL cluster");
        let url = cluster.fresh_database().await.expect("create a fresh database");
        let client = connect(&url).await;
        TestDb { url, client }
    }

    pub async fn exec(&self, sql: &str) {
        if let Err(e) = self.client.batch_execute(sql).await {
            panic!("setup SQL failed: {e:?}\n{sql}");
        }
    }

    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// The server's `host:port`, for a proxy in front of it.
    pub fn upstream(&self) -> String {
        self.url.split('@').nth(1).unwrap().split('/').next().unwrap().to_owned()
    }
}

/// Connects through ghostwire's own connection code (TLS and all, as the URL says).
pub async fn connect(url: &str) -> Client {
    match try_connect(url).await {
        Ok(c) => c,
        Err(e) => panic!("connect: {e}"),
    }
}

pub async fn try_connect(url: &str) -> Result<Client, ghostwire::connect::ConnectError> {
    ghostwire::connect::connect(&ghostwire::connect::Params::from_conninfo(Some(url))?).await
}

/// The major version of the shared cluster's server (14 … 18).
pub fn major() -> u32 {
    Cluster::shared().expect("the shared cluster").major()
}

/// Whether a `program` that works with the server is installed (pg_basebackup works only
/// with servers of its major or older; other majors' packages carry no client programs).
/// When none is, says on the real stderr which test is skipped and why.
pub fn has_client_for_server(cluster: &Cluster, program: &str, test: &str) -> bool {
    match cluster.binaries().client_for_server(program) {
        Ok(_) => true,
        Err(why) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "skipped {test} on PostgreSQL {}: {why}",
                cluster.binaries().version
            );
            false
        }
    }
}

/// A role name unique to this database (roles are cluster-wide; tests run in parallel).
pub fn role(db: &TestDb, base: &str) -> String {
    let db_name = db.url.rsplit('/').next().unwrap_or("db");
    format!("{base}_{db_name}")
}

pub mod items;
pub mod proxy;
pub mod running;
pub mod tls;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use ghostwire::migrate::{self, MigrateError, Options, Outcome, PhaseHook, Settings, Silent};
use workload::{Counters, Shape, Workload};

/// Options for small test tables: many small chunks and batches, so writes interleave.
pub fn test_options() -> Options {
    Options {
        settings: Settings { chunk_time_ms: 20, chunk_rows: 300, ..Settings::default() },
        lock_timeout: Duration::from_millis(200),
        cutover_attempts: 20,
        catchup_batch: 200,
        verify_range_rows: 500,
        parallel: 2,
        yes: true,
        capture: capture_under_test(),
        ..Options::default()
    }
}

/// The capture the in-process migrations use: triggers, or logical with
/// `GHOSTWIRE_TEST_CAPTURE=logical` (how `tests/logical.rs` runs the trigger suite again).
pub fn capture_under_test() -> ghostwire::migrate::capture::Choice {
    match std::env::var("GHOSTWIRE_TEST_CAPTURE").as_deref() {
        Ok("logical") => ghostwire::migrate::capture::Choice::Logical,
        _ => ghostwire::migrate::capture::Choice::Trigger,
    }
}

/// A hook that lets `n` more writer transactions commit at the start of every phase.
pub fn writes_each_phase(counters: Arc<Counters>, n: u64) -> PhaseHook {
    Arc::new(move |_phase| {
        let counters = Arc::clone(&counters);
        Box::pin(async move { workload::wait_for_more(&counters, n).await })
    })
}

pub fn config(url: &str) -> ghostwire::connect::Params {
    ghostwire::connect::Params::from_conninfo(Some(url)).expect("a valid URL")
}

pub async fn run_migration(
    url: &str,
    statement: &str,
    opts: &Options,
    hook: Option<PhaseHook>,
) -> Result<Outcome, MigrateError> {
    let ctx = migrate::Context::new(&Silent, opts).with_hook(hook);
    migrate::migrate(&config(url), statement, opts, &ctx).await
}

/// Runs a migration while writers change the table in every phase (and after the swap);
/// returns the outcome and the writers' commit count. Panics if a writer failed.
pub async fn migrate_under_load(
    db: &TestDb,
    shape: Shape,
    first_key: i64,
    statement: &str,
    opts: &Options,
) -> (Outcome, u64) {
    let load = Workload::start(&db.url, shape, 2, first_key, 7);
    load.wait_for_more(30).await;
    let hook = writes_each_phase(Arc::clone(&load.counters), 10);
    let outcome = run_migration(&db.url, statement, opts, Some(hook)).await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => panic!("migration failed: {e}"),
    };
    load.wait_for_more(30).await; // the writers keep working on the new table
    let commits = load.stop().await;
    (outcome, commits)
}

/// Asserts that two queries return the same multiset of rows.
pub async fn assert_same_rows(client: &Client, actual: &str, expected: &str) {
    let count = |sql: String| async move {
        client.query_one(&sql, &[]).await.unwrap_or_else(|e| panic!("{e:?}\n{sql}")).get::<_, i64>(0)
    };
    let missing = count(format!("SELECT count(*) FROM (({expected}) EXCEPT ALL ({actual})) x")).await;
    let extra = count(format!("SELECT count(*) FROM (({actual}) EXCEPT ALL ({expected})) x")).await;
    let total = count(format!("SELECT count(*) FROM ({expected}) x")).await;
    assert_eq!(
        (missing, extra),
        (0, 0),
        "rows differ from the oracle ({total} expected): {missing} missing, {extra} extra"
    );
    assert!(total > 0, "the oracle is empty");
}

/// Rows of `sql` as one string per row (for small result sets in assertions).
pub async fn strings(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{sql}"))
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
}

/// Everything a migration may leave behind, for "no debris" checks.
pub async fn debris(client: &Client, id: i64) -> Vec<String> {
    strings(
        client,
        &format!(
            "SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname LIKE 'ghostwire\\_{id}%'
             UNION ALL SELECT 'table ' || relname FROM pg_class
              WHERE relname IN ('changes_{id}', 'changes_{id}_intact', 'revert_changes_{id}', 'copy_round_{id}')
             UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE 'capture\\_{id}\\_%' OR proname LIKE 'revert\\_{id}\\_%'
             UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE 'ghostwire\\_{id}\\_%'"
        ),
    )
    .await
}

/// True once a migration's copy has passed 1,000 rows (false before the state exists).
pub const COPY_UNDER_WAY: &str =
    "SELECT coalesce((SELECT rows_copied >= 1000 FROM ghostwire.migrations WHERE phase = 'copy'), false)";

/// Polls `sql` (one boolean) until it returns true; fails the test after a minute.
pub async fn wait_for(client: &Client, sql: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !client.query_one(sql, &[]).await.map(|r| r.get::<_, bool>(0)).unwrap_or(false) {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {sql}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The newest `NAME-<hash>` test executable in `dir` (beside the running one).
pub fn test_binary(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_prefix(&prefix).is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
}
