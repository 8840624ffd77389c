//! What the benchmarks share: the `orders` table they load, steady writers beside them,
//! and timing helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

pub async fn connect(url: &str) -> Client {
    let params = ghostwire::connect::Params::from_conninfo(Some(url)).expect("a valid URL");
    ghostwire::connect::connect(&params).await.expect("connect")
}

/// Drops and reloads `orders` with `rows` rows, vacuumed, analyzed, checkpointed and synced.
pub async fn load(client: &Client, rows: i64) {
    client
        .batch_execute(
            "DROP SCHEMA IF EXISTS ghostwire CASCADE; DROP TABLE IF EXISTS orders, orders_new CASCADE;
             CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
                                  amount int NOT NULL, note text, created_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .expect("create");
    client
        .execute(
            "INSERT INTO orders (customer_id, status, amount, note, created_at)
             SELECT 1 + g % 50000, (ARRAY['new','paid','shipped','cancelled'])[1 + g % 4], g % 100000,
                    'order note ' || g, timestamptz '2026-01-01' + make_interval(secs => g)
               FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .expect("fill");
    client
        .batch_execute(
            "CREATE INDEX orders_customer_id ON orders (customer_id);
             CREATE INDEX orders_created_at ON orders (created_at);",
        )
        .await
        .expect("index");
    // One statement each: VACUUM cannot run inside the implicit transaction of a batch.
    client.batch_execute("VACUUM ANALYZE orders").await.expect("vacuum");
    client.batch_execute("CHECKPOINT").await.expect("checkpoint");
    // The cluster runs with fsync off: the kernel would write the load's pages back during
    // whichever measurement comes next (30 s later, by default). Flushed now, each
    // measurement starts from the same clean state.
    let _ = std::process::Command::new("sync").status();
}

pub async fn timed(client: &Client, sql: &str) -> Duration {
    let t = Instant::now();
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
    t.elapsed()
}

/// Steady writers: updates and inserts at about `rate` transactions per second in all.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub commits: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
    pub max_us: Arc<AtomicU64>,
    pub handles: Vec<tokio::task::JoinHandle<()>>,
}

pub fn start_load(url: &str, writers: usize, rate: u64, rows: i64) -> Load {
    let stop: Arc<AtomicBool> = Arc::default();
    let (commits, errors, max_us): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>) = Default::default();
    let mut handles = Vec::new();
    for w in 0..writers {
        let (url, stop, commits, errors, max_us) =
            (url.to_owned(), Arc::clone(&stop), Arc::clone(&commits), Arc::clone(&errors), Arc::clone(&max_us));
        handles.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * writers as u64 / rate.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = w as i64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                i += writers as i64;
                let sql = if i % 3 == 0 {
                    format!(
                        "INSERT INTO orders (customer_id, status, amount, note) VALUES ({}, 'new', {}, 'bench')",
                        i % 50000,
                        i % 1000
                    )
                } else {
                    format!(
                        "UPDATE orders SET amount = amount + 1, status = 'paid' WHERE id = {}",
                        1 + (i * 7919) % rows
                    )
                };
                let t = Instant::now();
                match client.batch_execute(&sql).await {
                    Ok(()) => {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                max_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }));
    }
    Load { stop, commits, errors, max_us, handles }
}

impl Load {
    /// Stops the writers: (commits, errors, the slowest transaction).
    pub async fn stop(self) -> (u64, u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.await;
        }
        (
            self.commits.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            Duration::from_micros(self.max_us.load(Ordering::Relaxed)),
        )
    }
}

/// `GHOSTWIRE_BENCH_ROWS` (default 2,000,000) and `GHOSTWIRE_BENCH_RUNS` (default 3).
pub fn rows_and_runs() -> (i64, usize) {
    let rows = std::env::var("GHOSTWIRE_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    let runs = std::env::var("GHOSTWIRE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3usize).max(1);
    (rows, runs)
}

/// A throwaway cluster with 1 GB of shared buffers, for the `orders` benches.
pub fn cluster() -> ghostwire::ephemeral::Cluster {
    let options = ghostwire::ephemeral::ClusterOptions::default().with_setting("shared_buffers", "1GB");
    ghostwire::ephemeral::Cluster::start(options).expect("a throwaway cluster")
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Time and slowest writer of `f` run beside 200 writes/s on a freshly loaded table.
pub async fn beside_writers<F, Fut>(url: &str, rows: i64, f: F) -> (Duration, Duration)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let client = connect(url).await;
    load(&client, rows).await;
    let writers = start_load(url, 2, 200, rows);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    f().await;
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, errors, slowest) = writers.stop().await;
    assert_eq!(errors, 0, "a writer failed");
    (took, slowest)
}
