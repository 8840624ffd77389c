//! Data changes in batches: `cargo bench --bench backfill`.
//!
//! On the copy bench's `orders` table (`GHOSTWIRE_BENCH_ROWS` rows, default 2,000,000), under
//! steady writers (200 transactions/s, each updating or inserting one order), the same
//! change of a third of the rows, `UPDATE orders SET status = 'archived' WHERE id % 3 = 0`:
//!   1. as one statement (the baseline);
//!   2. as the field report's `DO` loop: 10,000 keys at a time with a 10 ms sleep between,
//!      which still runs in one transaction and so keeps every row it changed locked;
//!   3. through `ghostwire backfill` (batches of `--batch-time` 250 ms, each committed).
//!
//! For each: the time, its ratio to the one statement, and the longest any writer waited.
//! Medians of `GHOSTWIRE_BENCH_RUNS` interleaved runs (default 3).

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use ghostwire::backfill::{self, Context, Options};
use ghostwire::operate::{Live, Silent};
use support::{beside_writers, connect, median};

const CHANGE: &str = "UPDATE orders SET status = 'archived' WHERE id % 3 = 0";
const DO_LOOP: &str = "DO $$
    DECLARE lo bigint := 0; hi bigint;
    BEGIN
        SELECT max(id) INTO hi FROM orders;
        WHILE lo < hi LOOP
            UPDATE orders SET status = 'archived' WHERE id > lo AND id <= lo + 10000 AND id % 3 = 0;
            lo := lo + 10000;
            PERFORM pg_sleep(0.01);
        END LOOP;
    END $$";

#[tokio::main]
async fn main() {
    let (rows, runs) = support::rows_and_runs();
    let cluster = support::cluster();
    let url = cluster.url("postgres");
    println!(
        "backfill benchmark: {rows} rows, a third of them changed, 200 writes/s beside, median of {runs} run(s), \
         PostgreSQL {}",
        cluster.binaries().version
    );
    let config = ghostwire::connect::Params::from_conninfo(Some(&url)).expect("URL");
    let opts = Options::default();
    let names = ["one UPDATE statement", "the DO loop (10,000 keys, 10 ms sleeps)", "ghostwire backfill"];
    let mut results: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); names.len()];
    let mut changed = 0;
    for _ in 0..runs {
        let plain = |sql: &'static str| {
            let url = url.clone();
            move || async move {
                connect(&url).await.batch_execute(sql).await.expect("the plain statement");
            }
        };
        results[0].push(beside_writers(&url, rows, plain(CHANGE)).await);
        results[1].push(beside_writers(&url, rows, plain(DO_LOOP)).await);
        let (config, opts) = (config.clone(), opts.clone());
        let changed_ref = &mut changed;
        results[2].push(
            beside_writers(&url, rows, move || async move {
                let ctx = Context {
                    reporter: &Silent,
                    cancel: Default::default(),
                    live: Live::new(opts.settings.clone(), false),
                };
                let o = backfill::backfill(&config, CHANGE, &opts, &ctx).await.expect("backfill");
                *changed_ref = o.rows_changed;
            })
            .await,
        );
    }
    println!("ghostwire backfill changed {changed} rows");
    println!("\n{:<46} {:>10} {:>8} {:>16}", "", "time", "ratio", "slowest writer");
    let base = median(results[0].iter().map(|r| r.0).collect());
    for (i, name) in names.iter().enumerate() {
        let took = median(results[i].iter().map(|r| r.0).collect());
        let slowest = median(results[i].iter().map(|r| r.1).collect());
        println!(
            "{name:<46} {:>8.2} s {:>7.2}x {:>13.1} ms",
            took.as_secs_f64(),
            took.as_secs_f64() / base.as_secs_f64(),
            slowest.as_secs_f64() * 1e3
        );
    }
}
