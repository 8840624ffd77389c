//! Concurrent writers with an independent oracle.
//!
//! Each writer runs transactions that apply one random operation (insert, update, delete,
//! key update; NULLs and TOASTed values over 8 kB included) to the table under test and the
//! same operation to an oracle table that ghostwire never touches, in the same transaction.
//! Writers use the simple query protocol with literals, so they keep working across the
//! swap even when column types change under them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The table a workload writes to.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Quoted, qualified table name.
    pub table: String,
    /// Quoted, qualified oracle table name.
    pub oracle: String,
    /// Key columns (quoted). One column: a bigint; two: (tenant int, seq bigint).
    pub key: Vec<String>,
    /// The key is GENERATED ALWAYS AS IDENTITY: inserts take it from RETURNING.
    pub identity: bool,
    /// Quoted names of the value columns: an integer, a short text, a long text; `None`
    /// leaves one out.
    pub qty: Option<String>,
    pub note: Option<String>,
    pub payload: Option<String>,
    pub key_updates: bool,
    pub deletes: bool,
    /// Extra SQL run in each insert transaction, with `{key}` replaced by the new key's
    /// first column (e.g. a child row).
    pub after_insert: Option<String>,
}

impl Shape {
    /// The usual test table: `items (id bigint PRIMARY KEY, qty int, note text, payload
    /// text)` and its `oracle`, with key updates and deletes.
    pub fn items() -> Shape {
        Shape {
            table: "items".into(),
            oracle: "oracle".into(),
            key: vec!["id".into()],
            identity: false,
            qty: Some("qty".into()),
            note: Some("note".into()),
            payload: Some("payload".into()),
            key_updates: true,
            deletes: true,
            after_insert: None,
        }
    }
}

/// Counts shared by the writers.
#[derive(Default)]
pub struct Counters {
    pub commits: AtomicU64,
    pub errors: AtomicU64,
    pub next_key: AtomicI64,
    pub notify: Notify,
    pub stop: AtomicBool,
    /// The slowest transaction so far, in microseconds.
    pub max_latency_us: AtomicU64,
    pub first_error: std::sync::Mutex<Option<String>>,
}

pub struct Workload {
    pub counters: Arc<Counters>,
    handles: Vec<JoinHandle<()>>,
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A random value for the text columns: NULL, short, or long enough to be TOASTed out of
/// line (random hex does not compress below the 2 kB threshold).
fn text_value(rng: &mut StdRng, long: bool) -> String {
    match rng.random_range(0..10) {
        0 => "NULL".into(),
        1 if long => {
            let s: String = (0..9000).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0')).collect();
            lit(&s)
        }
        _ => lit(&format!("v{}", rng.random_range(0..1_000_000))),
    }
}

impl Shape {
    /// Quoted literals: they take the key column's type, whatever it is (a test changes it).
    fn key_values(&self, k: i64) -> Vec<String> {
        match self.key.len() {
            1 => vec![lit(&k.to_string())],
            _ => vec![lit(&(k % 7).to_string()), lit(&k.to_string())],
        }
    }

    fn key_match(&self, k: i64) -> String {
        self.key.iter().zip(self.key_values(k)).map(|(c, v)| format!("{c} = {v}")).collect::<Vec<_>>().join(" AND ")
    }

    fn value_columns(&self, rng: &mut StdRng) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if let Some(q) = &self.qty {
            let value = if rng.random_range(0..8) == 0 {
                "NULL".into()
            } else {
                lit(&rng.random_range(1..100_000).to_string())
            };
            v.push((q.clone(), value));
        }
        if let Some(n) = &self.note {
            v.push((n.clone(), text_value(rng, false)));
        }
        if let Some(p) = &self.payload {
            v.push((p.clone(), text_value(rng, true)));
        }
        v
    }

    /// `change` (with `{t}` for the table) of the row with key `k`, on the table and then on
    /// the oracle, as one statement: both see one snapshot, and the oracle's row changes
    /// only if the table's did. (Two statements would race, under READ COMMITTED, with an
    /// insert of `k` committing between them: the table's statement would miss the row and
    /// the oracle's find it.)
    fn on_both(&self, change: &str, k: i64) -> String {
        let m = self.key_match(k);
        format!(
            "WITH changed AS ({} WHERE {m} RETURNING 1) {} WHERE {m} AND EXISTS (SELECT FROM changed);",
            change.replace("{t}", &self.table),
            change.replace("{t}", &self.oracle),
        )
    }

    /// SQL for one random operation on both tables (without BEGIN/COMMIT).
    fn operation(&self, rng: &mut StdRng, counters: &Counters) -> String {
        let max = counters.next_key.load(Ordering::Relaxed).max(1);
        let existing = rng.random_range(1..=max);
        let roll = rng.random_range(0..100);
        let values = self.value_columns(rng);
        if roll < 40 || max < 10 {
            // insert
            let cols: Vec<&str> = values.iter().map(|(c, _)| c.as_str()).collect();
            let vals: Vec<&str> = values.iter().map(|(_, v)| v.as_str()).collect();
            if self.identity {
                let key = &self.key[0];
                let oracle_cols =
                    std::iter::once(key.as_str()).chain(cols.iter().copied()).collect::<Vec<_>>().join(", ");
                let then = self.after_insert.as_deref().unwrap_or("").replace("{key}", "(SELECT k FROM ins)");
                let then = if then.is_empty() { String::new() } else { format!(", extra AS ({then})") };
                return format!(
                    "WITH ins AS (INSERT INTO {t} ({c}) VALUES ({v}) RETURNING {key} AS k){then}
                     INSERT INTO {o} ({oracle_cols}) SELECT k, {v} FROM ins;",
                    t = self.table,
                    c = cols.join(", "),
                    v = vals.join(", "),
                    o = self.oracle,
                );
            }
            let k = counters.next_key.fetch_add(1, Ordering::Relaxed) + 1;
            let all_cols =
                self.key.iter().map(String::as_str).chain(cols.iter().copied()).collect::<Vec<_>>().join(", ");
            let all_vals =
                self.key_values(k).into_iter().chain(vals.iter().map(|s| s.to_string())).collect::<Vec<_>>().join(", ");
            let extra = self
                .after_insert
                .as_deref()
                .map(|s| format!("{};", s.replace("{key}", &k.to_string())))
                .unwrap_or_default();
            format!(
                "INSERT INTO {t} ({all_cols}) VALUES ({all_vals}); INSERT INTO {o} ({all_cols}) VALUES ({all_vals}); {extra}",
                t = self.table,
                o = self.oracle
            )
        } else if roll < 75 || (!self.deletes && !self.key_updates) || values.is_empty() {
            if values.is_empty() {
                return "SELECT 1;".into();
            }
            let set = values.iter().map(|(c, v)| format!("{c} = {v}")).collect::<Vec<_>>().join(", ");
            self.on_both(&format!("UPDATE {{t}} SET {set}"), existing)
        } else if roll < 90 && self.deletes {
            self.on_both("DELETE FROM {t}", existing)
        } else if self.key_updates {
            let k = counters.next_key.fetch_add(1, Ordering::Relaxed) + 1;
            let last = self.key.last().cloned().unwrap_or_default();
            // Only the last key column changes, to a fresh value: no collisions.
            self.on_both(&format!("UPDATE {{t}} SET {last} = '{k}'"), existing)
        } else {
            "SELECT 1;".into()
        }
    }
}

impl Workload {
    /// Starts `writers` writer tasks against `url`. `first_key` is where new keys start.
    pub fn start(url: &str, shape: Shape, writers: usize, first_key: i64, seed: u64) -> Workload {
        Self::start_with(url, shape, writers, first_key, seed, false)
    }

    /// Like `start`, but writers that lose their connection (a server restart) reconnect
    /// and go on instead of failing; each transaction is still atomic on both tables.
    pub fn start_tolerant(url: &str, shape: Shape, writers: usize, first_key: i64, seed: u64) -> Workload {
        Self::start_with(url, shape, writers, first_key, seed, true)
    }

    fn start_with(url: &str, shape: Shape, writers: usize, first_key: i64, seed: u64, tolerant: bool) -> Workload {
        let counters = Arc::new(Counters { next_key: AtomicI64::new(first_key), ..Counters::default() });
        let shape = Arc::new(shape);
        let mut handles = Vec::new();
        for w in 0..writers {
            let (url, shape, counters) = (url.to_owned(), Arc::clone(&shape), Arc::clone(&counters));
            handles.push(tokio::spawn(async move {
                let mut client = super::connect(&url).await;
                let mut rng = StdRng::seed_from_u64(seed + w as u64);
                while !counters.stop.load(Ordering::Relaxed) {
                    let op = shape.operation(&mut rng, &counters);
                    let started = std::time::Instant::now();
                    let result = client.batch_execute(&format!("BEGIN; {op} COMMIT;")).await;
                    counters.max_latency_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    match result {
                        Ok(()) => {
                            counters.commits.fetch_add(1, Ordering::Relaxed);
                            counters.notify.notify_waiters();
                        }
                        Err(_) if tolerant && client.is_closed() => {
                            // The server went away: reconnect (backing off) and carry on.
                            loop {
                                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                                if let Ok(c) = super::try_connect(&url).await {
                                    client = c;
                                    break;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = client.batch_execute("ROLLBACK").await;
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            let mut first = counters.first_error.lock().unwrap();
                            if first.is_none() {
                                let shown: String = op.chars().take(400).collect();
                                *first = Some(format!("{e:?}\n{shown}…"));
                            }
                        }
                    }
                }
            }));
        }
        Workload { counters, handles }
    }

    /// No writer's transaction took `limit` or longer so far.
    pub fn assert_never_waited(&self, limit: Duration) {
        let worst = Duration::from_micros(self.counters.max_latency_us.load(Ordering::Relaxed));
        assert!(worst < limit, "a writer waited {worst:?}");
    }

    pub fn commits(&self) -> u64 {
        self.counters.commits.load(Ordering::Relaxed)
    }

    /// Waits until `n` more transactions have committed.
    pub async fn wait_for_more(&self, n: u64) {
        wait_for_more(&self.counters, n).await;
    }

    /// Stops the writers; panics if any transaction failed.
    pub async fn stop(self) -> u64 {
        self.counters.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.await.expect("writer task");
        }
        if let Some(e) = self.counters.first_error.lock().unwrap().take() {
            panic!("a writer failed ({} errors); the first: {e}", self.counters.errors.load(Ordering::Relaxed));
        }
        self.counters.commits.load(Ordering::Relaxed)
    }
}

pub async fn wait_for_more(counters: &Counters, n: u64) {
    let target = counters.commits.load(Ordering::Relaxed) + n;
    loop {
        let notified = counters.notify.notified();
        if counters.commits.load(Ordering::Relaxed) >= target || counters.stop.load(Ordering::Relaxed) {
            return;
        }
        notified.await;
    }
}
