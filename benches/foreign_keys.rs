//! A table between foreign keys: `cargo bench --bench foreign_keys`.
//!
//! The copy bench's `orders` table (`GHOSTWIRE_BENCH_ROWS` rows, default 2,000,000, two
//! secondary indexes) with a foreign key to `customers` (50,000 rows) and one from a child
//! table `order_items` (half as many rows as `orders`). Measures in one run, each on a freshly
//! loaded set of tables:
//!   1. offline `ALTER TABLE orders ALTER COLUMN amount TYPE bigint` (the baseline);
//!   2. `pg_repack --table orders` (a rewrite of the table online, without the change: what
//!      a rewrite costs there), when pg_repack is installed (`apt-get install
//!      postgresql-15-repack`);
//!   3. `ghostwire migrate` of the change: the whole run, and the run up to the swap's
//!      commit (after it, only the foreign keys' validation, which blocks no one);
//!   4. the same with `--verify none`: what the comparison of the shadow with the original
//!      costs (the offline ALTER and pg_repack check nothing of the kind).
//!
//! Medians of `GHOSTWIRE_BENCH_RUNS` interleaved runs (default 3), with each time's ratio to
//! the offline ALTER.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ghostwire::migrate::{self, Options, Silent};
use support::{connect, load, median, timed};
use tokio_postgres::Client;

const CHANGE: &str = "ALTER TABLE orders ALTER COLUMN amount TYPE bigint";

/// `orders` reloaded, with its parent and its child.
async fn load_with_keys(client: &Client, rows: i64) {
    client.batch_execute("DROP TABLE IF EXISTS order_items, customers CASCADE").await.expect("drop");
    load(client, rows).await;
    client
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
             INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(0, 50000) g;
             ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers;
             CREATE TABLE order_items (id bigserial PRIMARY KEY,
                                       order_id bigint NOT NULL REFERENCES orders, qty int NOT NULL);
             CREATE INDEX order_items_order_id ON order_items (order_id);",
        )
        .await
        .expect("keys");
    client
        .execute(
            "INSERT INTO order_items (order_id, qty) SELECT 1 + (g * 7) % $1::bigint, g % 10 FROM generate_series(1, $1::bigint / 2) g",
            &[&rows],
        )
        .await
        .expect("items");
    for sql in ["VACUUM ANALYZE customers", "VACUUM ANALYZE order_items", "CHECKPOINT"] {
        client.batch_execute(sql).await.expect("vacuum");
    }
    let _ = std::process::Command::new("sync").status();
}

/// Each phase's time in the run just finished (to the next phase's start; the last phase
/// to the run's last event), and the table's autovacuum and autoanalyze runs since the
/// swap made the shadow `orders` (printed: a worker on the shadow during the copy competes
/// for the same cores).
async fn phases(client: &Client) -> Vec<(String, Duration)> {
    let rows = client
        .query(
            "WITH p AS (SELECT phase, min(at) AS began FROM ghostwire.events WHERE kind = 'phase' GROUP BY phase)
             SELECT phase, extract(epoch FROM coalesce(lead(began) OVER (ORDER BY began),
                                                       (SELECT max(at) FROM ghostwire.events)) - began)::float8
               FROM p ORDER BY began",
            &[],
        )
        .await
        .expect("the phases");
    let vacuums = client
        .query_one(
            "SELECT autovacuum_count + autoanalyze_count FROM pg_stat_user_tables WHERE relid = 'orders'::regclass",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(-1);
    let took: Vec<(String, Duration)> =
        rows.iter().map(|r| (r.get::<_, String>(0), Duration::from_secs_f64(r.get::<_, f64>(1).max(0.0)))).collect();
    let shown: Vec<String> = took.iter().map(|(p, d)| format!("{p} {:.2}", d.as_secs_f64())).collect();
    println!("    phases (s): {}; autovacuum/analyze runs on the new table: {vacuums}", shown.join(", "));
    took
}

/// The migration's time after the swap's commit: its validations (printed).
async fn after_swap(client: &Client) -> Duration {
    let swapped = "(SELECT max(at) FROM ghostwire.events WHERE kind = 'phase' AND phase = 'swapped')";
    let sql =
        format!("SELECT extract(epoch FROM max(at) - {swapped})::float8 FROM ghostwire.events WHERE kind = 'validate'");
    let secs: Option<f64> = client.query_one(&sql, &[]).await.expect("the events").get(0);
    let rows = client
        .query("SELECT message, duration_ms FROM ghostwire.events WHERE kind = 'validate' ORDER BY id", &[])
        .await
        .expect("the validations");
    for r in rows {
        println!("    {}: {:.2} s", r.get::<_, String>(0), r.get::<_, Option<f64>>(1).unwrap_or(0.0) / 1e3);
    }
    Duration::from_secs_f64(secs.unwrap_or(0.0))
}

/// Per phase, the median over the runs (a phase a run lacks counts as zero there).
fn phase_medians(runs: &[Vec<(String, Duration)>]) -> Vec<(String, Duration)> {
    let mut names: Vec<String> = Vec::new();
    for (p, _) in runs.iter().flatten() {
        if !names.contains(p) {
            names.push(p.clone());
        }
    }
    names
        .into_iter()
        .map(|p| {
            let times =
                runs.iter().map(|r| r.iter().find(|(q, _)| *q == p).map(|(_, d)| *d).unwrap_or_default()).collect();
            (p, median(times))
        })
        .collect()
}

fn pg_repack(bindir: &std::path::Path) -> Option<PathBuf> {
    [bindir.join("pg_repack"), PathBuf::from("/usr/lib/postgresql/15/bin/pg_repack")].into_iter().find(|p| p.exists())
}

fn line(name: &str, took: Duration, baseline: Duration) {
    println!("{name:<52} {:>8.2} s {:>7.2}x", took.as_secs_f64(), took.as_secs_f64() / baseline.as_secs_f64());
}

#[tokio::main]
async fn main() {
    let (rows, runs) = support::rows_and_runs();
    let cluster = support::cluster();
    let url = cluster.url("postgres");
    println!("foreign-key benchmark: {rows} rows, median of {runs} run(s), PostgreSQL {}", cluster.binaries().version);
    let client = connect(&url).await;
    let repack = pg_repack(&cluster.binaries().bindir);
    let repack = match repack {
        Some(p) if client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_repack").await.is_ok() => Some(p),
        _ => {
            println!("pg_repack is not installed here (apt-get install postgresql-15-repack): left out");
            None
        }
    };
    let config = ghostwire::connect::Params::from_conninfo(Some(&url)).expect("URL");
    let opts = Options { yes: true, finish: true, ..Options::default() };
    let unverified = Options { verify: false, ..opts.clone() };
    let (mut offline, mut repacked, mut whole, mut to_swap, mut quick) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut verified_phases, mut unverified_phases) = (vec![], vec![]);
    for _ in 0..runs {
        load_with_keys(&client, rows).await;
        offline.push(timed(&client, CHANGE).await);

        if let Some(bin) = &repack {
            load_with_keys(&client, rows).await;
            let t = Instant::now();
            let out = std::process::Command::new(bin)
                .args(["--no-superuser-check", "--table", "orders", "--host", "127.0.0.1", "--username", "postgres"])
                .args(["--port", &cluster.port().to_string(), "--dbname", "postgres"])
                .output()
                .expect("pg_repack runs");
            assert!(out.status.success(), "pg_repack: {}", String::from_utf8_lossy(&out.stderr));
            repacked.push(t.elapsed());
        }

        load_with_keys(&client, rows).await;
        let t = Instant::now();
        migrate::migrate(&config, CHANGE, &opts, &migrate::Context::new(&Silent, &opts)).await.expect("migrate");
        let took = t.elapsed();
        whole.push(took);
        to_swap.push(took.saturating_sub(after_swap(&client).await));
        verified_phases.push(phases(&client).await);

        load_with_keys(&client, rows).await;
        let t = Instant::now();
        let ctx = migrate::Context::new(&Silent, &unverified);
        migrate::migrate(&config, CHANGE, &unverified, &ctx).await.expect("migrate");
        quick.push(t.elapsed());
        unverified_phases.push(phases(&client).await);
    }
    let base = median(offline);
    println!("\n{:<52} {:>10} {:>8}", "", "time", "ratio");
    line("offline ALTER TABLE … TYPE bigint", base, base);
    if !repacked.is_empty() {
        line("pg_repack --table orders (a rewrite, no change)", median(repacked), base);
    }
    line("ghostwire migrate, whole run", median(whole), base);
    line("ghostwire migrate, up to the swap's commit", median(to_swap), base);
    line("ghostwire migrate --verify none, whole run", median(quick), base);
    for (name, runs) in [("whole run", &verified_phases), ("--verify none", &unverified_phases)] {
        println!("\n  phases of the {name}, medians:");
        for (phase, took) in phase_medians(runs) {
            line(&format!("    {phase}"), took, base);
        }
    }
}
