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

mod apply;
mod backfill;
mod cleanup;
mod demo;
mod indexes;
mod live;
mod migrate;
mod plan;
mod progress;
mod proxy;
mod rehearsal;
mod status;
mod target;

use std::fmt;

pub use progress::LogWriter;

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

impl From<crate::connect::ConnectError> for CommandError {
    fn from(e: crate::connect::ConnectError) -> Self {
        if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) }
    }
}

pub async fn run(command: Command) -> Result<(), CommandError> {
    match command {
        Command::Plan { db, json, statement } if apply::is_file(&statement) => {
            apply::plan_file(db.database_url.as_deref(), json, &statement).await
        }
        Command::Plan { db, json, statement } => plan::run(db.database_url.as_deref(), json, &statement).await,
        Command::Migrate { db, statement, options } => {
            migrate::run(db.database_url.as_deref(), migrate::Target::Statement(&statement), &options).await
        }
        Command::Apply { db, options } => apply::run(db.database_url.as_deref(), &options).await,
        Command::Backfill { db, statement, options } => {
            backfill::run(db.database_url.as_deref(), &statement, &options).await
        }
        Command::Resume { db, table, options } => match (table, &options.control) {
            (Some(table), _) => match target::backfill_of(db.database_url.as_deref(), &table).await? {
                Some(m) => backfill::resume(db.database_url.as_deref(), &m, &options).await,
                None => migrate::run(db.database_url.as_deref(), migrate::Target::Resume(&table), &options).await,
            },
            (None, Some(addr)) => {
                let token = options.token.secret();
                live::command(live::Remote { addr, token: token.as_ref() }, "/resume").await
            }
            (None, None) => Err(CommandError::refused(
                "name the table whose migration to resume (ghostwire resume TABLE), or a running migration's --control ADDR",
            )),
        },
        Command::Status { db, json, control, token, table, proxies, proxy_token } => match control {
            Some(addr) => live::status(live::Remote { addr: &addr, token: token.secret().as_ref() }, json).await,
            None => {
                let token = proxy_token.as_deref().filter(|t| !t.is_empty()).map(crate::connect::Secret::new);
                let proxies = status::Proxies { urls: &proxies, token: token.as_ref() };
                status::run(db.database_url.as_deref(), table.as_deref(), json, &proxies).await
            }
        },
        Command::Abort { db, control, token, table } => match (table, control) {
            (Some(table), _) => cleanup::abort(db.database_url.as_deref(), &table).await,
            (None, Some(addr)) => {
                live::command(live::Remote { addr: &addr, token: token.secret().as_ref() }, "/abort").await
            }
            (None, None) => Err(CommandError::refused(
                "name the table whose migration to abort, or a running migration's --control ADDR",
            )),
        },
        Command::Pause { control, token } => {
            live::command(live::Remote { addr: &control, token: token.secret().as_ref() }, "/pause").await
        }
        Command::Cutover { control, token } => {
            live::command(live::Remote { addr: &control, token: token.secret().as_ref() }, "/cutover").await
        }
        Command::Settings { control, token, changes } => {
            live::settings(live::Remote { addr: &control, token: token.secret().as_ref() }, &changes).await
        }
        Command::Indexes { db, invalid, drop_invalid, yes, json, table } => {
            indexes::run(db.database_url.as_deref(), table.as_deref(), invalid, drop_invalid, yes, json).await
        }
        Command::Revert {
            db,
            control,
            token: control_token,
            table,
            lock_timeout,
            cutover_attempts,
            proxies,
            proxy_token,
            drain_timeout,
            throttle,
        } => {
            let token = proxy_token.as_deref().filter(|t| !t.is_empty()).map(crate::connect::Secret::new);
            let proxies = crate::migrate::proxies::Proxies { urls: &proxies, token: token.as_ref(), drain_timeout };
            let mut settings = crate::migrate::live::Settings::default();
            throttle.apply(&mut settings);
            let opts = crate::migrate::revert::Options {
                lock_timeout,
                attempts: cutover_attempts,
                batch: 5_000,
                settings,
                live: None,
            };
            match (table, control) {
                (Some(table), _) => cleanup::revert(db.database_url.as_deref(), &table, &opts, &proxies).await,
                (None, Some(addr)) => {
                    live::command(live::Remote { addr: &addr, token: control_token.secret().as_ref() }, "/revert").await
                }
                (None, None) => Err(CommandError::refused(
                    "name the table whose migration to revert, or a running migration's --control ADDR",
                )),
            }
        }
        Command::Finish { db, table, proxies, proxy_token, drain_timeout } => {
            let token = proxy_token.as_deref().filter(|t| !t.is_empty()).map(crate::connect::Secret::new);
            let proxies = crate::migrate::proxies::Proxies { urls: &proxies, token: token.as_ref(), drain_timeout };
            cleanup::finish(db.database_url.as_deref(), &table, &proxies).await
        }
        Command::Proxy {
            listen,
            upstream,
            control,
            token,
            tls_cert,
            tls_key,
            client_tls,
            max_message_size,
            shutdown_timeout,
            no_statement_recovery,
            routes,
        } => {
            let tls = proxy::Tls { cert: tls_cert, key: tls_key, client: client_tls };
            let args = proxy::Args {
                listen: &listen,
                upstream: &upstream,
                control: control.as_deref(),
                token: token.secret(),
                recover_statements: !no_statement_recovery,
                routes,
            };
            proxy::run(args, tls, max_message_size, shutdown_timeout).await
        }
        Command::Demo { rows } => demo::run(rows).await,
    }
}
