//! Real drivers through the proxy, each with its own prepared statements, across a swap
//! (int → bigint) and three instant changes (varchar(20) → text, DROP COLUMN, ADD COLUMN):
//! asyncpg (its statement cache, binary results), psycopg 3 (server-side statements from
//! the first execution, through libpq), pgjdbc (`prepareThreshold=1`), pgx v4 (its
//! statement cache: described once, then Bind and Execute alone, binary results) and
//! node-postgres (named statements, every run described, text results). Three sessions of
//! each, two running every round as a transaction block; none may see an error or a wrong
//! value. The clients are `tests/drivers/client.py`, `Client.java`, `client.go` and
//! `client.js`.
//!
//! `.ci/run` installs the drivers (`pip install asyncpg psycopg[binary]`; Debian's
//! `libpostgresql-jdbc-java` and a JRE; `golang-go` and `golang-github-jackc-pgx-v4-dev`,
//! built in GOPATH mode; `npm install pg` under `/opt/ghostwire-drivers`). Without one, its
//! test says so on stderr and passes, except under `CI=true`, where a missing driver fails
//! it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::proxy::{TestProxy, orders};
use common::{TestDb, run_migration, test_options};
use ghostwire::migrate::Options;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Asyncpg,
    Psycopg,
    Jdbc,
    Pgx,
    Node,
}

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";
/// Where Debian's Go packages keep their sources (a GOPATH).
const GOPATH: &str = "/usr/share/gocode";
/// Where `.ci/run` installs node-postgres.
const NODE_PATH: &str = "/opt/ghostwire-drivers/node_modules";

/// The pgx client, built once per test run.
fn pgx_client() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("pgx-client")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers").join(name)
}

impl Kind {
    /// Why the driver cannot run here, if it cannot.
    fn missing(self) -> Option<String> {
        let works = |program: &str, args: &[&str]| {
            std::process::Command::new(program)
                .args(args)
                .env("NODE_PATH", NODE_PATH)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        match self {
            Kind::Asyncpg | Kind::Psycopg => {
                let module = if matches!(self, Kind::Asyncpg) { "asyncpg" } else { "psycopg" };
                (!works("python3", &["-c", &format!("import {module}")]))
                    .then(|| format!("python3 cannot import {module} (pip install asyncpg 'psycopg[binary]')"))
            }
            Kind::Jdbc => (!works("java", &["-version"]) || !Path::new(JDBC_JAR).exists()).then(|| {
                format!("no java or no {JDBC_JAR} (apt-get install default-jre-headless libpostgresql-jdbc-java)")
            }),
            Kind::Pgx => (!works("go", &["version"])
                || !Path::new(GOPATH).join("src/github.com/jackc/pgx/v4").exists())
            .then(|| "no go or no pgx v4 (apt-get install golang-go golang-github-jackc-pgx-v4-dev)".to_owned()),
            Kind::Node => (!works("node", &["-e", "require('pg')"]))
                .then(|| format!("no node or no pg in {NODE_PATH} (npm install --prefix /opt/ghostwire-drivers pg)")),
        }
    }

    /// Builds the client where it needs building (pgx: a Go program).
    async fn build(self) {
        if !matches!(self, Kind::Pgx) {
            return;
        }
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(pgx_client())
            .arg(script("client.go"))
            .env("GO111MODULE", "off")
            .env("GOPATH", GOPATH)
            .env("GOFLAGS", "")
            .output()
            .await
            .expect("go runs");
        assert!(out.status.success(), "go build of the pgx client: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn command(self, host: &str, port: &str, db: &str, first: i32, block: bool) -> Command {
        let mode = if block { "block" } else { "single" };
        let first = first.to_string();
        let mut cmd = match self {
            Kind::Asyncpg | Kind::Psycopg => {
                let mut c = Command::new("python3");
                c.arg(script("client.py")).arg(if matches!(self, Kind::Asyncpg) { "asyncpg" } else { "psycopg" });
                c
            }
            Kind::Jdbc => {
                let mut c = Command::new("java");
                c.args(["-cp", JDBC_JAR]).arg(script("Client.java"));
                c
            }
            Kind::Pgx => Command::new(pgx_client()),
            Kind::Node => {
                let mut c = Command::new("node");
                c.arg(script("client.js")).env("NODE_PATH", NODE_PATH);
                c
            }
        };
        cmd.args([host, port, db, "postgres", &first, mode]);
        cmd
    }
}

/// One driver's session: its rounds and its errors, read off its standard output.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    ready: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Session {
    fn start(kind: Kind, proxy: &TestProxy, db: &TestDb, first: i32, block: bool) -> Session {
        let name = db.url.rsplit('/').next().unwrap().to_owned();
        let (host, port) = (proxy.addr.ip().to_string(), proxy.addr.port().to_string());
        let mut child = kind
            .command(&host, &port, &name, first, block)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start the {kind:?} client: {e}"));
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (ready, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (r, n, e) = (Arc::clone(&ready), Arc::clone(&rounds), Arc::clone(&errors));
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match line.as_str() {
                    "ready" => r.store(true, Ordering::Relaxed),
                    "round" => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    "done" => break,
                    other => e.lock().unwrap().push(other.to_owned()),
                }
            }
        });
        Session { child, stdin, ready, rounds, errors, reader }
    }

    /// Waits for `n` more rounds (two minutes at most: the JVM starts slowly).
    async fn rounds_more(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.ready.load(Ordering::Relaxed) {
            self.alive(deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let target = self.rounds.load(Ordering::Relaxed) + n;
        while self.rounds.load(Ordering::Relaxed) < target {
            self.alive(deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn alive(&mut self, deadline: Instant) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the client ended ({status}): {:?}", self.errors.lock().unwrap());
        }
        assert!(Instant::now() < deadline, "the client made no progress: {:?}", self.errors.lock().unwrap());
    }

    async fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.reader).await;
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        self.errors.lock().unwrap().clone()
    }
}

async fn survives_a_swap_and_instant_changes(kind: Kind) {
    if let Some(why) = kind.missing() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{kind:?} is not installed under CI: {why}");
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "skipped the {kind:?} client: {why}");
        return;
    }
    kind.build().await;
    let db = TestDb::new().await;
    orders(&db).await;
    let proxy = TestProxy::start(&db.upstream()).await;
    let mut sessions: Vec<Session> = (0..3).map(|i| Session::start(kind, &proxy, &db, i * 10_000, i > 0)).collect();
    for s in &mut sessions {
        s.rounds_more(5).await;
    }
    let opts = Options { proxies: vec![proxy.control.clone()], ..test_options() };
    for statement in [
        "ALTER TABLE orders ALTER COLUMN amount TYPE bigint",
        "ALTER TABLE orders ALTER COLUMN note TYPE text",
        "ALTER TABLE orders DROP COLUMN extra",
        "ALTER TABLE orders ADD COLUMN added int DEFAULT 5",
    ] {
        run_migration(&db.url, statement, &opts, None).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
        for s in &mut sessions {
            s.rounds_more(5).await;
        }
        common::items::ghostwire(&db.url, &["finish", "orders"], None).await;
    }
    let mut errors = Vec::new();
    for s in sessions {
        errors.extend(s.finish().await);
    }
    assert!(
        errors.is_empty(),
        "{kind:?}: {} client error(s), the first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let prepared = proxy.status().prepared;
    assert_eq!(prepared.errors_passed_on, 0, "{prepared:?}");
    assert!(prepared.reprepared > 0, "the drivers' statements were prepared again: {prepared:?}");
}

#[tokio::test]
async fn asyncpg_sees_no_error_across_a_swap_and_instant_changes() {
    survives_a_swap_and_instant_changes(Kind::Asyncpg).await;
}

#[tokio::test]
async fn psycopg_sees_no_error_across_a_swap_and_instant_changes() {
    survives_a_swap_and_instant_changes(Kind::Psycopg).await;
}

#[tokio::test]
async fn pgjdbc_sees_no_error_across_a_swap_and_instant_changes() {
    survives_a_swap_and_instant_changes(Kind::Jdbc).await;
}

#[tokio::test]
async fn pgx_sees_no_error_across_a_swap_and_instant_changes() {
    survives_a_swap_and_instant_changes(Kind::Pgx).await;
}

#[tokio::test]
async fn node_postgres_sees_no_error_across_a_swap_and_instant_changes() {
    survives_a_swap_and_instant_changes(Kind::Node).await;
}
