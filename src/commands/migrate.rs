//! `ghostwire migrate` and `ghostwire resume TABLE`.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::CommandError;
use super::progress::{JsonLines, reporter};
use crate::cli::{Capture, MigrateArgs, Verify};
use crate::migrate::{self, Context, MigrateError, Options, Outcome, Reporter, Settings};
use crate::plan::report::thousands;
use crate::state::{self, Phase};
use crate::{connect, control, plan};

/// Prints what the run does, one line at a time (when stdout is not a terminal).
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

/// The engine's options from the command line.
pub fn options(a: &MigrateArgs) -> Options {
    let mut settings = Settings {
        chunk_time_ms: a.chunk_time.as_millis().max(1) as u64,
        chunk_rows: a.chunk_rows.max(1),
        max_backlog: a.max_backlog,
        critical_backlog: a.critical_backlog,
        max_slot_lag_bytes: a.max_slot_lag,
        critical_slot_lag_bytes: a.critical_slot_lag,
        ..Settings::default()
    };
    a.throttle.apply(&mut settings);
    Options {
        settings,
        lock_timeout: a.lock_timeout,
        cutover_attempts: a.cutover_attempts,
        finish: a.finish,
        yes: a.yes,
        verify: a.verify == Verify::Full,
        proxies: a.proxies.clone(),
        drain_timeout: a.drain_timeout,
        postpone_cutover: a.postpone_cutover,
        parallel: usize::from(a.jobs),
        proxy_token: a.proxy_token.as_deref().map(crate::connect::Secret::new).or_else(|| a.token.secret()),
        reconnect_timeout: a.reconnect_timeout,
        build_wait_timeout: a.build_wait_timeout,
        rehearse: a.rehearse,
        sample: a.sample,
        version_schema: a.version_schema.clone(),
        invalid_indexes: a.invalid_indexes.map(|c| match c {
            crate::cli::InvalidIndexChoice::Rebuild => migrate::InvalidIndexes::Rebuild,
            crate::cli::InvalidIndexChoice::Drop => migrate::InvalidIndexes::Drop,
        }),
        capture: match a.capture {
            Capture::Trigger => crate::migrate::capture::Choice::Trigger,
            Capture::Logical => crate::migrate::capture::Choice::Logical,
            Capture::Auto => crate::migrate::capture::Choice::Auto,
        },
        ..Options::default()
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

fn classify(e: MigrateError) -> CommandError {
    if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) }
}

/// What to run: a new statement, or the unfinished migration of a table.
pub enum Target<'a> {
    Statement(&'a str),
    Resume(&'a str),
}

pub async fn run(url: Option<&str>, target: Target<'_>, args: &MigrateArgs) -> Result<(), CommandError> {
    if matches!(target, Target::Statement(_))
        && args.capture == Capture::Trigger
        && (args.max_slot_lag.is_some() || args.critical_slot_lag.is_some())
    {
        return Err(CommandError::refused(
            "--max-slot-lag and --critical-slot-lag limit a logical capture's slot: add --capture logical (or auto)",
        ));
    }
    // A table rename is not a change `plan` takes, but a version schema can show it.
    let mut table_rename = false;
    if let Target::Statement(statement) = target {
        match plan::parse::parse(statement) {
            Err(plan::parse::ParseError::RenamesTable) if args.version_schema.is_some() => table_rename = true,
            other => {
                other.map_err(CommandError::refused)?;
            }
        }
    }
    let config = connect::params(url, "ghostwire migrate")?;
    let mut opts = options(args);
    if let Target::Statement(statement) = target
        && !opts.yes
        && !table_rename
    {
        opts.yes = ask_consent(&config, statement).await?;
    }
    let out = reporter(args.json);
    let ctx = Context::new(out.as_ref(), &opts);
    let on_signal = ctx.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted: stopping at the next safe point (the migration stays resumable)");
            on_signal.cancel();
        }
    });
    let shutdown = CancellationToken::new();
    if let Some(addr) = &args.control {
        let listener = super::proxy::listen_control(addr, args.token.secret().as_ref()).await?;
        control::metrics();
        out.note(&format!(
            "control API on http://{}",
            listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
        ));
        tokio::spawn(control::serve(listener, ctx.live.control(), args.token.secret(), shutdown.clone()));
    }
    let result = match target {
        Target::Statement(statement) => migrate::migrate(&config, statement, &opts, &ctx).await,
        Target::Resume(table) => migrate::resume(&config, table, &opts, &ctx).await,
    };
    let window = match (&result, args.revert_window) {
        (Ok(o), Some(d)) if o.swap.is_some() && !o.finished && o.version_schema.is_none() => Some((o.table.clone(), d)),
        _ => None,
    };
    if window.is_none() {
        shutdown.cancel();
    }
    out.close();
    let outcome = result.map_err(classify)?;
    if let Some(report) = &outcome.rehearsal {
        if args.json {
            JsonLines::emit(json!({"event": "rehearsal", "report": report}));
        } else {
            say!();
            say!("{}", super::rehearsal::render(report).trim_end());
        }
        return Ok(());
    }
    if args.json {
        JsonLines::emit(summary_json(&outcome));
    } else {
        summary(&outcome);
    }
    if let Some((table, duration)) = window {
        let closed = revert_window(url, &table, duration, &ctx, args).await;
        shutdown.cancel();
        closed?;
    }
    Ok(())
}

/// `--revert-window DUR`: waits for `POST /revert` (then reverts) or the end of the window
/// (then finishes); Ctrl-C leaves the window open.
async fn revert_window(
    url: Option<&str>,
    table: &crate::sql::QualifiedName,
    duration: Duration,
    ctx: &Context<'_>,
    args: &MigrateArgs,
) -> Result<(), CommandError> {
    say!(
        "The revert window is open for {:.0} s: `POST /revert` on the control API (or `ghostwire revert {table}`) goes \
         back; then it closes as `ghostwire finish {table}` would.",
        duration.as_secs_f64()
    );
    let token = args.proxy_token.as_deref().map(crate::connect::Secret::new).or_else(|| args.token.secret());
    let proxies = crate::migrate::proxies::Proxies {
        urls: &args.proxies,
        token: token.as_ref(),
        drain_timeout: args.drain_timeout,
    };
    let name = table.to_string();
    tokio::select! {
        _ = ctx.live.revert_requested() => {
            let opts = crate::migrate::revert::Options {
                lock_timeout: args.lock_timeout,
                attempts: args.cutover_attempts,
                batch: 5_000,
                settings: ctx.live.settings(),
                live: Some(std::sync::Arc::clone(&ctx.live)),
            };
            super::cleanup::revert(url, &name, &opts, &proxies).await
        }
        _ = tokio::time::sleep(duration) => super::cleanup::finish(url, &name, &proxies).await,
        _ = ctx.cancel.cancelled() => {
            say!("Interrupted: the revert window stays open (`ghostwire revert {table}` or `ghostwire finish {table}`).");
            Ok(())
        }
    }
}

/// Plans the statement and asks for consent where it is needed: a change that cannot be
/// reverted, or resuming an unfinished migration of the same statement.
async fn ask_consent(config: &connect::Params, statement: &str) -> Result<bool, CommandError> {
    let mut client = connect::connect(config).await?;
    let p = plan::plan(&mut client, statement)
        .await
        .map_err(|e| if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) })?;
    if !p.revertible {
        say!("{}", plan::render(&p).trim_end());
        if !confirm("This change cannot be reverted. Run it?") {
            return Ok(false);
        }
        return Ok(true);
    }
    if state::schema_exists(&client).await.map_err(CommandError::failed)?
        && let Some(m) = state::active_migration(&client, &p.table).await.map_err(CommandError::failed)?
        && m.phase.before_swap()
    {
        return Ok(confirm(&format!(
            "Migration #{} of {} is unfinished (phase {}). Resume it?",
            m.id, m.table, m.phase
        )));
    }
    Ok(false)
}

fn summary_json(o: &Outcome) -> serde_json::Value {
    json!({
        "event": "done", "migration_id": o.id, "table": o.table.to_string(), "strategy": o.strategy.as_str(),
        "rows_copied": o.rows_copied, "rows_copied_by_this_run": o.rows_this_run, "copy_seconds": o.copy_time.as_secs_f64(), "total_seconds": o.total_time.as_secs_f64(),
        "lock_wait_ms": o.swap.map(|s| ms(s.lock_wait)), "lock_hold_ms": o.swap.map(|s| ms(s.lock_hold)),
        "clients_held_ms": o.clients_held.map(ms), "cutover_attempts": o.cutover_attempts, "finished": o.finished,
        "resumed_from": o.resumed_from, "unvalidated_foreign_keys": o.unvalidated, "version_schema": o.version_schema,
    })
}

fn summary(outcome: &Outcome) {
    say!();
    if let Some(schema) = &outcome.version_schema {
        let schema = crate::sql::display_ident(schema);
        say!(
            "Done: {} is unchanged; version schema {schema} shows its new shape. New code connects with \
             search_path={schema},{} (e.g. options=-c%20search_path%3D{schema},{} in its URL). Once no old code \
             runs: ghostwire finish {}",
            outcome.table,
            crate::sql::display_ident(&outcome.table.schema),
            crate::sql::display_ident(&outcome.table.schema),
            outcome.table
        );
        return;
    }
    match outcome.swap {
        None if outcome.strategy == crate::plan::Strategy::Instant => {
            say!(
                "Done: {} changed in place (catalog only) in {:.2} s.",
                outcome.table,
                outcome.total_time.as_secs_f64()
            )
        }
        None if outcome.strategy == crate::plan::Strategy::Online => {
            say!(
                "Done: {} changed in place (short locks, no copy) in {:.2} s.",
                outcome.table,
                outcome.total_time.as_secs_f64()
            )
        }
        None => say!(
            "Done: {} was already swapped; nothing left to do but `ghostwire finish {}`.",
            outcome.table,
            outcome.table
        ),
        Some(s) => {
            let copied = if outcome.rows_this_run > 0 && !outcome.copy_time.is_zero() {
                let rate = outcome.rows_this_run as f64 / outcome.copy_time.as_secs_f64();
                format!(
                    "{} rows copied in {:.1} s ({} rows/s)",
                    thousands(outcome.rows_copied),
                    outcome.copy_time.as_secs_f64(),
                    thousands(rate as i64)
                )
            } else {
                format!("{} rows copied (before this run)", thousands(outcome.rows_copied))
            };
            say!(
                "Done: {copied}; {} swapped in {} attempt(s): lock waited {:.1} ms, held {:.1} ms. Total {:.1} s.",
                outcome.table,
                outcome.cutover_attempts,
                ms(s.lock_wait),
                ms(s.lock_hold),
                outcome.total_time.as_secs_f64()
            );
            if let Some(held) = outcome.clients_held {
                say!("The proxies held new queries for {:.1} ms during the swap.", ms(held));
            }
            for fk in &outcome.unvalidated {
                say!("Warning: {fk} could not be validated and stays NOT VALID.");
            }
            if outcome.finished {
                say!("The old table is dropped.");
            } else {
                say!(
                    "The old table is kept in step as {}.{}: `ghostwire revert {}` goes back to it without losing a \
                     write; when you are happy with the new one, `ghostwire finish {}` drops it.",
                    crate::sql::display_ident(&migrate::spec::archive_schema(outcome.id)),
                    crate::sql::display_ident(&outcome.table.name),
                    outcome.table,
                    outcome.table
                );
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
