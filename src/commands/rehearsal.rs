//! The report of `ghostwire migrate --rehearse`, as a person reads it.

use std::fmt::Write as _;

use crate::migrate::rehearsal::Report;
use crate::plan::report::{bytes, thousands};

fn rate(per_second: Option<f64>) -> String {
    per_second.map_or_else(|| "-".to_owned(), |r| format!("{}/s", thousands(r.round() as i64)))
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Rehearsal of migration #{} on {}: nothing was swapped, and nothing is left.",
        r.migration_id, r.table
    );
    let _ = writeln!(out, "  {}", r.statement);
    if let Some(k) = r.sample_one_in {
        let _ = writeln!(
            out,
            "  (sampled: one copy round and one verification range in {k}; their phases are scaled by {k} in the projection)"
        );
    }
    if let Some(p) = &r.resumed_from {
        let _ = writeln!(out, "  (resumed in phase {p}: the figures cover this run only)");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "  {:<10} {:>10} {:>14} {:>10}", "phase", "time", "rows/s", "MB/s");
    for p in &r.phases {
        let rows = p.rows_per_second.map_or_else(String::new, |v| thousands(v.round() as i64));
        let mb = p.mb_per_second.map_or_else(String::new, |v| format!("{v:.1}"));
        let _ = writeln!(out, "  {:<10} {:>9.2}s {rows:>14} {mb:>10}", p.phase, p.seconds);
    }
    let _ = writeln!(
        out,
        "  {:<10} {:>9.2}s  (projected for the real run, with the swap: {:.2} s)",
        "total", r.total_seconds, r.projected_seconds
    );
    let _ = writeln!(out);
    if let Some(c) = &r.copy {
        let _ = writeln!(
            out,
            "  copy: {} rows in {:.2} s, {} rows/s, {:.1} MB/s",
            thousands(c.rows),
            c.seconds,
            thousands(c.rows_per_second.round() as i64),
            c.mb_per_second
        );
    }
    let _ = writeln!(out, "  WAL written: {}", bytes(r.wal_bytes as i64));
    let planned = r.plan.as_ref().map(|p| format!(" (plan said {})", bytes(p.disk_needed_bytes))).unwrap_or_default();
    let _ = writeln!(out, "  extra disk at its largest: {}{planned}", bytes(r.extra_disk_bytes));
    if let Some(b) = &r.backlog {
        let _ = writeln!(
            out,
            "  change backlog before the catch-up: {} entries, drained in {:.2} s ({})",
            thousands(b.entries),
            b.drain_seconds,
            rate(b.entries_per_second)
        );
    }
    match (r.replicas, r.max_replica_lag_seconds) {
        (0, _) => {
            let _ = writeln!(out, "  replicas: none seen");
        }
        (n, lag) => {
            let lag = lag.map_or_else(|| "unknown".to_owned(), |l| format!("{l:.2} s"));
            let _ = writeln!(out, "  replicas: {n}, largest replay lag seen {lag}");
        }
    }
    let t = &r.trial_lock;
    if t.granted {
        let _ = writeln!(
            out,
            "  cut-over lock: granted after {:.1} ms (lock timeout {:.0} ms), released at once",
            t.wait_ms, t.lock_timeout_ms
        );
    } else {
        let _ = writeln!(
            out,
            "  cut-over lock: NOT granted within {:.0} ms; a real run would retry. Held by:",
            t.lock_timeout_ms
        );
        for h in &t.holders {
            let _ = writeln!(out, "    {}", h.describe());
        }
    }
    let _ = writeln!(
        out,
        "  application writes to the table: {} before the capture, {} with it",
        rate(r.writes.before_per_second),
        rate(r.writes.during_capture_per_second)
    );
    if let (Some(p), Some(c)) = (&r.plan, &r.copy) {
        let _ = writeln!(
            out,
            "  plan: {} strategy, ~{} rows estimated; {} copied",
            p.strategy,
            thousands(p.estimated_rows),
            thousands(c.rows)
        );
    }
    out
}
