//! The cost of change capture on the application's writes: `cargo bench --bench capture`.
//!
//! On a throwaway cluster, `accounts(id bigserial pk, balance bigint, note text)` with
//! `GHOSTWIRE_BENCH_ROWS` rows (default 200,000). pgbench writes to it at full speed (no
//! rate limit; `-c 4 -j 2`, each transaction an UPDATE of a random row and an INSERT) for
//! `GHOSTWIRE_BENCH_SECONDS` (default 10), in one run, interleaved `GHOSTWIRE_BENCH_RUNS`
//! times (default 3):
//!   1. with no capture (the baseline),
//!   2. with trigger capture on (`ghostwire migrate`, its copy held by a throttle query that
//!      is always true, so only the capture is measured),
//!   3. with logical capture on (`--capture logical`, held the same way).
//!
//! It prints each mode's median transactions per second and its ratio to no capture; then
//! the same at a fixed rate below saturation (`GHOSTWIRE_BENCH_RATE`, default 2000
//! transactions/s, `-R`), where every mode keeps up and the average latency shows what
//! the capture adds to each write itself. On a machine with few cores, full speed measures
//! mostly the CPU that decoding and logging take from pgbench: logical capture moves its
//! work off the write path (to the walsender and ghostwire), not off the machine.

use std::process::Stdio;
use std::time::{Duration, Instant};

use ghostwire::ephemeral::{Cluster, ClusterOptions};
use tokio_postgres::Client;

const CHANGE: &str = "ALTER TABLE accounts ALTER COLUMN balance TYPE numeric";
const SCRIPT: &str = "\\set id random(1, :rows)
UPDATE accounts SET balance = balance + 1 WHERE id = :id;
INSERT INTO accounts (balance, note) VALUES (:id, 'bench');
";

async fn connect(url: &str) -> Client {
    let params = ghostwire::connect::Params::from_conninfo(Some(url)).expect("a valid URL");
    ghostwire::connect::connect(&params).await.expect("connect")
}

async fn load(client: &Client, rows: i64) {
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS ghostwire CASCADE; DROP TABLE IF EXISTS accounts;
             CREATE TABLE accounts (id bigserial PRIMARY KEY, balance bigint NOT NULL, note text);
             INSERT INTO accounts (balance, note) SELECT g, 'account ' || g FROM generate_series(1, {rows}) g;"
        ))
        .await
        .expect("load");
    client.batch_execute("VACUUM ANALYZE accounts").await.expect("vacuum");
    client.batch_execute("CHECKPOINT").await.expect("checkpoint");
}

/// pgbench at full speed (no `rate`) or at `rate`; returns (transactions per second,
/// average latency in ms).
async fn pgbench(cluster: &Cluster, port: u16, seconds: u32, rows: i64, rate: Option<u32>) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("script.sql"), SCRIPT).expect("the script");
    let out = tokio::process::Command::new(cluster.binaries().path("pgbench"))
        .current_dir(dir.path())
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n", "-M", "prepared"])
        .args(["-c", "4", "-j", "2", "-T", &seconds.to_string(), "-f", "script.sql"])
        .args(rate.map(|r| vec!["-R".to_owned(), r.to_string()]).unwrap_or_default())
        .arg("-D")
        .arg(format!("rows={rows}"))
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix).and_then(|r| r.split_whitespace().next()?.parse().ok()))
            .unwrap_or_else(|| {
                panic!("no {prefix:?} in pgbench's output: {text}\n{}", String::from_utf8_lossy(&out.stderr))
            })
    };
    (find("tps = "), find("latency average = "))
}

/// Starts `ghostwire migrate` with `capture`, its copy held; returns once the capture is on.
async fn capture_on(url: &str, client: &Client, capture: &str) -> tokio::process::Child {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["migrate", "--yes", "--capture", capture, "--throttle-query", "SELECT true", CHANGE])
        .env("DATABASE_URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ghostwire migrate");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = client
            .query_opt("SELECT 1 FROM ghostwire.migrations WHERE phase = 'copy' AND throttled IS NOT NULL", &[])
            .await
            .ok()
            .flatten()
            .is_some();
        if held {
            return child;
        }
        assert!(Instant::now() < deadline, "the {capture} capture never came on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn capture_off(url: &str, mut child: tokio::process::Child) {
    let _ = child.kill().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ghostwire"))
        .args(["abort", "accounts"])
        .env("DATABASE_URL", url)
        .output()
        .await
        .expect("ghostwire abort");
    assert!(out.status.success(), "abort: {}", String::from_utf8_lossy(&out.stderr));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let env = |name: &str, default: i64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let rows = env("GHOSTWIRE_BENCH_ROWS", 200_000);
    let seconds = env("GHOSTWIRE_BENCH_SECONDS", 10) as u32;
    let runs = env("GHOSTWIRE_BENCH_RUNS", 3).max(1) as usize;
    let cluster = Cluster::start(ClusterOptions::default().with_setting("shared_buffers", "512MB")).expect("a cluster");
    let url = cluster.url("postgres");
    let client = connect(&url).await;
    println!(
        "capture benchmark: pgbench -c 4 -j 2 at full speed for {seconds} s, {rows} rows, median of {runs} run(s), \
         PostgreSQL {}",
        cluster.binaries().version
    );
    let port = cluster.port();
    let rate = env("GHOSTWIRE_BENCH_RATE", 2000) as u32;
    // (mode, full-speed tps, fixed-rate latency) per run.
    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> =
        vec![("no capture", vec![], vec![]), ("trigger capture", vec![], vec![]), ("logical capture", vec![], vec![])];
    for _ in 0..runs {
        // Interleaved, so drift on the machine touches every mode alike.
        for (mode, tps, latency) in results.iter_mut() {
            load(&client, rows).await;
            let capture = match *mode {
                "trigger capture" => Some(capture_on(&url, &client, "trigger").await),
                "logical capture" => Some(capture_on(&url, &client, "logical").await),
                _ => None,
            };
            tps.push(pgbench(&cluster, port, seconds, rows, None).await.0);
            latency.push(pgbench(&cluster, port, seconds, rows, Some(rate)).await.1);
            if let Some(child) = capture {
                capture_off(&url, child).await;
            }
        }
    }
    let (base_tps, base_latency) = (median(results[0].1.clone()), median(results[0].2.clone()));
    println!("{:<18} {:>22}   {:>26}", "", "full speed", format!("at {rate} tps: latency"));
    for (mode, tps, latency) in results {
        let (t, l) = (median(tps.clone()), median(latency.clone()));
        let all: Vec<String> = tps.iter().map(|t| format!("{t:.0}")).collect();
        println!(
            "{mode:<18} {t:>9.0} tps {:>6.2}x   {l:>8.3} ms {:>+7.3} ms   (full-speed runs: {})",
            t / base_tps,
            l - base_latency,
            all.join(", ")
        );
    }
}
