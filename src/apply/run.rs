//! Running a file's statements one by one, each the safe way, logged as it goes.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::file::{Piece, Way, pieces};
use super::log::{self, Finished, Key};
use super::{ApplyError, Options};
use crate::connect::{self, Params as Config};
use crate::operate::{Live, Reporter, retry};
use crate::{backfill, migrate};

/// One statement's outcome, as the command shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Done {
    pub file: String,
    pub number: usize,
    pub line: usize,
    pub way: Way,
    pub statement: String,
    /// Done by an earlier run (its checksum is in the log).
    pub skipped: bool,
    pub seconds: f64,
    #[serde(flatten)]
    pub finished: Finished,
}

/// The file as the log knows it: its name, so `migrations/0042.sql` and
/// `./migrations/0042.sql` (or a checkout elsewhere) are the same file.
fn log_name(path: &str) -> String {
    std::path::Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.to_owned())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Runner<'a> {
    config: Config,
    control: Client,
    opts: &'a Options,
    reporter: &'a dyn Reporter,
}

/// Applies each file in turn; `shown` is told about each statement as it ends.
pub async fn apply(
    config: &Config,
    files: &[(String, String)],
    opts: &Options,
    reporter: &dyn Reporter,
    shown: &(dyn Fn(&Done) + Sync),
) -> Result<Vec<Done>, ApplyError> {
    // Every file is read and checked before anything runs.
    let mut all = Vec::new();
    for (name, sql) in files {
        all.push((name.clone(), pieces(name, sql, opts.single_transaction)?));
    }
    let mut control = connect::connect(&config.named("ghostwire apply")).await?;
    crate::state::ensure_schema(&mut control).await.map_err(ApplyError::db("creating the ghostwire schema"))?;
    let mut run = Runner { config: config.named("ghostwire apply"), control, opts, reporter };
    let mut out = Vec::new();
    for (file, pieces) in all {
        if opts.single_transaction {
            let d = run.whole(&file, &pieces).await?;
            shown(&d);
            out.push(d);
            continue;
        }
        for (i, p) in pieces.iter().enumerate() {
            let occurrence = 1 + pieces[..i].iter().filter(|q| q.text == p.text).count() as i32;
            let d = run.one(&file, p, occurrence, out.iter().filter(|d: &&Done| !d.skipped).count()).await?;
            shown(&d);
            out.push(d);
        }
    }
    Ok(out)
}

impl Runner<'_> {
    async fn one(&mut self, file: &str, p: &Piece, occurrence: i32, ran: usize) -> Result<Done, ApplyError> {
        let db = |what: &'static str| ApplyError::db(what);
        let checksum = log::checksum(&self.control, &p.text).await.map_err(db("reading the log"))?;
        let name = log_name(file);
        let key = Key { file: &name, checksum: &checksum, occurrence };
        let done = |skipped: bool, seconds: f64, finished: Finished| Done {
            file: file.to_owned(),
            number: p.number,
            line: p.line,
            way: p.way,
            statement: p.text.clone(),
            skipped,
            seconds,
            finished,
        };
        if log::done(&self.control, &key).await.map_err(db("reading the log"))? {
            return Ok(done(true, 0.0, Finished::default()));
        }
        if p.way == Way::SearchPath
            && let Some(path) = &p.search_path
        {
            self.config = self.config.clone().with_setting("search_path", path);
        }
        let id = log::start(&self.control, &key, p.number as i32, p.line as i32, &p.text, p.way.as_str())
            .await
            .map_err(db("writing the log"))?;
        let t = Instant::now();
        let result = self.run(p, id).await;
        let seconds = t.elapsed().as_secs_f64();
        match result {
            Ok((finished, logged)) => {
                if !logged {
                    log::finish(&self.control, id, &finished).await.map_err(db("writing the log"))?;
                }
                Ok(done(false, seconds, finished))
            }
            Err((cause, refused)) => {
                let _ = log::failed(&self.control, id, &cause).await;
                Err(ApplyError::Statement {
                    file: file.to_owned(),
                    number: p.number,
                    line: p.line,
                    statement: p.text.clone(),
                    cause,
                    refused: refused && ran == 0,
                    done_before: p.number - 1,
                })
            }
        }
    }

    /// Runs one statement: what it did, and whether the log was already written (in the
    /// statement's own transaction); Err with the cause and whether it was a refusal.
    async fn run(&self, p: &Piece, id: i64) -> Result<(Finished, bool), (String, bool)> {
        let opts = self.opts;
        match p.way {
            Way::SearchPath => {
                Ok((Finished { note: Some("the statements after it use it".into()), ..Default::default() }, false))
            }
            Way::Setting => Ok((
                Finished {
                    note: Some("skipped: ghostwire's sessions keep their own timeouts".into()),
                    ..Default::default()
                },
                false,
            )),
            Way::Migrate => {
                let ctx = migrate::Context::new(self.reporter, &opts.migrate);
                let unfinished =
                    log::unfinished_run(&self.control, &p.text).await.map_err(|e| (connect::describe(&e), false))?;
                let result = match unfinished {
                    Some(m) => migrate::resume(&self.config, &m.table.to_string(), &opts.migrate, &ctx).await,
                    None => migrate::migrate(&self.config, &p.text, &opts.migrate, &ctx).await,
                };
                let o = result.map_err(|e| (e.to_string(), e.is_refusal()))?;
                let (wait, hold) = o.swap.map(|s| (Some(ms(s.lock_wait)), Some(ms(s.lock_hold)))).unwrap_or_default();
                let note = Some(format!(
                    "{} ({})",
                    o.strategy.as_str(),
                    if o.swap.is_some() { "copied and swapped" } else { "no copy" }
                ));
                Ok((Finished { migration_id: Some(o.id), lock_wait_ms: wait, lock_hold_ms: hold, note }, false))
            }
            Way::Backfill => {
                let ctx = backfill::Context {
                    reporter: self.reporter,
                    cancel: Default::default(),
                    live: Live::new(opts.backfill.settings.clone(), false),
                };
                let unfinished =
                    log::unfinished_run(&self.control, &p.text).await.map_err(|e| (connect::describe(&e), false))?;
                let result = match unfinished.filter(|m| m.strategy == backfill::STRATEGY) {
                    Some(m) => backfill::resume(&self.config, &m, &opts.backfill, &ctx).await,
                    None => backfill::backfill(&self.config, &p.text, &opts.backfill, &ctx).await,
                };
                let o = result.map_err(|e| (e.to_string(), e.is_refusal()))?;
                let note = Some(format!("{} row(s) in {} batch(es)", o.rows_changed, o.batches));
                Ok((
                    Finished {
                        migration_id: Some(o.id),
                        lock_hold_ms: Some(o.longest_batch_ms),
                        note,
                        ..Default::default()
                    },
                    false,
                ))
            }
            Way::Direct => {
                let client = connect::connect(&self.config).await.map_err(|e| (e.to_string(), false))?;
                let what = format!("statement {}", p.number);
                let ((), times) = retry::transaction(&client, &opts.migrate.retry_policy(), &what, || async {
                    client.batch_execute(&p.text).await?;
                    // Finished in the statement's own transaction: it never runs twice.
                    log::finish(&client, id, &Finished::default()).await
                })
                .await
                .map_err(|e| (connect::describe(&e), false))?;
                let f = Finished {
                    lock_wait_ms: Some(ms(times.waited)),
                    lock_hold_ms: Some(ms(times.held)),
                    ..Default::default()
                };
                let _ = log::finish(&self.control, id, &f).await;
                Ok((f, true))
            }
            Way::Outside => {
                let client = connect::connect(&self.config).await.map_err(|e| (e.to_string(), false))?;
                let policy = opts.migrate.retry_policy();
                client
                    .batch_execute(&format!("SET lock_timeout = '{}ms'", policy.lock_timeout.as_millis().max(1)))
                    .await
                    .map_err(|e| (connect::describe(&e), false))?;
                let mut n = 1;
                loop {
                    match client.batch_execute(&p.text).await {
                        Ok(()) => return Ok((Finished::default(), false)),
                        Err(e) if retry::is_lock_conflict(&e) && n < policy.attempts => {
                            retry::pause_unless_closed(&client, policy.pause(n)).await;
                            n += 1;
                        }
                        Err(e) => return Err((connect::describe(&e), false)),
                    }
                }
            }
        }
    }

    /// `--single-transaction`: the whole file, as written, in one transaction.
    async fn whole(&mut self, file: &str, pieces: &[Piece]) -> Result<Done, ApplyError> {
        let text: Vec<&str> = pieces.iter().map(|p| p.text.as_str()).collect();
        let text = text.join(";\n");
        let checksum = log::checksum(&self.control, &text).await.map_err(ApplyError::db("reading the log"))?;
        let name = log_name(file);
        let key = Key { file: &name, checksum: &checksum, occurrence: 1 };
        let done = |skipped: bool, seconds: f64, finished: Finished| Done {
            file: file.to_owned(),
            number: 1,
            line: pieces.first().map_or(1, |p| p.line),
            way: Way::Direct,
            statement: text.clone(),
            skipped,
            seconds,
            finished,
        };
        if log::done(&self.control, &key).await.map_err(ApplyError::db("reading the log"))? {
            return Ok(done(true, 0.0, Finished::default()));
        }
        let id = log::start(&self.control, &key, 1, 1, &text, "single transaction")
            .await
            .map_err(ApplyError::db("writing the log"))?;
        let client = connect::connect(&self.config).await?;
        let t = Instant::now();
        let result = retry::transaction(&client, &self.opts.migrate.retry_policy(), "the file", || async {
            client.batch_execute(&text).await?;
            log::finish(&client, id, &Finished::default()).await
        })
        .await;
        match result {
            Ok(((), times)) => {
                let f = Finished {
                    lock_wait_ms: Some(ms(times.waited)),
                    lock_hold_ms: Some(ms(times.held)),
                    note: Some("one transaction: every lock held to the end".into()),
                    ..Default::default()
                };
                let _ = log::finish(&self.control, id, &f).await;
                Ok(done(false, t.elapsed().as_secs_f64(), f))
            }
            Err(e) => {
                let cause = connect::describe(&e);
                let _ = log::failed(&self.control, id, &cause).await;
                Err(ApplyError::Statement {
                    file: file.to_owned(),
                    number: 1,
                    line: 1,
                    statement: "the whole file (--single-transaction)".into(),
                    cause,
                    refused: false,
                    done_before: 0,
                })
            }
        }
    }
}
