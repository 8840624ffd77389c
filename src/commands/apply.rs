//! `ghostwire apply FILE.sql…` and `ghostwire plan FILE.sql`.

use std::io::Read;

use serde_json::json;

use super::CommandError;
use super::progress::{JsonLines, reporter};
use crate::apply::{self, ApplyError, Done, Way};
use crate::cli::ApplyArgs;
use crate::plan::report::thousands;
use crate::{backfill, connect, migrate, plan};

/// Whether `plan`'s argument names a file (or `-`) rather than being a statement.
pub fn is_file(arg: &str) -> bool {
    arg == "-"
        || (arg.trim_end().ends_with(".sql") && !arg.contains(char::is_whitespace))
        || std::path::Path::new(arg).is_file()
}

/// The files, read, in name order (`-`: standard input).
fn read(files: &[String]) -> Result<Vec<(String, String)>, CommandError> {
    let mut out = Vec::new();
    for f in files {
        let text = if f == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CommandError::refused(format!("reading standard input: {e}")))?;
            s
        } else {
            std::fs::read_to_string(f).map_err(|e| CommandError::refused(format!("reading {f}: {e}")))?
        };
        out.push((f.clone(), text));
    }
    out.sort_by(|a, b| {
        let name =
            |p: &str| std::path::Path::new(p).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name(&a.0).cmp(&name(&b.0))
    });
    Ok(out)
}

fn options(a: &ApplyArgs) -> apply::Options {
    let mut m =
        migrate::Options { yes: a.yes, finish: true, lock_timeout: a.lock_timeout, ..migrate::Options::default() };
    a.throttle.apply(&mut m.settings);
    let mut b = backfill::Options::default();
    a.throttle.apply(&mut b.settings);
    apply::Options { migrate: m, backfill: b, single_transaction: a.single_transaction }
}

fn line(d: &Done) -> String {
    if d.skipped {
        return format!("[{} #{}] skipped: done before — {}", d.file, d.number, short(&d.statement));
    }
    let locks = match (d.finished.lock_wait_ms, d.finished.lock_hold_ms) {
        (Some(w), Some(h)) => format!("; lock waited {w:.1} ms, held {h:.1} ms"),
        (None, Some(h)) => format!("; longest lock {h:.1} ms"),
        _ => String::new(),
    };
    let note = d.finished.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default();
    format!("[{} #{}] {}{note}: {:.2} s{locks} — {}", d.file, d.number, d.way.as_str(), d.seconds, short(&d.statement))
}

fn short(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 90 { format!("{}…", one.chars().take(89).collect::<String>()) } else { one }
}

pub async fn run(url: Option<&str>, args: &ApplyArgs) -> Result<(), CommandError> {
    let files = read(&args.files)?;
    // Every file is checked before a connection is made.
    for (name, sql) in &files {
        apply::pieces(name, sql, args.single_transaction).map_err(CommandError::refused)?;
    }
    if args.single_transaction {
        tracing::warn!(
            "--single-transaction: the whole file runs in one transaction and holds every lock it takes until it ends"
        );
    }
    let config = connect::params(url, "ghostwire apply")?;
    let opts = options(args);
    let out = reporter(args.json);
    let json_out = args.json;
    let shown = move |d: &Done| {
        if json_out {
            JsonLines::emit(json!({"event": "statement", "statement": d}));
        } else {
            say!("{}", line(d));
        }
    };
    let result = apply::apply(&config, &files, &opts, out.as_ref(), &shown).await;
    out.close();
    match result {
        Ok(done) => {
            let ran = done.iter().filter(|d| !d.skipped).count();
            if args.json {
                JsonLines::emit(
                    json!({"event": "done", "statements": done.len(), "ran": ran, "skipped": done.len() - ran}),
                );
            } else {
                say!("Done: {} statement(s), {ran} run now, {} done before.", done.len(), done.len() - ran);
            }
            Ok(())
        }
        Err(e) => {
            if args.json {
                JsonLines::emit(json!({"event": "failed", "error": e.to_string()}));
            }
            Err(classify(e))
        }
    }
}

fn classify(e: ApplyError) -> CommandError {
    if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) }
}

/// `ghostwire plan FILE.sql`: each statement's way, with its locks plainly and through
/// ghostwire. A statement on a table an earlier one creates cannot be planned before that
/// one runs: it says so.
pub async fn plan_file(url: Option<&str>, json: bool, file: &str) -> Result<(), CommandError> {
    let files = read(&[file.to_owned()])?;
    let (name, sql) = &files[0];
    let pieces = apply::pieces(name, sql, false).map_err(CommandError::refused)?;
    let config = connect::params(url, "ghostwire plan")?;
    let mut client = connect::connect(&config).await?;
    let mut docs = Vec::new();
    for p in &pieces {
        let (summary, detail) = match p.way {
            Way::Migrate => match plan::plan(&mut client, &p.text).await {
                Ok(pl) => {
                    let locks: Vec<String> = pl
                        .steps
                        .iter()
                        .map(|s| format!("plainly {} {}; ghostwire {} {}", s.naive.mode.as_str(), s.naive.held_for, s.ghostwire.mode.as_str(), s.ghostwire.held_for))
                        .collect();
                    (format!("migrate, {}: {}", pl.strategy.as_str(), pl.summary), locks)
                }
                Err(e) => (format!("migrate: cannot plan it now ({e})"), vec![]),
            },
            Way::Backfill => match backfill::dry_run(&config, &p.text, &backfill::Options::default()).await {
                Ok(d) => (
                    format!("backfill: about {} row(s) in batches over ({})", thousands(d.estimated_rows), d.key.join(", ")),
                    vec!["plainly: every changed row locked until the statement ends; ghostwire: a batch's rows for a batch's time".into()],
                ),
                Err(e) => (format!("backfill: cannot plan it now ({e})"), vec![]),
            },
            Way::Direct | Way::Outside => (
                format!("{}: the statement's own locks, under lock_timeout, retried", p.way.as_str()),
                vec![],
            ),
            Way::SearchPath | Way::Setting => (p.way.as_str().to_owned(), vec![]),
        };
        if json {
            docs.push(json!({"number": p.number, "line": p.line, "statement": p.text, "way": p.way, "summary": summary, "locks": detail}));
        } else {
            say!("#{} (line {}) {}", p.number, p.line, short(&p.text));
            say!("    {summary}");
            for d in detail {
                say!("    {d}");
            }
        }
    }
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&json!({"file": name, "statements": docs})).map_err(CommandError::failed)?
        );
    }
    Ok(())
}
