//! Copy throughput: `cargo bench --bench copy`.
//!
//! On a throwaway cluster, with `orders(id bigserial pk, customer_id int, status text,
//! amount int, note text, created_at timestamptz)`, two secondary indexes and
//! `GHOSTWIRE_BENCH_ROWS` rows (default 2,000,000), measures in one run, each on a freshly
//! loaded table:
//!   1. offline `ALTER TABLE orders ALTER COLUMN amount TYPE bigint` (the baseline),
//!   2. a single `INSERT … SELECT` into a new table plus the index builds (the floor),
//!   3. `ghostwire migrate` of the same change on an idle table, and the time a
//!      `--rehearse` of it projects for the real run (the whole table, and a 10% sample),
//!   4. the same without verification (`--verify none`), and with one job (`--jobs 1`),
//!   5. the same (verified) under a steady write load of 400 writes/s, with trigger capture
//!      and with `--capture logical`.
//!
//! It prints rows/s and each time's ratio to the offline ALTER: medians of
//! `GHOSTWIRE_BENCH_RUNS` interleaved runs (default 3).

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ghostwire::migrate::{self, Options, Silent};
use support::{connect, load, median, start_load, timed};
use tokio_postgres::Client;

const CHANGE: &str = "ALTER TABLE orders ALTER COLUMN amount TYPE bigint";

/// One migration of `CHANGE` with `opts`: its outcome and how long it took.
async fn migration(config: &ghostwire::connect::Params, opts: &Options, what: &str) -> (migrate::Outcome, Duration) {
    let t = Instant::now();
    let outcome = migrate::migrate(config, CHANGE, opts, &migrate::Context::new(&Silent, opts))
        .await
        .unwrap_or_else(|e| panic!("migrate, {what}: {e}"));
    (outcome, t.elapsed())
}

async fn phase_times(client: &Client) -> String {
    let rows = client
        .query(
            "SELECT phase, round(extract(epoch FROM lead(at) OVER (ORDER BY id) - at)::numeric, 2)::text
               FROM ghostwire.events WHERE kind = 'phase' ORDER BY id",
            &[],
        )
        .await
        .unwrap_or_default();
    let phases = rows
        .iter()
        .filter_map(|r| Some(format!("{} {}s", r.get::<_, String>(0), r.get::<_, Option<String>>(1)?)))
        .collect::<Vec<_>>()
        .join(", ");
    // Index builds and verification overlap: `index` above lasts until the key index exists.
    let took = |kind: &str| {
        let sql =
            format!("SELECT round(duration_ms::numeric / 1000, 2)::text FROM ghostwire.events WHERE kind = '{kind}'");
        async move { client.query_opt(&sql, &[]).await.ok().flatten().map(|r| r.get::<_, String>(0)) }
    };
    match (took("index_done").await, took("verify_done").await) {
        (Some(b), Some(v)) => format!("{phases}; of these, index builds {b}s, verification {v}s (overlapping)"),
        _ => phases,
    }
}

fn line(name: &str, took: Duration, rows: i64, baseline: Duration) {
    println!(
        "{name:<44} {:>8.2} s {:>12.0} rows/s {:>7.2}x",
        took.as_secs_f64(),
        rows as f64 / took.as_secs_f64(),
        took.as_secs_f64() / baseline.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let (rows, runs) = support::rows_and_runs();
    let cluster = support::cluster();
    println!("PostgreSQL {} ({})", cluster.binaries().version, cluster.binaries().bindir.display());
    let url = cluster.url("postgres");
    let client = connect(&url).await;
    println!(
        "copy benchmark: {rows} rows, median of {runs} run(s), PostgreSQL {}",
        client.query_one("SHOW server_version", &[]).await.unwrap().get::<_, String>(0)
    );
    let config = ghostwire::connect::Params::from_conninfo(Some(&url)).unwrap();
    let opts = Options { yes: true, finish: true, ..Options::default() };
    let (mut offline, mut insert, mut floor, mut idle, mut busy) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut unverified, mut one_job, mut rehearsed, mut sampled) = (vec![], vec![], vec![], vec![]);
    let rehearsal =
        Options { rehearse: true, finish: false, rehearse_baseline: Duration::from_secs(1), ..opts.clone() };
    let no_verify = Options { verify: false, ..opts.clone() };
    let single = Options { parallel: 1, ..opts.clone() };
    let logical = Options { capture: migrate::capture::Choice::Logical, ..opts.clone() };
    let mut busy_logical = vec![];
    let mut last_idle = None;
    let mut last_busy = None;
    let mut phases = (String::new(), String::new());
    let mut load_stats = (0, 0, 0.0);
    for run in 0..runs {
        // Interleaved, so drift on the machine touches every variant alike.
        load(&client, rows).await;
        if run == 0 {
            let size: String =
                client.query_one("SELECT pg_size_pretty(pg_total_relation_size('orders'))", &[]).await.unwrap().get(0);
            println!("table with indexes: {size}");
        }
        offline.push(timed(&client, CHANGE).await);

        load(&client, rows).await;
        let t = Instant::now();
        timed(
            &client,
            "CREATE TABLE orders_new (id bigint NOT NULL, customer_id int NOT NULL, status text NOT NULL, amount bigint NOT NULL,
                                      note text, created_at timestamptz NOT NULL);
             INSERT INTO orders_new SELECT id, customer_id, status, amount, note, created_at FROM orders;",
        )
        .await;
        insert.push(t.elapsed());
        timed(
            &client,
            "ALTER TABLE orders_new ADD PRIMARY KEY (id);
             CREATE INDEX ON orders_new (customer_id); CREATE INDEX ON orders_new (created_at);",
        )
        .await;
        floor.push(t.elapsed());

        load(&client, rows).await;
        let (o, took) = migration(&config, &opts, "idle").await;
        idle.push(took);
        phases.0 = phase_times(&client).await;
        last_idle = Some(o);

        load(&client, rows).await;
        let (o, _) = migration(&config, &rehearsal, "rehearsal").await;
        let projected = o.rehearsal.map_or(0.0, |r| r.projected_seconds);
        rehearsed.push(Duration::from_secs_f64(projected));
        let tenth = Options { sample: Some(0.1), ..rehearsal.clone() };
        let (o, _) = migration(&config, &tenth, "sampled rehearsal").await;
        let projected = o.rehearsal.map_or(0.0, |r| r.projected_seconds);
        sampled.push(Duration::from_secs_f64(projected));

        load(&client, rows).await;
        unverified.push(migration(&config, &no_verify, "no verify").await.1);

        load(&client, rows).await;
        one_job.push(migration(&config, &single, "one job").await.1);

        load(&client, rows).await;
        let writers = start_load(&url, 4, 400, rows);
        tokio::time::sleep(Duration::from_secs(1)).await; // writers in their stride first
        let (o, took) = migration(&config, &opts, "busy").await;
        busy.push(took);
        writers.stop.store(true, Ordering::Relaxed);
        for h in writers.handles {
            let _ = h.await;
        }
        phases.1 = phase_times(&client).await;
        load_stats = (
            writers.commits.load(Ordering::Relaxed),
            writers.errors.load(Ordering::Relaxed),
            writers.max_us.load(Ordering::Relaxed) as f64 / 1e3,
        );
        last_busy = Some(o);

        load(&client, rows).await;
        let writers = start_load(&url, 4, 400, rows);
        tokio::time::sleep(Duration::from_secs(1)).await;
        busy_logical.push(migration(&config, &logical, "busy, logical capture").await.1);
        writers.stop.store(true, Ordering::Relaxed);
        for h in writers.handles {
            let _ = h.await;
        }
    }
    let base = median(offline.clone());
    println!("\n{:<44} {:>10} {:>19} {:>8}", "", "time", "rate", "ratio");
    line("offline ALTER TABLE … TYPE bigint", base, rows, base);
    line("INSERT … SELECT (no indexes)", median(insert), rows, base);
    line("INSERT … SELECT + index builds (floor)", median(floor), rows, base);
    line("ghostwire migrate, idle", median(idle.clone()), rows, base);
    line("ghostwire migrate --rehearse, projected", median(rehearsed.clone()), rows, base);
    line("  --sample 0.1, projected", median(sampled.clone()), rows, base);
    line("ghostwire migrate, idle, --verify none", median(unverified.clone()), rows, base);
    line("ghostwire migrate, idle, --jobs 1", median(one_job.clone()), rows, base);
    line("ghostwire migrate, 400 writes/s", median(busy.clone()), rows, base);
    line("  the same, --capture logical", median(busy_logical.clone()), rows, base);
    let secs = |v: &[Duration]| v.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(" ");
    println!(
        "\nall runs (s): offline {}; idle {}; rehearsal projected {}; from a 10% sample {}; idle unverified {}; idle one job {}; busy {}; busy logical {}",
        secs(&offline),
        secs(&idle),
        secs(&rehearsed),
        secs(&sampled),
        secs(&unverified),
        secs(&one_job),
        secs(&busy),
        secs(&busy_logical)
    );
    // Each run's idle migration against the same run's offline ALTER: the machine's drift
    // between runs cancels out.
    let mut paired: Vec<f64> = idle.iter().zip(&offline).map(|(i, o)| i.as_secs_f64() / o.as_secs_f64()).collect();
    paired.sort_by(f64::total_cmp);
    println!(
        "idle / offline per run: {}; median {:.2}x",
        paired.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(" "),
        paired[paired.len() / 2]
    );
    if let Some(o) = last_idle {
        println!("idle (last run): copy {:.2} s; phases: {}", o.copy_time.as_secs_f64(), phases.0);
        if let Some(s) = o.swap {
            println!(
                "       swap: lock waited {:.1} ms, held {:.1} ms",
                s.lock_wait.as_secs_f64() * 1e3,
                s.lock_hold.as_secs_f64() * 1e3
            );
        }
    }
    if let Some(o) = last_busy {
        println!("busy (last run): copy {:.2} s; phases: {}", o.copy_time.as_secs_f64(), phases.1);
        if let Some(s) = o.swap {
            println!(
                "       swap after {} attempt(s): lock waited {:.1} ms, held {:.1} ms",
                o.cutover_attempts,
                s.lock_wait.as_secs_f64() * 1e3,
                s.lock_hold.as_secs_f64() * 1e3
            );
        }
    }
    println!("       writers: {} commits, {} errors, slowest {:.1} ms", load_stats.0, load_stats.1, load_stats.2);
    println!("\ntarget: idle migration within 1.3x of the offline ALTER");
}
