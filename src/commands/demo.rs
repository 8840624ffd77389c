//! `ghostwire demo`: the main job on a throwaway local cluster, for a new user.
//!
//! Creates a sample `orders` table, shows what `plan` says about three kinds of change,
//! starts a `ghostwire proxy` in front of the cluster, then migrates the table
//! (`ALTER COLUMN amount TYPE bigint`, which rewrites every row) while a steady read/write
//! load runs through the proxy, and reports rows copied, the swap's lock and stall times,
//! and what the load saw.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use tokio::net::TcpListener;

use super::CommandError;
use super::migrate::Lines;
use crate::control;
use crate::ephemeral::{Cluster, ClusterOptions};
use crate::migrate::{self, Options};
use crate::plan::{self, report};
use crate::proxy::Proxy;

/// The sample table: an `orders` table with two secondary indexes.
pub const SAMPLE_TABLE: &str = "
    CREATE TABLE orders (
        id bigserial PRIMARY KEY,
        customer_id int NOT NULL,
        status text NOT NULL DEFAULT 'new',
        amount int NOT NULL,
        note text,
        created_at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX orders_customer_id ON orders (customer_id);
    CREATE INDEX orders_created_at ON orders (created_at);";

/// Fills `orders` with `$1` rows.
pub const SAMPLE_ROWS: &str = "
    INSERT INTO orders (customer_id, status, amount, note, created_at)
    SELECT 1 + g % 5000, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 100000,
           'order ' || g, now() - make_interval(secs => g)
      FROM generate_series(1, $1::bigint) g";

/// What the demo's load saw.
#[derive(Default)]
pub struct LoadStats {
    pub transactions: AtomicU64,
    pub errors: AtomicU64,
    pub slowest_us: AtomicU64,
    pub first_error: std::sync::Mutex<Option<String>>,
}

/// Runs `clients` clients, each a transaction every `every` (a read, then an update or an
/// insert, on `orders`), against `url` until `stop`.
pub fn start_load(
    url: String,
    clients: usize,
    every: Duration,
    rows: i64,
    stop: Arc<AtomicBool>,
    stats: Arc<LoadStats>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (url, stop, stats) = (url.clone(), Arc::clone(&stop), Arc::clone(&stats));
            tokio::spawn(async move {
                let connected = match crate::connect::Params::from_conninfo(Some(&url)) {
                    Ok(p) => crate::connect::connect(&p).await.ok(),
                    Err(_) => None,
                };
                let Some(client) = connected else {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut i = c as i64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    i += clients as i64;
                    let id = 1 + (i * 7919) % rows.max(1);
                    let write = if i % 4 == 0 {
                        format!(
                            "INSERT INTO orders (customer_id, amount, note) VALUES ({}, {}, 'demo')",
                            i % 5000,
                            i % 1000
                        )
                    } else {
                        format!("UPDATE orders SET amount = amount + 1, status = 'paid' WHERE id = {id}")
                    };
                    let sql = format!("BEGIN; SELECT amount FROM orders WHERE id = {id}; {write}; COMMIT;");
                    let t = Instant::now();
                    match client.batch_execute(&sql).await {
                        Ok(()) => {
                            stats.transactions.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let _ = client.batch_execute("ROLLBACK").await;
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            let mut first = stats.first_error.lock().unwrap_or_else(|p| p.into_inner());
                            first.get_or_insert_with(|| crate::connect::describe(&e));
                        }
                    }
                    stats.slowest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

pub async fn run(rows: i64) -> Result<(), CommandError> {
    say!("Starting a throwaway PostgreSQL cluster…");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default()))
        .await
        .map_err(CommandError::failed)?
        .map_err(CommandError::failed)?;
    let url = cluster.url("postgres");
    say!("  {url}");
    let mut client = cluster.connect("postgres").await.map_err(CommandError::failed)?;
    let started = Instant::now();
    client.batch_execute(SAMPLE_TABLE).await.map_err(CommandError::failed)?;
    client.execute(SAMPLE_ROWS, &[&rows]).await.map_err(CommandError::failed)?;
    client.batch_execute("ANALYZE orders").await.map_err(CommandError::failed)?;
    say!("Created table orders with {} rows in {:.1} s.\n", report::thousands(rows), started.elapsed().as_secs_f64());

    for statement in [
        "ALTER TABLE orders ADD COLUMN priority int DEFAULT 0",
        "ALTER TABLE orders ADD CONSTRAINT orders_amount_nonneg CHECK (amount >= 0)",
    ] {
        let p = plan::plan(&mut client, statement).await.map_err(CommandError::failed)?;
        say!("$ ghostwire plan \"{statement}\"");
        say!("{}", plan::render(&p));
    }

    let change = "ALTER TABLE orders ALTER COLUMN amount TYPE bigint";
    let p = plan::plan(&mut client, change).await.map_err(CommandError::failed)?;
    say!("$ ghostwire plan \"{change}\"");
    say!("{}", plan::render(&p));

    // The proxy, as an application would run it beside itself.
    let proxy = Proxy::new(&format!("127.0.0.1:{}", cluster.port()), ghostwire_proto::MAX_MESSAGE_LEN)
        .map_err(CommandError::failed)?;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(CommandError::failed)?;
    let ctl = TcpListener::bind("127.0.0.1:0").await.map_err(CommandError::failed)?;
    let proxy_addr = listener.local_addr().map_err(CommandError::failed)?;
    let control_url = format!("http://{}", ctl.local_addr().map_err(CommandError::failed)?);
    let shutdown = CancellationToken::new();
    tokio::spawn(control::serve(ctl, proxy.control(), None, shutdown.clone()));
    let serving = proxy.clone();
    let stopped = shutdown.clone();
    let proxy_task = tokio::spawn(async move { serving.serve(listener, stopped, Duration::from_secs(1)).await });
    say!(
        "$ ghostwire proxy --listen {proxy_addr} --upstream 127.0.0.1:{} --control {}",
        cluster.port(),
        control_url.trim_start_matches("http://")
    );
    say!(
        "Now migrating for real while 8 clients, connected through the proxy, each run a transaction every 10 ms (a read and a write):"
    );
    say!("$ ghostwire migrate --proxy {control_url} \"{change}\"");
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(LoadStats::default());
    let through_proxy = format!("postgres://postgres@{proxy_addr}/postgres");
    let load = start_load(through_proxy, 8, Duration::from_millis(10), rows, Arc::clone(&stop), Arc::clone(&stats));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config = crate::connect::params(Some(&url), "ghostwire demo")?;
    let options = Options { yes: true, proxies: vec![control_url.clone()], ..Options::default() };
    let result = migrate::migrate(&config, change, &options, &migrate::Context::new(&Lines, &options)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for h in load {
        let _ = h.await;
    }
    // The clients' connections close as their tasks end; once the proxy has seen them go,
    // it stops (before the summary, so that nothing trails it).
    let gone = Instant::now() + Duration::from_secs(2);
    while proxy.status().sessions > 0 && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    let _ = proxy_task.await;
    let outcome = result.map_err(CommandError::failed)?;
    say!();
    say!("What happened:");
    let rate = outcome.rows_copied as f64 / outcome.copy_time.as_secs_f64().max(1e-3);
    say!(
        "  copied {} rows in {:.1} s ({} rows/s); the whole migration took {:.1} s",
        report::thousands(outcome.rows_copied),
        outcome.copy_time.as_secs_f64(),
        report::thousands(rate as i64),
        outcome.total_time.as_secs_f64()
    );
    if let Some(s) = outcome.swap {
        say!(
            "  the swap took the lock after waiting {:.1} ms and held it {:.1} ms ({} attempt(s))",
            s.lock_wait.as_secs_f64() * 1e3,
            s.lock_hold.as_secs_f64() * 1e3,
            outcome.cutover_attempts
        );
    }
    if let Some(held) = outcome.clients_held {
        say!("  the proxy held new queries for {:.1} ms while the tables were swapped", held.as_secs_f64() * 1e3);
    }
    let errors = stats.errors.load(Ordering::Relaxed);
    say!(
        "  the load ran {} transactions with {errors} error(s); the slowest took {:.1} ms",
        report::thousands(stats.transactions.load(Ordering::Relaxed) as i64),
        stats.slowest_us.load(Ordering::Relaxed) as f64 / 1e3
    );
    if let Some(e) = stats.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        say!("  first error: {e}");
    }
    say!();
    say!("To do the same on your own database:");
    say!("  ghostwire plan --database-url postgres://user@host:5432/dbname \"ALTER TABLE …\"   # changes nothing");
    say!("  ghostwire proxy --listen 0.0.0.0:6432 --upstream host:5432 --control 127.0.0.1:6433   # beside each app");
    say!(
        "  ghostwire migrate --database-url postgres://user@host:5432/dbname --proxy http://127.0.0.1:6433 \"ALTER TABLE …\""
    );
    say!("  ghostwire status --database-url …          # progress and events");
    say!("  ghostwire finish --database-url … TABLE    # drop the old table when you are happy");
    say!("\nThe throwaway cluster is removed now.");
    drop(cluster);
    Ok(())
}
