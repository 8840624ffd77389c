//! The command-line contract (DESIGN.md §7): commands, flags and exit statuses that users
//! script against.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Online schema changes for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "ghostwire", version, about, long_about = None)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Database {
    /// The database: a libpq URL (postgres://user@host:port/dbname?sslmode=verify-full) or
    /// keyword/value string; what it leaves out comes from the PG* environment, the service
    /// file and ~/.pgpass, as with psql.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// The bearer token of a control API: the one this process serves with `--control`, and
/// the one it sends to another's.
#[derive(Debug, Clone, Args)]
pub struct ControlToken {
    /// Bearer token for the HTTP control API (at least 16 characters); required for a
    /// --control address beyond loopback.
    #[arg(long, env = "GHOSTWIRE_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<String>,
}

impl ControlToken {
    pub fn secret(&self) -> Option<crate::connect::Secret> {
        self.control_token.as_deref().filter(|t| !t.is_empty()).map(crate::connect::Secret::new)
    }
}

/// TLS towards the proxy's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientTls {
    /// Plain text only (SSLRequest answered N).
    Disable,
    /// TLS offered, plain text accepted (the default with --tls-cert).
    Allow,
    /// Plain text refused with an error message.
    Require,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a statement would do: strategy, locks, size, disk, revertibility. Changes nothing.
    Plan {
        #[command(flatten)]
        db: Database,
        /// Print one JSON document instead of the report.
        #[arg(long)]
        json: bool,
        /// One ALTER TABLE or index statement, or a migration file (FILE.sql, `-` for
        /// standard input): each statement's way and locks.
        statement: String,
    },
    /// Run the change online: shadow table, change capture, chunked copy, swap.
    Migrate {
        #[command(flatten)]
        db: Database,
        /// One ALTER TABLE statement.
        statement: String,
        #[command(flatten)]
        options: MigrateArgs,
    },
    /// Run an UPDATE or DELETE in short keyset batches over the table's key, each its own
    /// transaction with its checkpoint: throttled like a copy, resumable (`ghostwire resume
    /// TABLE`), and a rerun writes nothing twice.
    Backfill {
        #[command(flatten)]
        db: Database,
        /// One UPDATE or DELETE statement.
        statement: String,
        #[command(flatten)]
        options: BackfillArgs,
    },
    /// Run migration files statement by statement, each the safe way (ALTER TABLE and
    /// index statements through migrate, UPDATE/DELETE through backfill, the rest directly
    /// under a short lock_timeout), logged in ghostwire.applied; run again, it skips what is
    /// done and goes on where it stopped.
    Apply {
        #[command(flatten)]
        db: Database,
        #[command(flatten)]
        options: ApplyArgs,
    },
    /// Continue a stopped migration of TABLE from its last checkpoint, in whatever phase it
    /// stopped; with --control ADDR and no TABLE: let a paused run go on.
    Resume {
        #[command(flatten)]
        db: Database,
        table: Option<String>,
        #[command(flatten)]
        options: MigrateArgs,
    },
    /// Show migrations: phase, progress, backlog, throttling, cut-over attempts and recent
    /// events; with --control ADDR, the live status of a running migration.
    Status {
        #[command(flatten)]
        db: Database,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Ask a running migration's control API (host:port) instead of the database.
        #[arg(long)]
        control: Option<String>,
        #[command(flatten)]
        token: ControlToken,
        /// Only this table (`orders`, `public.orders`, `'"Sales"."Order Items"'`).
        table: Option<String>,
        /// A proxy's control API (repeatable): with an open version schema, how many
        /// sessions each of its --route rules serves.
        #[arg(long = "proxy", value_name = "URL")]
        proxies: Vec<String>,
        /// Bearer token of the proxies' control APIs.
        #[arg(long, env = "GHOSTWIRE_PROXY_TOKEN", hide_env_values = true)]
        proxy_token: Option<String>,
    },
    /// Stop a migration before its swap and remove its shadow table, triggers and change log
    /// (by TABLE, or through a running migration's --control ADDR).
    Abort {
        #[command(flatten)]
        db: Database,
        #[arg(long)]
        control: Option<String>,
        #[command(flatten)]
        token: ControlToken,
        table: Option<String>,
    },
    /// Pause a running migration's copy and catch-up (through its control API).
    Pause {
        #[arg(long)]
        control: String,
        #[command(flatten)]
        token: ControlToken,
    },
    /// Allow a postponed cut-over (through the migration's control API).
    Cutover {
        #[arg(long)]
        control: String,
        #[command(flatten)]
        token: ControlToken,
    },
    /// Show or change a running migration's settings without a restart (through its control
    /// API): `chunk_rows=5000 max_backlog=null throttle_query='SELECT …'`.
    Settings {
        #[arg(long)]
        control: String,
        #[command(flatten)]
        token: ControlToken,
        /// NAME=VALUE pairs; VALUE is JSON (a number, null to clear a limit) or else a string.
        #[arg(value_name = "NAME=VALUE")]
        changes: Vec<String>,
    },
    /// List the indexes of the database (or of TABLE) with their size and what they cost;
    /// invalid ones (a failed CREATE INDEX CONCURRENTLY or REINDEX CONCURRENTLY) first.
    Indexes {
        #[command(flatten)]
        db: Database,
        /// Only the invalid ones.
        #[arg(long)]
        invalid: bool,
        /// Drop the invalid ones with DROP INDEX CONCURRENTLY (asks first).
        #[arg(long)]
        drop_invalid: bool,
        /// Do not ask before dropping.
        #[arg(long)]
        yes: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only this table's.
        table: Option<String>,
    },
    /// After the swap: go back to the old table, kept in step since, without losing a write
    /// (the new table is then kept until `finish`).
    Revert {
        #[command(flatten)]
        db: Database,
        /// Ask a `migrate --revert-window` still running, through its control API (host:port).
        #[arg(long, conflicts_with = "table")]
        control: Option<String>,
        #[command(flatten)]
        token: ControlToken,
        table: Option<String>,
        /// lock_timeout for the swap back's lock on the live table.
        #[arg(long, default_value = "2s", value_parser = duration)]
        lock_timeout: Duration,
        /// Attempts at the swap back before giving up (the window stays open).
        #[arg(long, default_value_t = 5)]
        cutover_attempts: u32,
        /// The control API of each proxy to drain around the swap back (repeatable).
        #[arg(long = "proxy", value_name = "URL")]
        proxies: Vec<String>,
        /// Bearer token of the proxies' control APIs.
        #[arg(long, env = "GHOSTWIRE_PROXY_TOKEN", hide_env_values = true)]
        proxy_token: Option<String>,
        /// How long proxies may hold new queries for the swap back.
        #[arg(long, default_value = "2s", value_parser = duration)]
        drain_timeout: Duration,
        #[command(flatten)]
        throttle: ThrottleArgs,
    },
    /// After the swap: drop the old table and every trace of the migration.
    Finish {
        #[command(flatten)]
        db: Database,
        table: String,
        /// For a version schema's contract: the control API of each proxy to drain around
        /// it (repeatable).
        #[arg(long = "proxy", value_name = "URL")]
        proxies: Vec<String>,
        /// Bearer token of the proxies' control APIs.
        #[arg(long, env = "GHOSTWIRE_PROXY_TOKEN", hide_env_values = true)]
        proxy_token: Option<String>,
        /// How long proxies may hold new queries for the contract.
        #[arg(long, default_value = "2s", value_parser = duration)]
        drain_timeout: Duration,
    },
    /// Relay the PostgreSQL protocol to the database, with a drain gate for cut-overs.
    Proxy {
        /// Where clients connect (host:port).
        #[arg(long)]
        listen: String,
        /// The database server: a postgres:// URL or host:port (clients bring their own user,
        /// database and password).
        #[arg(long)]
        upstream: String,
        /// Where the HTTP control API listens (drain, open, status, metrics).
        #[arg(long)]
        control: Option<String>,
        #[command(flatten)]
        token: ControlToken,
        /// The certificate (PEM, leaf first) the proxy shows clients that ask for TLS;
        /// re-read on SIGHUP.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The private key (PEM, mode 0600) of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// TLS towards clients (default: allow with --tls-cert, else disable).
        #[arg(long, value_enum)]
        client_tls: Option<ClientTls>,
        /// The longest protocol message accepted, in bytes.
        #[arg(long, default_value_t = ghostwire_proto::MAX_MESSAGE_LEN)]
        max_message_size: u32,
        /// On SIGINT/SIGTERM: how long to let sessions end before closing them.
        #[arg(long, default_value = "30s", value_parser = duration)]
        shutdown_timeout: Duration,
        /// Only relay: do not follow prepared statements, and pass "cached plan must not
        /// change result type" on to clients instead of preparing the statement again.
        #[arg(long)]
        no_statement_recovery: bool,
        /// Give matching sessions a search_path at startup: KEY=PATTERN:SEARCH_PATH, KEY one of
        /// application_name, user, database, `*` in PATTERN for anything
        /// (`application_name=web-v2*:app_v2,public`); repeatable, the first match wins.
        #[arg(long = "route", value_name = "RULE")]
        routes: Vec<String>,
    },
    /// Show ghostwire at work on a throwaway local cluster with a sample table.
    Demo {
        /// Rows in the sample table.
        #[arg(long, default_value_t = 300_000)]
        rows: i64,
    },
}

/// Whether to compare the shadow with the original before the swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Verify {
    /// Every row, range by range (the default).
    Full,
    /// Skip the comparison (faster on huge tables; the copy and capture stay exact).
    None,
}

/// `--invalid-indexes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InvalidIndexChoice {
    /// Build them on the new table (a duplicate for a unique one fails the run).
    Rebuild,
    /// Leave them out of the new table.
    Drop,
}

/// How concurrent writes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Capture {
    /// Statement-level triggers with transition tables (any PostgreSQL 12+).
    Trigger,
    /// A replication slot and pgoutput: no work on the application's write path (needs
    /// wal_level=logical, the REPLICATION attribute, and a replica identity giving the key).
    Logical,
    /// Logical where the server, the role and the table allow it, else triggers.
    Auto,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a fraction in (0, 1], such as 0.05")),
    }
}

/// A size in bytes, as PostgreSQL writes one: `512MB`, `2GB`, `64kB`, or plain bytes.
fn size(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let unit_bytes: i64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return Err(format!("{text:?} is not a size (examples: 512MB, 2GB)")),
    };
    n.parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_bytes))
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{text:?} is not a size (examples: 512MB, 2GB)"))
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 250ms, 2s, 1m)"))
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// How to capture concurrent writes.
    #[arg(long, value_enum, default_value = "trigger")]
    pub capture: Capture,
    /// Target time per copy chunk; the chunk size adapts to it.
    #[arg(long, default_value = "250ms", value_parser = duration)]
    pub chunk_time: Duration,
    /// The most rows in one copy chunk (the chunk time decides below that).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub chunk_rows: i64,
    /// Sessions working at once on the database server: concurrent copy chunks, index
    /// builds and verification ranges.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// lock_timeout for every lock on the live table (the swap included).
    #[arg(long, default_value = "100ms", value_parser = duration)]
    pub lock_timeout: Duration,
    /// Attempts at the swap before giving up (with jittered pauses, catching up in between).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub cutover_attempts: u32,
    /// The control API of a ghostwire proxy in front of the application (repeatable): each
    /// swap attempt drains them all first, so clients wait a few milliseconds instead of
    /// queueing behind locks.
    #[arg(long = "proxy", value_name = "URL")]
    pub proxies: Vec<String>,
    /// How long proxies may hold new queries for one swap attempt.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub drain_timeout: Duration,
    /// Compare every row of the shadow with the original before the swap.
    #[arg(long, value_enum, default_value = "full")]
    pub verify: Verify,
    /// What to do with the table's invalid indexes (a failed CREATE INDEX CONCURRENTLY):
    /// build them, valid, on the new table, or leave them out. A copy is refused without it
    /// while the table has one.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub invalid_indexes: Option<InvalidIndexChoice>,
    /// How long a concurrent index build or drop may wait, in all, for the transactions it
    /// must outlast (CREATE INDEX CONCURRENTLY waits for every older one) before it gives up;
    /// the invalid index it leaves is dropped.
    #[arg(long, default_value = "10m", value_parser = duration, value_name = "DUR")]
    pub build_wait_timeout: Duration,
    /// Drop the old table right after the swap (no revert window).
    #[arg(long, conflicts_with = "revert_window")]
    pub finish: bool,
    /// Keep running after the swap for DUR with the revert window open (`POST /revert` on
    /// --control goes back), then close it as `finish` does. Default: the window stays open
    /// until `ghostwire revert` or `ghostwire finish`.
    #[arg(long, value_parser = duration, value_name = "DUR")]
    pub revert_window: Option<Duration>,
    /// Do not ask: consent to a change that cannot be reverted, and to resuming an
    /// unfinished migration of the same statement.
    #[arg(long)]
    pub yes: bool,
    /// Serve the live control API here (host:port): status, pause, resume, cutover, abort,
    /// settings, metrics.
    #[arg(long)]
    pub control: Option<String>,
    #[command(flatten)]
    pub token: ControlToken,
    /// Bearer token of the proxies' control APIs (default: --control-token).
    #[arg(long, env = "GHOSTWIRE_PROXY_TOKEN", hide_env_values = true)]
    pub proxy_token: Option<String>,
    /// How long to keep reconnecting when the connection to the database is lost (server
    /// restart, failover, terminated session) before stopping, resumable.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub reconnect_timeout: Duration,
    /// After the copy, keep the shadow in step and wait for `ghostwire cutover --control`.
    #[arg(long)]
    pub postpone_cutover: bool,
    /// Run every phase but the swap on the live table, measured; take the cut-over's lock
    /// once and release it; then remove everything. The table is never changed.
    #[arg(long, conflicts_with_all = ["finish", "postpone_cutover"])]
    pub rehearse: bool,
    /// With --rehearse: copy, index and verify this share of the rows (e.g. 0.05), spread
    /// over the key range, and project the whole run from it.
    #[arg(long, value_name = "FRACTION", requires = "rehearse", value_parser = fraction)]
    pub sample: Option<f64>,
    /// For RENAME COLUMN and DROP COLUMN: leave the table as it is and show its new shape
    /// as views in this new schema, for new code (search_path=SCHEMA,…) to run beside the
    /// old; `ghostwire finish TABLE` applies the change and drops the schema.
    #[arg(long, value_name = "SCHEMA", conflicts_with_all = ["rehearse", "finish", "postpone_cutover"])]
    pub version_schema: Option<String>,
    /// Print progress as JSON lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub throttle: ThrottleArgs,
    /// Pause the copy while more captured changes than this wait (catch-up runs meanwhile).
    #[arg(long)]
    pub max_backlog: Option<i64>,
    /// Stop the run (resumable) when more captured changes than this wait.
    #[arg(long)]
    pub critical_backlog: Option<i64>,
    /// With --capture logical: pause copy and catch-up while the replication slot retains
    /// more WAL than this (e.g. 2GB).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub max_slot_lag: Option<i64>,
    /// With --capture logical: abort the run (removing everything it made, the slot
    /// included) when the slot retains more WAL than this.
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub critical_slot_lag: Option<i64>,
}

/// How `apply` runs a file.
#[derive(Debug, Args, Clone)]
pub struct ApplyArgs {
    /// The files (`-`: standard input), run in the order of their names.
    #[arg(required = true, value_name = "FILE.sql")]
    pub files: Vec<String>,
    /// lock_timeout of every statement that locks a table (retried with jitter).
    #[arg(long, default_value = "100ms", value_parser = duration)]
    pub lock_timeout: Duration,
    /// Run each file as written in one transaction (BEGIN/COMMIT in it are dropped): every
    /// lock is held until its end.
    #[arg(long)]
    pub single_transaction: bool,
    /// Consent to changes that cannot be reverted (DROP COLUMN, …).
    #[arg(long)]
    pub yes: bool,
    /// One JSON line per statement, then the outcome.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub throttle: ThrottleArgs,
}

/// How `backfill` runs its batches.
#[derive(Debug, Args, Clone)]
pub struct BackfillArgs {
    /// Target time per batch; the number of keys in a batch adapts to it.
    #[arg(long, default_value = "250ms", value_parser = duration)]
    pub batch_time: Duration,
    /// The most keys in one batch (the batch time decides below that).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub batch_rows: i64,
    /// lock_timeout of each batch: one that waits longer for a row lock is rolled back and
    /// retried smaller.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub lock_timeout: Duration,
    /// statement_timeout of each batch (retried smaller, as for a lock timeout).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub statement_timeout: Duration,
    /// Say how many rows the statement would change and in how many batches; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: count the rows exactly (it reads them all) instead of estimating.
    #[arg(long, requires = "dry_run")]
    pub count: bool,
    /// Serve the live control API here (host:port): status, pause, resume, abort, settings
    /// (batch time as chunk_time_ms, most keys as chunk_rows), metrics.
    #[arg(long)]
    pub control: Option<String>,
    #[command(flatten)]
    pub token: ControlToken,
    /// Print progress and the outcome as JSON lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub throttle: ThrottleArgs,
}

/// The throttle signals of any work done in batches beside the application (copy and
/// catch-up, a revert's catch-up).
#[derive(Debug, Args, Clone, Default)]
pub struct ThrottleArgs {
    /// Pause the work while a replica replays further behind than this.
    #[arg(long, value_parser = duration)]
    pub max_replica_lag: Option<Duration>,
    /// Pause the work while more client sessions than this are active.
    #[arg(long)]
    pub max_active: Option<i64>,
    /// Pause the work while this SQL returns true.
    #[arg(long)]
    pub throttle_query: Option<String>,
    /// Stop (resumable) when a replica falls further behind than this.
    #[arg(long, value_parser = duration)]
    pub critical_replica_lag: Option<Duration>,
    /// Stop (resumable) when more client sessions than this are active.
    #[arg(long)]
    pub critical_active: Option<i64>,
}

impl ThrottleArgs {
    /// Whether any limit is given.
    pub fn any(&self) -> bool {
        self.max_replica_lag.is_some()
            || self.max_active.is_some()
            || self.throttle_query.is_some()
            || self.critical_replica_lag.is_some()
            || self.critical_active.is_some()
    }

    /// These limits in `settings`.
    pub fn apply(&self, settings: &mut crate::operate::Settings) {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        settings.max_replica_lag_ms = ms(self.max_replica_lag);
        settings.max_active = self.max_active;
        settings.throttle_query = self.throttle_query.clone();
        settings.critical_replica_lag_ms = ms(self.critical_replica_lag);
        settings.critical_active = self.critical_active;
    }
}

/// Exit statuses.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The run failed: the database could not be reached, or a step failed.
    pub const FAILED: u8 = 1;
    /// Refused before anything was changed: bad input or an unsupported change.
    pub const REFUSED: u8 = 2;
}
