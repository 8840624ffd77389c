//! `ghostwire backfill` (and `resume` / `abort` of a backfill).

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::CommandError;
use super::progress::{JsonLines, reporter};
use crate::backfill::{self, BackfillError, Context, DryRun, Options, Outcome};
use crate::cli::{BackfillArgs, MigrateArgs};
use crate::operate::{Live, Settings};
use crate::plan::report::thousands;
use crate::state::Migration;
use crate::{connect, control};

fn classify(e: BackfillError) -> CommandError {
    if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) }
}

/// The backfill's options from the command line.
pub fn options(a: &BackfillArgs) -> Options {
    let mut settings = Settings {
        chunk_time_ms: a.batch_time.as_millis().max(1) as u64,
        chunk_rows: a.batch_rows.max(1),
        ..Settings::default()
    };
    a.throttle.apply(&mut settings);
    Options {
        settings,
        lock_timeout: a.lock_timeout,
        statement_timeout: a.statement_timeout,
        count: a.count,
        ..Options::default()
    }
}

pub async fn run(url: Option<&str>, statement: &str, args: &BackfillArgs) -> Result<(), CommandError> {
    // Bad input is refused before any connection is made.
    backfill::statement::parse(statement).map_err(CommandError::refused)?;
    let config = connect::params(url, "ghostwire backfill")?;
    let opts = options(args);
    if args.dry_run {
        let d = backfill::dry_run(&config, statement, &opts).await.map_err(classify)?;
        if args.json {
            JsonLines::emit(json!({"event": "dry_run", "report": d}));
        } else {
            say!("{}", render(&d).trim_end());
        }
        return Ok(());
    }
    let around = Around::start(&opts, args.json, args.control.as_deref(), &args.token).await?;
    let result = backfill::backfill(&config, statement, &opts, &around.context()).await;
    around.end(result)
}

/// `ghostwire resume TABLE` of a backfill: its recorded options, with any throttle limits
/// the command gives instead.
pub async fn resume(url: Option<&str>, m: &Migration, args: &MigrateArgs) -> Result<(), CommandError> {
    let config = connect::params(url, "ghostwire resume")?;
    let mut opts = Options::from_json(&m.settings);
    if args.throttle.any() {
        args.throttle.apply(&mut opts.settings);
    }
    let around = Around::start(&opts, args.json, args.control.as_deref(), &args.token).await?;
    let result = backfill::resume(&config, m, &opts, &around.context()).await;
    around.end(result)
}

/// What runs around a backfill: the reporter, Ctrl-C, the control API.
struct Around {
    out: Box<dyn crate::operate::Reporter>,
    cancel: CancellationToken,
    live: std::sync::Arc<Live>,
    shutdown: CancellationToken,
    json: bool,
}

impl Around {
    async fn start(
        opts: &Options,
        json: bool,
        control_addr: Option<&str>,
        token: &crate::cli::ControlToken,
    ) -> Result<Around, CommandError> {
        let around = Around {
            out: reporter(json),
            cancel: CancellationToken::new(),
            live: Live::new(opts.settings.clone(), false),
            shutdown: CancellationToken::new(),
            json,
        };
        let on_signal = around.cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("interrupted: stopping after the current batch (the backfill stays resumable)");
                on_signal.cancel();
            }
        });
        if let Some(addr) = control_addr {
            let listener = super::proxy::listen_control(addr, token.secret().as_ref()).await?;
            control::metrics();
            around.out.note(&format!(
                "control API on http://{}",
                listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
            ));
            tokio::spawn(control::serve(listener, around.live.control(), token.secret(), around.shutdown.clone()));
        }
        Ok(around)
    }

    fn context(&self) -> Context<'_> {
        Context { reporter: self.out.as_ref(), cancel: self.cancel.clone(), live: std::sync::Arc::clone(&self.live) }
    }

    fn end(self, result: Result<Outcome, BackfillError>) -> Result<(), CommandError> {
        self.shutdown.cancel();
        self.out.close();
        let json_out = self.json;
        let o = result.map_err(classify)?;
        if json_out {
            JsonLines::emit(json!({"event": "done", "outcome": o}));
        } else {
            say!();
            say!(
                "Done: backfill #{} {} {} row(s) of {} in {} batch(es) this run, {:.1} s; the longest batch held its rows \
                 {:.0} ms{}{}.",
                o.id,
                if o.kind == backfill::Kind::Delete { "deleted" } else { "updated" },
                thousands(o.rows_changed),
                o.table,
                o.batches,
                o.seconds,
                o.longest_batch_ms,
                if o.retries > 0 { format!("; {} batch(es) retried smaller", o.retries) } else { String::new() },
                if o.throttled_seconds > 0.0 {
                    format!("; throttled {:.1} s", o.throttled_seconds)
                } else {
                    String::new()
                },
            );
        }
        Ok(())
    }
}

/// The dry run, for a terminal.
pub fn render(d: &DryRun) -> String {
    let mut s = String::new();
    let verb = if d.kind == backfill::Kind::Delete { "delete" } else { "update" };
    let rows = match d.exact_rows {
        Some(n) => format!("{} row(s) (counted)", thousands(n)),
        None => format!("about {} row(s) (the planner's estimate; --count counts them)", thousands(d.estimated_rows)),
    };
    s.push_str(&format!("Backfill of {}: would {verb} {rows}.\n", d.table));
    s.push_str(&format!(
        "Batches walk the key ({}) over ~{} row(s): {} key(s) in the first batch, then as many as fit --batch-time; \
         at most {} batch(es) at the first size.\n",
        d.key.join(", "),
        thousands(d.table_rows),
        thousands(d.first_batch_keys),
        thousands(d.batches_at_first_size)
    ));
    if d.skips_unchanged {
        s.push_str("Rows already as the statement makes them are skipped, so a rerun writes nothing twice.\n");
    }
    for w in &d.warnings {
        s.push_str(&format!("Warning: {w}.\n"));
    }
    s.push_str(&format!("Each batch runs, with its checkpoint, in its own transaction:\n  {}\n", d.batch_sql));
    s.push_str("Nothing was changed.\n");
    s
}

/// `ghostwire abort TABLE` of a backfill.
pub async fn abort(client: &tokio_postgres::Client, m: &Migration) -> Result<(), CommandError> {
    let ended = backfill::abort(client, m).await.map_err(|e| CommandError::failed(connect::describe(&e)))?;
    if ended {
        say!(
            "Aborted backfill #{} of {} after {} row(s); the batches done stay done.",
            m.id,
            m.table,
            thousands(m.rows_copied)
        );
    } else {
        say!("Asked the running backfill #{} of {} to stop after its current batch.", m.id, m.table);
    }
    Ok(())
}
