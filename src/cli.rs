//! The command-line contract (DESIGN.md §7): commands, flags and exit statuses that users
//! script against.

use clap::{Args, Parser, Subcommand};

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
    /// The database, as a libpq URL (postgres://user@host:port/dbname).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
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
        /// One ALTER TABLE statement.
        statement: String,
    },
    /// Show ghostwire at work on a throwaway local cluster with a sample table.
    Demo {
        /// Rows in the sample table.
        #[arg(long, default_value_t = 300_000)]
        rows: i64,
    },
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
