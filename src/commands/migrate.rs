//! `ghostwire migrate`.

use std::io::IsTerminal;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::CommandError;
use crate::migrate::{self, MigrateError, Options, Reporter};
use crate::plan::report::thousands;
use crate::state::Phase;
use crate::{db, plan};

/// Prints what the run does, one line at a time.
pub struct Lines;

impl Reporter for Lines {
    fn phase(&self, phase: Phase, message: &str) {
        say!("[{phase}] {message}");
    }

    fn progress(&self, phase: Phase, done: i64, total: i64, rate: f64) {
        let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 100.0 };
        let eta = if rate > 0.0 && total > done {
            format!(", about {:.0} s left", (total - done) as f64 / rate)
        } else {
            String::new()
        };
        say!(
            "[{phase}] {} of ~{} rows ({pct:.0}%), {} rows/s{eta}",
            thousands(done),
            thousands(total),
            thousands(rate as i64)
        );
    }

    fn note(&self, message: &str) {
        say!("        {message}");
    }
}

/// Asks on the terminal whether to go on; false when stdin is not a terminal.
fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    say!("{question} [y/N]");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
}

pub async fn run(url: Option<&str>, statement: &str, mut options: Options) -> Result<(), CommandError> {
    plan::parse::parse(statement).map_err(CommandError::refused)?;
    let config = db::config(url, "ghostwire migrate")?;
    if !options.yes {
        // A change that cannot be reverted needs consent: asked here, or --yes.
        let mut client = db::connect(&config).await?;
        let p = plan::plan(&mut client, statement)
            .await
            .map_err(|e| if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) })?;
        if !p.revertible {
            say!("{}", plan::render(&p).trim_end());
            if confirm("This change cannot be reverted. Run it?") {
                options.yes = true;
            }
        }
    }
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping at the next safe point…");
            on_signal.cancel();
        }
    });
    let outcome =
        migrate::migrate(&config, statement, &options, &Lines, None, cancel).await.map_err(|e: MigrateError| {
            if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) }
        })?;
    say!();
    match outcome.swap {
        None => say!(
            "Done: {} changed in place (catalog only) in {:.2} s.",
            outcome.table,
            outcome.total_time.as_secs_f64()
        ),
        Some(s) => {
            let rate = outcome.rows_copied as f64 / outcome.copy_time.as_secs_f64().max(1e-3);
            say!(
                "Done: {} rows copied in {:.1} s ({} rows/s); {} swapped in {} attempt(s): lock waited {:.1} ms, held {:.1} ms. Total {:.1} s.",
                thousands(outcome.rows_copied),
                outcome.copy_time.as_secs_f64(),
                thousands(rate as i64),
                outcome.table,
                outcome.cutover_attempts,
                ms(s.lock_wait),
                ms(s.lock_hold),
                outcome.total_time.as_secs_f64()
            );
            for fk in &outcome.unvalidated {
                say!("Warning: {fk} could not be validated and stays NOT VALID.");
            }
            if outcome.finished {
                say!("The old table is dropped.");
            } else {
                say!(
                    "The old table is kept as {}.{}; when you are happy with the new one: ghostwire finish {}",
                    crate::sql::display_ident(&migrate::spec::archive_schema(outcome.id)),
                    crate::sql::display_ident(&outcome.table.name),
                    outcome.table
                );
            }
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
