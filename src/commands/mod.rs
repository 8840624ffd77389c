//! One module per command; each returns a [`CommandError`] carrying its exit status.

/// Prints a line of command output. A closed stdout (`ghostwire plan … | head`) is not an
/// error worth a panic: the output is dropped and the command carries on.
macro_rules! say {
    () => { say!("") };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod cleanup;
mod demo;
mod migrate;
mod plan;
mod proxy;
mod status;
mod target;

use std::fmt;

use crate::cli::{Command, exit};

/// A failed command: the one-paragraph message for the operator and the exit status.
#[derive(Debug)]
pub struct CommandError {
    pub status: u8,
    pub message: String,
}

impl CommandError {
    pub fn refused(message: impl fmt::Display) -> Self {
        CommandError { status: exit::REFUSED, message: message.to_string() }
    }

    pub fn failed(message: impl fmt::Display) -> Self {
        CommandError { status: exit::FAILED, message: message.to_string() }
    }
}

impl From<crate::db::ConnectError> for CommandError {
    fn from(e: crate::db::ConnectError) -> Self {
        match e {
            crate::db::ConnectError::Connect(_) => CommandError::failed(e),
            _ => CommandError::refused(e),
        }
    }
}

pub async fn run(command: Command) -> Result<(), CommandError> {
    match command {
        Command::Plan { db, json, statement } => plan::run(db.database_url.as_deref(), json, &statement).await,
        Command::Migrate { db, statement, options } => {
            if options.capture == crate::cli::Capture::Logical {
                return Err(CommandError::refused(
                    "--capture logical is not available yet; use the default trigger capture",
                ));
            }
            let opts = crate::migrate::Options {
                chunk_time: options.chunk_time,
                chunk_rows: options.chunk_rows,
                lock_timeout: options.lock_timeout,
                cutover_attempts: options.cutover_attempts,
                finish: options.finish,
                yes: options.yes,
                verify: options.verify == crate::cli::Verify::Full,
                proxies: options.proxies,
                drain_timeout: options.drain_timeout,
                ..crate::migrate::Options::default()
            };
            migrate::run(db.database_url.as_deref(), &statement, opts).await
        }
        Command::Status { db, json, table } => status::run(db.database_url.as_deref(), table.as_deref(), json).await,
        Command::Abort { db, table } => cleanup::abort(db.database_url.as_deref(), &table).await,
        Command::Finish { db, table } => cleanup::finish(db.database_url.as_deref(), &table).await,
        Command::Proxy { listen, upstream, control, max_message_size, shutdown_timeout } => {
            proxy::run(&listen, &upstream, control.as_deref(), max_message_size, shutdown_timeout).await
        }
        Command::Demo { rows } => demo::run(rows).await,
    }
}
