//! What clients see during a cut-over: `cargo bench --bench cutover`.
//!
//! pgbench (the real client) runs at a fixed rate through `ghostwire proxy` against the
//! table being migrated, logging every transaction, twice at once: 8 clients on the simple
//! protocol (a transaction that reads and updates a row), and 4 on prepared statements
//! (`-M prepared`: `SELECT *` and an UPDATE, each on its own), whose statements go stale at
//! the swap and are prepared again by the proxy. Meanwhile `ghostwire migrate --proxy`
//! changes `amount` from integer to bigint. Printed for each: errors (target: 0),
//! p50/p99/max latency in steady state and around the cut-over, and the stall clients saw
//! (target: under 100 ms). Then, the load still running, `ghostwire revert` goes back to the
//! old table (kept in step since the swap, the proxy drained for its swap back): the same
//! figures around the revert's swap, and how long the revert took for the writes made since
//! the swap. `GHOSTWIRE_BENCH_ROWS` (default 1,000,000) sets the table size,
//! `GHOSTWIRE_BENCH_RATE` (default 400) the transactions per second.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ghostwire::control;
use ghostwire::ephemeral::{Cluster, ClusterOptions};
use ghostwire::migrate::{self, Options, Silent};
use ghostwire::proxy::Proxy;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const SCRIPT: &str = "\\set id random(1, :rows)
BEGIN;
SELECT amount FROM orders WHERE id = :id;
UPDATE orders SET amount = amount + 1, status = 'paid' WHERE id = :id;
END;
";

const PREPARED_SCRIPT: &str = "\\set id random(1, :rows)
SELECT * FROM orders WHERE id = :id;
UPDATE orders SET amount = amount + 1 WHERE id = :id;
";

struct Run {
    label: &'static str,
    dir: tempfile::TempDir,
    child: tokio::process::Child,
}

/// One pgbench workload.
#[derive(Clone, Copy)]
struct Load {
    label: &'static str,
    mode: &'static str,
    script: &'static str,
    clients: u32,
    rate: u32,
}

fn pgbench(cluster: &Cluster, port: u16, load: &Load, seconds: u32, rows: i64) -> Run {
    let Load { label, mode, script, clients, rate } = *load;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.sql"), script).unwrap();
    let child = tokio::process::Command::new(cluster.binaries().path("pgbench"))
        .current_dir(dir.path())
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n", "-M", mode])
        .args(["-c", &clients.to_string(), "-j", "1", "-T", &seconds.to_string(), "-R", &rate.to_string()])
        .args(["-l", "-f", "script.sql"])
        .arg("-D")
        .arg(format!("rows={rows}"))
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench");
    Run { label, dir, child }
}

/// The rows of one pgbench run: steady state, during the migration, around the cut-over.
fn report(run: &Run, text: &str, (started, ended): (u64, u64), (cut_from, cut_to): (u64, u64)) {
    let log = read_logs(run.dir.path());
    let steady: Vec<f64> = log.iter().filter(|(end, _)| *end < started).map(|(_, l)| *l).collect();
    let during_migration: Vec<f64> =
        log.iter().filter(|(end, _)| *end >= started && *end <= ended).map(|(_, l)| *l).collect();
    let around_cutover: Vec<f64> = log
        .iter()
        .filter(|(end, l)| *end >= cut_from && end.saturating_sub((*l * 1000.0) as u64) <= cut_to)
        .map(|(_, l)| *l)
        .collect();
    let aborted = text.matches("aborted").count();
    let failed = text
        .lines()
        .find(|l| l.contains("number of failed transactions"))
        .unwrap_or("number of failed transactions: ?")
        .trim()
        .to_owned();
    println!("{}:", run.label);
    summary("  steady state (before the migration)", steady);
    summary("  during the migration", during_migration);
    summary("  around the cut-over", around_cutover.clone());
    let worst = around_cutover.iter().copied().fold(0.0, f64::max);
    println!("  errors: {failed}; clients aborted: {aborted}");
    println!(
        "  stall clients saw at the cut-over (slowest transaction): {worst:.1} ms (target: under 100 ms, zero errors)"
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<38} {:>7} tx   p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(0.0)
    );
}

/// (end time in µs since the epoch, latency in ms) of every transaction in pgbench's logs.
fn read_logs(dir: &Path) -> Vec<(u64, f64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("pgbench_log") {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap_or_default().lines() {
            // client_id transaction_no time script_no time_epoch time_us [schedule_lag]
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                continue;
            }
            let (Ok(latency_us), Ok(epoch), Ok(us)) = (f[2].parse::<f64>(), f[4].parse::<u64>(), f[5].parse::<u64>())
            else {
                continue;
            };
            out.push((epoch * 1_000_000 + us, latency_us / 1000.0));
        }
    }
    out
}

/// One revert, as `ghostwire revert --proxy` runs it.
struct Reverted {
    outcome: migrate::revert::Outcome,
    started: u64,
    ended: u64,
    /// The swap back's event: (at, in µs since the epoch; the proxy's stall, ms).
    window: Vec<String>,
}

async fn revert_once(cluster: &Cluster, id: i64, control_url: &str) -> Reverted {
    let control_session = cluster.connect("postgres").await.unwrap();
    let work = cluster.connect("postgres").await.unwrap();
    let m = ghostwire::state::migration(&control_session, id).await.unwrap().expect("the migration");
    assert!(ghostwire::state::try_lock_table(&control_session, &m.table).await.unwrap());
    let urls = [control_url.to_owned()];
    let proxies = migrate::proxies::Proxies { urls: &urls, token: None, drain_timeout: Duration::from_secs(2) };
    let opts = migrate::revert::Options {
        lock_timeout: Duration::from_millis(100),
        attempts: 30,
        batch: 5_000,
        settings: Default::default(),
        live: None,
    };
    let started = now_us();
    let outcome = migrate::revert::revert(&control_session, &work, &m, &opts, &proxies).await.expect("the revert");
    let ended = now_us();
    let window = control_session
        .query(
            "SELECT (extract(epoch FROM at) * 1e6)::bigint::text, coalesce(details->>'stall_ms', '0')
               FROM ghostwire.events WHERE migration_id = $1 AND kind = 'revert_attempt' AND details->>'outcome' = 'swapped'",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .flat_map(|r| [r.get::<_, String>(0), r.get::<_, String>(1)])
        .collect();
    Reverted { outcome, started, ended, window }
}

/// `ghostwire finish` after a revert: drops the kept new table.
async fn finish(cluster: &Cluster, id: i64) {
    let client = cluster.connect("postgres").await.unwrap();
    let m = ghostwire::state::migration(&client, id).await.unwrap().expect("the migration");
    migrate::cleanup::finish(&client, &m).await.expect("finish");
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let rows: i64 = std::env::var("GHOSTWIRE_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let rate: u32 = std::env::var("GHOSTWIRE_BENCH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let cluster =
        Cluster::start(ClusterOptions::default().with_setting("shared_buffers", "1GB")).expect("a throwaway cluster");
    println!("PostgreSQL {} ({})", cluster.binaries().version, cluster.binaries().bindir.display());
    let client = cluster.connect("postgres").await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
                                  amount int NOT NULL, note text, created_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO orders (customer_id, status, amount, note)
             SELECT 1 + g % 50000, 'new', g % 100000, 'order note ' || g FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .unwrap();
    client.batch_execute("CREATE INDEX ON orders (customer_id); CREATE INDEX ON orders (created_at);").await.unwrap();
    client.batch_execute("VACUUM ANALYZE orders").await.unwrap();

    // The proxy, in this process.
    let proxy = Proxy::new(&format!("127.0.0.1:{}", cluster.port()), ghostwire_proto::MAX_MESSAGE_LEN).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ctl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let control_url = format!("http://{}", ctl.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(control::serve(ctl, proxy.control(), None, shutdown.clone()));
    let p = proxy.clone();
    let s = shutdown.clone();
    tokio::spawn(async move { p.serve(listener, s, Duration::from_secs(1)).await });

    let seconds = 60;
    let loads = [
        Load { label: "simple protocol, 8 clients", mode: "simple", script: SCRIPT, clients: 8, rate },
        Load {
            label: "prepared statements (-M prepared), 4 clients",
            mode: "prepared",
            script: PREPARED_SCRIPT,
            clients: 4,
            rate: rate / 2,
        },
    ];
    let mut runs: Vec<Run> = loads.iter().map(|l| pgbench(&cluster, port, l, seconds, rows)).collect();
    tokio::time::sleep(Duration::from_secs(5)).await;

    let started = now_us();
    let config = ghostwire::connect::Params::from_conninfo(Some(&cluster.url("postgres"))).unwrap();
    let opts = Options { yes: true, proxies: vec![control_url.clone()], ..Options::default() };
    let outcome = migrate::migrate(
        &config,
        "ALTER TABLE orders ALTER COLUMN amount TYPE bigint",
        &opts,
        &migrate::Context::new(&Silent, &opts),
    )
    .await
    .expect("the migration");
    let ended = now_us();
    // The cut-over window: from the start of the last attempt to its end.
    let swap_event = |kind: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT (extract(epoch FROM at) * 1e6)::bigint::text, coalesce(details->>'stall_ms', '0')
                       FROM ghostwire.events WHERE kind = $1 AND details->>'outcome' = 'swapped'",
                    &[&kind],
                )
                .await
                .unwrap()
                .iter()
                .flat_map(|r| [r.get::<_, String>(0), r.get::<_, String>(1)])
                .collect::<Vec<String>>()
        }
    };
    let window = swap_event("cutover_attempt").await;
    // Writes to the new table for a while, then the revert; then again (migrate, writes,
    // revert, finish) after longer writes, for how the revert's time grows with them.
    let mut reverts = Vec::new();
    let mut outcome_id = outcome.id;
    for (i, wait) in [5u64, 2, 10].into_iter().enumerate() {
        if i > 0 {
            let again = migrate::migrate(
                &config,
                "ALTER TABLE orders ALTER COLUMN amount TYPE bigint",
                &opts,
                &migrate::Context::new(&Silent, &opts),
            )
            .await
            .expect("the migration");
            outcome_id = again.id;
        }
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let r = revert_once(&cluster, outcome_id, &control_url).await;
        reverts.push((wait, r));
        finish(&cluster, outcome_id).await;
    }
    let (revert_started, revert_ended) = (reverts[0].1.started, reverts[0].1.ended);
    let revert_window = reverts[0].1.window.clone();
    let mut outputs = Vec::new();
    for run in &mut runs {
        let child = &mut run.child;
        let status = child.wait().await.unwrap();
        let mut text = String::new();
        if let Some(mut o) = child.stdout.take() {
            tokio::io::AsyncReadExt::read_to_string(&mut o, &mut text).await.unwrap();
        }
        if let Some(mut e) = child.stderr.take() {
            tokio::io::AsyncReadExt::read_to_string(&mut e, &mut text).await.unwrap();
        }
        outputs.push((status, text));
    }
    let prepared = proxy.status().prepared;
    shutdown.cancel();

    let swapped_at: u64 = window.first().and_then(|v| v.parse().ok()).unwrap_or(ended);
    let stall_ms: f64 = window.get(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let cut_from = swapped_at.saturating_sub((stall_ms * 1000.0) as u64 + 50_000);
    let cut_to = swapped_at + 50_000;
    println!(
        "cut-over benchmark: {rows} rows, pgbench -R {rate} -c 8 (simple protocol) and -R {} -c 4 (-M prepared) through ghostwire proxy, {seconds} s",
        rate / 2
    );
    println!(
        "migration: {:.1} s, copy {:.1} s; swap lock waited {:.1} ms, held {:.1} ms; proxy held clients {stall_ms:.1} ms",
        outcome.total_time.as_secs_f64(),
        outcome.copy_time.as_secs_f64(),
        outcome.swap.map(|s| s.lock_wait.as_secs_f64() * 1e3).unwrap_or(0.0),
        outcome.swap.map(|s| s.lock_hold.as_secs_f64() * 1e3).unwrap_or(0.0)
    );
    for (run, (status, text)) in runs.iter().zip(&outputs) {
        report(run, text, (started, ended), (cut_from, cut_to));
        if !status.success() {
            println!("  pgbench exited with {status}:\n{text}");
        }
    }
    let back_at: u64 = revert_window.first().and_then(|v| v.parse().ok()).unwrap_or(revert_ended);
    let back_stall: f64 = revert_window.get(1).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    for (wait, r) in &reverts {
        println!(
            "revert after {wait} s of writes: {} reverse changes applied in {:.2} s ({:.0} changes/s); swap back lock waited {:.1} ms, held {:.1} ms (attempt {}); proxy held clients {:.1} ms",
            r.outcome.applied,
            (r.ended - r.started) as f64 / 1e6,
            r.outcome.applied as f64 / ((r.ended - r.started) as f64 / 1e6),
            r.outcome.lock_wait.as_secs_f64() * 1e3,
            r.outcome.lock_hold.as_secs_f64() * 1e3,
            r.outcome.attempts,
            r.window.get(1).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        );
    }
    let back_from = back_at.saturating_sub((back_stall * 1000.0) as u64 + 50_000);
    for (run, (_, text)) in runs.iter().zip(&outputs) {
        println!("  around the revert's swap:");
        report(run, text, (revert_started, revert_ended), (back_from, back_at + 50_000));
    }
    println!(
        "proxy: {} statements prepared again, {} batches replayed, {} rows reshaped, {} stale-statement errors passed on",
        prepared.reprepared, prepared.replayed, prepared.reshaped_rows, prepared.errors_passed_on
    );
}
