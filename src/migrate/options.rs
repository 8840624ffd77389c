//! How a migration runs: the options `migrate` and `resume` take, with their defaults.

use std::time::Duration;

use super::live::Settings;

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Chunk sizes and throttle limits as the run starts (the control API changes them live).
    pub settings: Settings,
    /// `lock_timeout` for every lock on the live table.
    pub lock_timeout: Duration,
    pub cutover_attempts: u32,
    /// Drop the old table right after the swap.
    pub finish: bool,
    /// Consent to a change that cannot be reverted, and to resuming an unfinished migration
    /// of the same statement.
    pub yes: bool,
    /// Sessions working at once: concurrent copy chunks, index builds, verification ranges.
    pub parallel: usize,
    /// Change-log entries per catch-up batch.
    pub catchup_batch: i64,
    /// Rows per verification range.
    pub verify_range_rows: i64,
    /// Compare the shadow with the original before the swap.
    pub verify: bool,
    /// Control APIs of the proxies to drain around each swap attempt.
    pub proxies: Vec<String>,
    /// How long a proxy may stay closed for one attempt (draining and swapping); the proxy
    /// reopens by itself after it.
    pub drain_timeout: Duration,
    /// Wait after the copy, keeping the shadow in step, until the cut-over is allowed.
    pub postpone_cutover: bool,
    /// The bearer token of the proxies' control APIs.
    pub proxy_token: Option<crate::connect::Secret>,
    /// How long to keep reconnecting after the connection to the database is lost.
    pub reconnect_timeout: Duration,
    /// Every phase but the swap, measured, then no trace (`--rehearse`).
    pub rehearse: bool,
    /// How long a rehearsal counts the application's writes before installing the capture.
    pub rehearse_baseline: Duration,
    /// A rehearsal of this share of the rows (`--sample`, in (0, 1]).
    pub sample: Option<f64>,
    /// Expand a rename or drop into this version schema instead of running it (finish
    /// contracts).
    pub version_schema: Option<String>,
    /// How to capture the application's writes (`--capture`).
    pub capture: super::capture::Choice,
    /// What to do with the table's invalid indexes (`--invalid-indexes`): a run that copies
    /// is refused while the table has one and this is not given.
    pub invalid_indexes: Option<InvalidIndexes>,
    /// How long a concurrent index build (or drop) may wait, in all, for the transactions
    /// it must outlast before it gives up and is cleaned up (`--build-wait-timeout`).
    pub build_wait_timeout: Duration,
    /// Run an online recipe through the shadow table (copy and swap) rather than in place:
    /// for benchmarks that compare the two (index statements always run in place). Not
    /// kept for a resume.
    pub through_shadow: bool,
}

/// An invalid index (a failed CREATE INDEX CONCURRENTLY, a `_ccnew` of a failed REINDEX
/// CONCURRENTLY) on a table to copy: the offline ALTER would fail on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidIndexes {
    /// Built on the new table like the others (a duplicate for a unique one fails the run).
    Rebuild,
    /// Left out of the new table (the old one keeps it until `finish`).
    Drop,
}

impl InvalidIndexes {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidIndexes::Rebuild => "rebuild",
            InvalidIndexes::Drop => "drop",
        }
    }
}

impl Options {
    /// A sampled rehearsal copies one round in this many (None: every one).
    pub fn sample_every(&self) -> Option<u64> {
        sample_every(self.sample.filter(|_| self.rehearse))
    }
}

/// One in how many, for a sample of `fraction` (None for the whole).
pub fn sample_every(fraction: Option<f64>) -> Option<u64> {
    fraction.filter(|f| *f > 0.0 && *f < 1.0).map(|f| (1.0 / f).round().max(1.0) as u64).filter(|k| *k > 1)
}

impl Options {
    /// The lock waits of every statement on the live table: `--lock-timeout`, retried up to
    /// `--cutover-attempts` times.
    pub fn retry_policy(&self) -> super::retry::RetryPolicy {
        super::retry::RetryPolicy {
            lock_timeout: self.lock_timeout,
            attempts: self.cutover_attempts.max(1),
            ..Default::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            settings: Settings::default(),
            lock_timeout: Duration::from_millis(100),
            cutover_attempts: 30,
            finish: false,
            yes: false,
            // Fixed, not the cores of the machine ghostwire runs on: the work runs on the
            // database server, whose cores ghostwire cannot see.
            parallel: 2,
            catchup_batch: 5_000,
            verify_range_rows: 50_000,
            verify: true,
            proxies: Vec::new(),
            drain_timeout: Duration::from_secs(2),
            postpone_cutover: false,
            proxy_token: None,
            reconnect_timeout: Duration::from_secs(60),
            rehearse: false,
            rehearse_baseline: super::rehearsal::BASELINE,
            sample: None,
            version_schema: None,
            capture: super::capture::Choice::Trigger,
            invalid_indexes: None,
            build_wait_timeout: Duration::from_secs(600),
            through_shadow: false,
        }
    }
}
