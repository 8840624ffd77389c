//! Phases `index` and `verify`, run together on one pool of `--jobs` sessions.
//!
//! After the copy, the shadow needs its indexes built, its rows compared with the
//! original's, and its planner statistics gathered: all CPU work on the server. One after
//! the other they leave cores idle (while the last index builds alone; the statistics next
//! to the verification). Here each session takes the next piece of work as it comes free:
//!
//! 1. index builds, the key index first (verification reads the shadow by its key);
//! 2. `VACUUM (ANALYZE)`, by the first session free once every build has ended (it and
//!    `CREATE INDEX` lock each other out): the planner's statistics, and the visibility map
//!    that lets index-only scans skip the heap. The new table would otherwise have none
//!    until autovacuum came by (the offline rewrite leaves none either), and the foreign-key
//!    validations after the swap are anti-joins that read whole indexes: over index-only
//!    scans they take well under half the time of a hash join on the heap;
//! 3. verification ranges, once the key index exists and the caller has opened verification
//!    (it records the `verify` phase first).
//!
//! Verification explains a differing row by a pending change-log entry, so it may run before
//! the last catch-up: a row that differs without one is a defect whenever it is found.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::connect::Params as Config;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::index::{self, IndexError};
use super::spec::{DeferredIndex, Spec};
use super::verify::{Report, Verifier};

#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("verifying: {}", crate::connect::describe(.0))]
    Verify(tokio_postgres::Error),
    #[error("vacuuming and analyzing the shadow: {}", crate::connect::describe(.0))]
    Analyze(tokio_postgres::Error),
    #[error("a worker after the copy failed: {0}")]
    Worker(String),
}

/// Where the pool is, as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    /// The key index is being built.
    Building,
    /// The shadow's key index exists: verification can be opened.
    KeyReady,
    /// The pool has stopped (done, failed or cancelled).
    Ended,
}

/// What the pool did.
#[derive(Debug, Default)]
pub struct Done {
    /// Each index built, with its build time.
    pub built: Vec<(String, Duration)>,
    /// From the start until the last build ended.
    pub builds_took: Duration,
    /// The verification's findings, when it ran.
    pub report: Option<Report>,
}

struct Shared {
    queue: Mutex<Builds>,
    key_index: String,
    /// The last build to start may use the server's parallel build workers (nothing else
    /// would use the other cores by then).
    server_workers_last: bool,
    verifier: Option<Verifier>,
    open: watch::Receiver<bool>,
    stage: watch::Sender<Stage>,
    stop: CancellationToken,
    started: Instant,
    analyze_sql: String,
}

#[derive(Default)]
struct Builds {
    waiting: VecDeque<DeferredIndex>,
    running: usize,
    analyze_taken: bool,
    ended_at: Option<Duration>,
}

/// One worker's share of the results.
#[derive(Default)]
struct Part {
    built: Vec<(String, Duration)>,
    report: Option<Report>,
}

enum Job {
    Build(DeferredIndex, bool),
    Analyze,
    Verify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Builds> {
        // A worker that panicked holding the lock leaves consistent counters (no update is
        // half done), so the poison is ignored.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_job(&self) -> Option<Job> {
        let mut b = self.lock();
        if let Some(index) = b.waiting.pop_front() {
            b.running += 1;
            let last = b.waiting.is_empty();
            return Some(Job::Build(index, last && self.server_workers_last));
        }
        if b.running == 0 && !b.analyze_taken {
            b.analyze_taken = true;
            return Some(Job::Analyze);
        }
        self.verifier.as_ref().map(|_| Job::Verify)
    }

    fn build_ended(&self, name: &str) {
        let mut b = self.lock();
        b.running -= 1;
        if b.running == 0 && b.waiting.is_empty() {
            b.ended_at = Some(self.started.elapsed());
        }
        if name == self.key_index {
            self.stage.send_replace(Stage::KeyReady);
        }
    }
}

/// The index builds, verification and statistics of one shadow, under way.
pub struct Pool {
    task: tokio::task::JoinHandle<Result<Done, PostCopyError>>,
    stage: watch::Receiver<Stage>,
    open: watch::Sender<bool>,
    _stop: DropGuard,
}

impl Pool {
    /// Starts `builds` (the shadow's missing indexes), `ANALYZE` and, with `verify_rows`,
    /// a verification in ranges of that many rows (of one range in `sample_every`, for a
    /// sampled rehearsal), on `jobs` sessions. Stops at the next
    /// piece of work when `cancel` fires, and when the pool is dropped.
    pub fn start(
        config: Config,
        spec: &Spec,
        mut builds: Vec<DeferredIndex>,
        jobs: usize,
        verify_rows: Option<i64>,
        sample_every: Option<u64>,
        cancel: &CancellationToken,
    ) -> Pool {
        // The key index first: verification waits for it.
        builds.sort_by_key(|d| d.name != spec.key_index);
        let key_pending = builds.iter().any(|d| d.name == spec.key_index);
        let (stage_tx, stage) = watch::channel(if key_pending { Stage::Building } else { Stage::KeyReady });
        let (open, open_rx) = watch::channel(false);
        let stop = cancel.child_token();
        let jobs = jobs.max(1);
        let spec = spec.clone();
        let shared_stop = stop.clone();
        let task = tokio::spawn(async move {
            let stage = stage_tx.clone();
            let verify = verify_rows.map(|rows| (rows, sample_every));
            let result = run(config, spec, builds, jobs, verify, stage_tx, open_rx, shared_stop).await;
            stage.send_replace(Stage::Ended);
            result
        });
        Pool { task, stage, open, _stop: stop.drop_guard() }
    }

    /// Waits until the shadow's key index exists; false if the pool stopped first.
    pub async fn key_index_ready(&mut self) -> bool {
        matches!(self.stage.wait_for(|s| *s != Stage::Building).await.map(|s| *s), Ok(Stage::KeyReady))
    }

    /// Lets the sessions verify (after the key index exists).
    pub fn open_verification(&self) {
        self.open.send_replace(true);
    }

    /// Waits for everything to end.
    pub async fn finish(self) -> Result<Done, PostCopyError> {
        let Pool { task, _stop, .. } = self;
        task.await.map_err(|e| PostCopyError::Worker(e.to_string()))?
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: Config,
    spec: Spec,
    builds: Vec<DeferredIndex>,
    jobs: usize,
    verify: Option<(i64, Option<u64>)>,
    stage: watch::Sender<Stage>,
    open: watch::Receiver<bool>,
    stop: CancellationToken,
) -> Result<Done, PostCopyError> {
    let several = jobs > 1;
    let first = index::build_session(&config, several).await?;
    let verifier = match verify {
        Some((rows, sample_every)) => {
            Some(Verifier::new(&first, &spec, rows, sample_every).await.map_err(PostCopyError::Verify)?)
        }
        None => None,
    };
    let report = verifier.as_ref().map(Verifier::empty_report);
    let ended_at = builds.is_empty().then_some(Duration::ZERO);
    let shared = Arc::new(Shared {
        queue: Mutex::new(Builds { waiting: builds.into(), ended_at, ..Builds::default() }),
        key_index: spec.key_index.clone(),
        server_workers_last: several && verifier.is_none(),
        verifier,
        open,
        stage,
        stop: stop.clone(),
        started: Instant::now(),
        analyze_sql: format!("VACUUM (ANALYZE) {}", spec.shadow().sql()),
    });
    let mut workers = JoinSet::new();
    let mut first = Some(first);
    for _ in 0..jobs {
        let client = match first.take() {
            Some(c) => c,
            None => index::build_session(&config, several).await?,
        };
        workers.spawn(work(client, Arc::clone(&shared)));
    }
    let mut done = Done { report, ..Done::default() };
    while let Some(joined) = workers.join_next().await {
        let part = match joined {
            Ok(Ok(part)) => part,
            Ok(Err(e)) => {
                stop.cancel();
                return Err(e);
            }
            Err(e) => {
                stop.cancel();
                return Err(PostCopyError::Worker(e.to_string()));
            }
        };
        done.built.extend(part.built);
        if let (Some(total), Some(r)) = (done.report.as_mut(), part.report) {
            total.merge(r);
        }
    }
    done.builds_took = shared.lock().ended_at.unwrap_or_else(|| shared.started.elapsed());
    Ok(done)
}

/// One session's loop: the next piece of work until none is left.
async fn work(client: Client, shared: Arc<Shared>) -> Result<Part, PostCopyError> {
    let mut part = Part::default();
    let mut open = shared.open.clone();
    while !shared.stop.is_cancelled() {
        match shared.next_job() {
            Some(Job::Build(index, server_workers)) => {
                let took = index::build_one(&client, &index, server_workers).await?;
                shared.build_ended(&index.name);
                part.built.push((index.name, took));
            }
            Some(Job::Analyze) => {
                client.batch_execute(&shared.analyze_sql).await.map_err(PostCopyError::Analyze)?;
            }
            Some(Job::Verify) => {
                tokio::select! {
                    opened = open.wait_for(|o| *o) => if opened.is_err() { break },
                    _ = shared.stop.cancelled() => break,
                }
                let Some(verifier) = &shared.verifier else { break };
                let report = part.report.get_or_insert_with(Report::default);
                if !verifier.check_next(&client, report).await.map_err(PostCopyError::Verify)? {
                    break;
                }
            }
            None => break,
        }
    }
    Ok(part)
}
