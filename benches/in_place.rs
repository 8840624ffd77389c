//! Changes in place: `cargo bench --bench in_place`.
//!
//! On the copy bench's `orders` table (`GHOSTWIRE_BENCH_ROWS` rows, default 2,000,000, with
//! two secondary indexes), under steady writers (200 transactions/s), measures in one run,
//! each on a freshly loaded table:
//!   1. `ALTER TABLE orders ADD CONSTRAINT amount_nonneg CHECK (amount >= 0)`: offline (the
//!      baseline), through `ghostwire migrate` in place (NOT VALID, then VALIDATE), and
//!      through the shadow table (copy and swap, as before the recipe ran in place);
//!   2. `CREATE INDEX ON orders (status, amount)`: plain, and through `ghostwire migrate`
//!      (always concurrently).
//!
//! For each: the time, its ratio to the offline statement, and the longest any writer
//! waited. Medians of `GHOSTWIRE_BENCH_RUNS` interleaved runs (default 3).

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use ghostwire::migrate::{self, Options, Silent};
use support::{beside_writers, connect, median};

const CHECK: &str = "ALTER TABLE orders ADD CONSTRAINT amount_nonneg CHECK (amount >= 0)";
const INDEX: &str = "CREATE INDEX ON orders (status, amount)";

#[tokio::main]
async fn main() {
    let (rows, runs) = support::rows_and_runs();
    let cluster = support::cluster();
    let url = cluster.url("postgres");
    println!(
        "in-place benchmark: {rows} rows, 200 writes/s beside, median of {runs} run(s), PostgreSQL {}",
        cluster.binaries().version
    );
    let config = ghostwire::connect::Params::from_conninfo(Some(&url)).expect("URL");
    let opts = Options { yes: true, finish: true, ..Options::default() };
    let shadow = Options { through_shadow: true, ..opts.clone() };
    let names = [
        "offline ADD CONSTRAINT … CHECK",
        "ghostwire, in place (NOT VALID + VALIDATE)",
        "ghostwire, through the shadow table",
        "plain CREATE INDEX",
        "ghostwire CREATE INDEX (concurrently)",
    ];
    let mut results: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); names.len()];
    for _ in 0..runs {
        let plain = |sql: &'static str| {
            let url = url.clone();
            move || async move {
                connect(&url).await.batch_execute(sql).await.expect("the plain statement");
            }
        };
        let through = |sql: &'static str, o: Options| {
            let config = config.clone();
            move || async move {
                migrate::migrate(&config, sql, &o, &migrate::Context::new(&Silent, &o)).await.expect("migrate");
            }
        };
        results[0].push(beside_writers(&url, rows, plain(CHECK)).await);
        results[1].push(beside_writers(&url, rows, through(CHECK, opts.clone())).await);
        results[2].push(beside_writers(&url, rows, through(CHECK, shadow.clone())).await);
        results[3].push(beside_writers(&url, rows, plain(INDEX)).await);
        results[4].push(beside_writers(&url, rows, through(INDEX, opts.clone())).await);
    }
    println!("\n{:<46} {:>10} {:>8} {:>16}", "", "time", "ratio", "slowest writer");
    let base = |i: usize| median(results[i].iter().map(|r| r.0).collect());
    for (i, name) in names.iter().enumerate() {
        let took = base(i);
        let baseline = if i < 3 { base(0) } else { base(3) };
        let slowest = median(results[i].iter().map(|r| r.1).collect());
        println!(
            "{name:<46} {:>8.2} s {:>7.2}x {:>13.1} ms",
            took.as_secs_f64(),
            took.as_secs_f64() / baseline.as_secs_f64(),
            slowest.as_secs_f64() * 1e3
        );
    }
}
