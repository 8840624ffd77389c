//! `migrate --rehearse`: every phase up to the cut-over on the live table, as a real run
//! does them (same throttles and controls), then, in place of the swap, the cut-over's lock
//! taken once under `--lock-timeout` and released at once, and everything removed as
//! `abort` removes it. The table is never changed. What the run cost is measured on the
//! way ([`Meter`]) and reported ([`Report`]); the report is kept as the migration's
//! `rehearsal` event, so rehearsals can be compared with SQL.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use super::blockers::{self, Holder};
use super::engine::Outcome;
use super::error::{Context as _, MigrateError};
use super::run::Run;
use super::spec::Spec;
use crate::connect;
use crate::plan::Plan;
use crate::sql::QualifiedName;
use crate::state::{self, Phase};

/// How long the application's writes are counted before the capture is installed.
pub const BASELINE: Duration = Duration::from_secs(5);

/// What a rehearsal measures as it goes.
#[derive(Debug)]
pub struct Meter {
    started: Instant,
    lsn_start: String,
    phases: Vec<(Phase, Instant)>,
    /// Writes to the table per second before the capture, once counted.
    writes_before: Option<f64>,
    /// (when, the table's write counter) as the capture was installed.
    capture_at: Option<(Instant, i64)>,
    /// Change-log entries waiting as the catch-up phase began, and when.
    backlog: Option<(i64, Instant)>,
    max_replica_lag: Option<f64>,
    replicas: i64,
    plan: Option<PlanSaid>,
    resumed_from: Option<Phase>,
    /// Spent counting the application's writes: not part of what a real run takes.
    counting: Duration,
}

/// What `plan` said, beside what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSaid {
    pub strategy: String,
    pub estimated_rows: i64,
    pub disk_needed_bytes: i64,
    pub table_bytes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    pub phase: String,
    pub seconds: f64,
    /// For the phases that go through the rows (copy, index, verify): the rows copied, and
    /// the shadow's heap, over the phase's time.
    pub rows_per_second: Option<f64>,
    pub mb_per_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyRate {
    pub rows: i64,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// The shadow's heap as copied.
    pub bytes: i64,
    pub mb_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    /// Change-log entries waiting when the catch-up phase began (after the copy, the index
    /// builds and the verification).
    pub entries: i64,
    pub drain_seconds: f64,
    pub entries_per_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrialLock {
    pub granted: bool,
    pub lock_timeout_ms: f64,
    pub wait_ms: f64,
    /// The sessions holding the table when the lock was not granted.
    pub holders: Vec<Holder>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Writes {
    /// The application's writes to the table per second, over the seconds before the
    /// capture was installed (from `pg_stat_user_tables`).
    pub before_per_second: Option<f64>,
    /// The same while the capture was on.
    pub during_capture_per_second: Option<f64>,
}

/// What a rehearsal found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub migration_id: i64,
    pub table: String,
    pub statement: String,
    pub resumed_from: Option<String>,
    /// A sampled rehearsal copied, indexed and verified one round of chunks in this many;
    /// its copy, index and verify times are scaled up by it in the projection.
    pub sample_one_in: Option<u64>,
    /// The rehearsal's time, without the seconds it spent counting the application's writes.
    pub total_seconds: f64,
    /// The projected time of the real run: this one's (its sampled phases scaled to the
    /// whole table), plus the trial lock's wait.
    pub projected_seconds: f64,
    pub phases: Vec<PhaseTime>,
    pub copy: Option<CopyRate>,
    pub wal_bytes: f64,
    /// The shadow with its indexes and the change log, at their largest (the end).
    pub extra_disk_bytes: i64,
    pub backlog: Option<Backlog>,
    pub replicas: i64,
    pub max_replica_lag_seconds: Option<f64>,
    pub trial_lock: TrialLock,
    pub writes: Writes,
    pub plan: Option<PlanSaid>,
}

async fn writes(client: &Client, table: &QualifiedName) -> Result<i64, tokio_postgres::Error> {
    // A fresh view of the statistics, not this session's cached one.
    client.batch_execute("SELECT pg_catalog.pg_stat_clear_snapshot()").await?;
    let row = client
        .query_one(
            "SELECT coalesce((SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_catalog.pg_stat_user_tables
                               WHERE relid = $1::text::regclass), 0)",
            &[&table.sql()],
        )
        .await?;
    Ok(row.get(0))
}

impl Meter {
    pub async fn start(
        client: &Client,
        plan: Option<&Plan>,
        resumed_from: Option<Phase>,
    ) -> Result<Meter, tokio_postgres::Error> {
        let lsn: String = client.query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[]).await?.get(0);
        Ok(Meter {
            started: Instant::now(),
            lsn_start: lsn,
            phases: Vec::new(),
            writes_before: None,
            capture_at: None,
            backlog: None,
            max_replica_lag: None,
            replicas: 0,
            plan: plan.map(|p| PlanSaid {
                strategy: p.strategy.as_str().to_owned(),
                estimated_rows: p.estimated_rows,
                disk_needed_bytes: p.disk_needed_bytes,
                table_bytes: p.table_bytes,
            }),
            resumed_from,
            counting: Duration::ZERO,
        })
    }

    /// A phase began: its time, and the replicas' lag now.
    pub async fn entered(&mut self, client: &Client, phase: Phase) {
        self.phases.push((phase, Instant::now()));
        let lag = client
            .query_one(
                "SELECT count(*), max(extract(epoch FROM replay_lag))::float8 FROM pg_catalog.pg_stat_replication",
                &[],
            )
            .await;
        if let Ok(row) = lag {
            self.replicas = self.replicas.max(row.get(0));
            if let Some(l) = row.get::<_, Option<f64>>(1) {
                self.max_replica_lag = Some(self.max_replica_lag.map_or(l, |m| m.max(l)));
            }
        }
    }

    /// Counts the application's writes for `window`, then notes the counter as the capture
    /// goes on.
    pub async fn before_capture(
        &mut self,
        client: &Client,
        table: &QualifiedName,
        window: Duration,
    ) -> Result<(), tokio_postgres::Error> {
        let (t0, w0) = (Instant::now(), writes(client, table).await?);
        tokio::time::sleep(window).await;
        let w1 = writes(client, table).await?;
        self.writes_before = Some((w1 - w0) as f64 / t0.elapsed().as_secs_f64().max(1e-3));
        self.counting += t0.elapsed();
        self.capture_at = Some((Instant::now(), w1));
        Ok(())
    }

    /// The catch-up phase begins: how many changes wait.
    pub async fn catchup_begins(&mut self, client: &Client, spec: &Spec) -> Result<(), tokio_postgres::Error> {
        let n: i64 = client.query_one(&format!("SELECT count(*) FROM {}", spec.log_table().sql()), &[]).await?.get(0);
        self.backlog = Some((n, Instant::now()));
        Ok(())
    }

    fn phase_times(&self, end: Instant) -> Vec<PhaseTime> {
        let mut out: Vec<PhaseTime> = Vec::new();
        for (i, (phase, at)) in self.phases.iter().enumerate() {
            let next = self.phases.get(i + 1).map_or(end, |(_, t)| *t);
            let seconds = next.duration_since(*at).as_secs_f64();
            match out.last_mut() {
                // A phase entered again (catch-up between steps) adds to itself.
                Some(last) if last.phase == phase.as_str() => last.seconds += seconds,
                _ => out.push(PhaseTime {
                    phase: phase.as_str().to_owned(),
                    seconds,
                    rows_per_second: None,
                    mb_per_second: None,
                }),
            }
        }
        // The capture phase without the counting of writes before it.
        if let Some(capture) = out.iter_mut().find(|p| p.phase == Phase::Capture.as_str()) {
            capture.seconds = (capture.seconds - self.counting.as_secs_f64()).max(0.0);
        }
        out
    }
}

impl Run<'_> {
    /// In place of the cut-over: the lock once, the measurements, and no trace.
    pub(super) async fn rehearse(
        &mut self,
        spec: &Spec,
        mut meter: Meter,
        outcome: &Outcome,
    ) -> Result<Report, MigrateError> {
        let end = Instant::now();
        let (id, phase) = (self.id, self.phase);
        let sizes = self
            .control
            .query_one(
                "SELECT pg_catalog.pg_total_relation_size($1::text::regclass)
                        + pg_catalog.pg_total_relation_size($2::text::regclass),
                        pg_catalog.pg_relation_size($1::text::regclass),
                        pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), $3::text::pg_lsn)::float8",
                &[&spec.shadow().sql(), &spec.log_table().sql(), &meter.lsn_start],
            )
            .await
            .during(id, phase, "measuring the shadow and the WAL written")?;
        let (extra_disk, heap, wal): (i64, i64, f64) = (sizes.get(0), sizes.get(1), sizes.get(2));
        let during = match meter.capture_at {
            Some((at, w)) => {
                let now = writes(&self.control, &spec.original).await.during(id, phase, "counting the writes")?;
                Some((now - w) as f64 / at.elapsed().as_secs_f64().max(1e-3))
            }
            None => None,
        };
        let trial = self.trial_lock(spec).await?;
        meter.entered(&self.control, phase).await;
        let copy = (outcome.rows_this_run > 0 && !outcome.copy_time.is_zero()).then(|| {
            let seconds = outcome.copy_time.as_secs_f64();
            CopyRate {
                rows: outcome.rows_this_run,
                seconds,
                rows_per_second: outcome.rows_this_run as f64 / seconds,
                bytes: heap,
                mb_per_second: heap as f64 / 1e6 / seconds,
            }
        });
        let backlog = meter.backlog.map(|(entries, at)| {
            let drain = meter
                .phases
                .iter()
                .find(|(p, t)| *p == Phase::Cutover && *t >= at)
                .map_or(end, |(_, t)| *t)
                .duration_since(at)
                .as_secs_f64();
            Backlog {
                entries,
                drain_seconds: drain,
                entries_per_second: (entries > 0 && drain > 0.0).then(|| entries as f64 / drain),
            }
        });
        // Without the counting of the application's writes, which a real run does not do.
        let total = meter.started.elapsed().saturating_sub(meter.counting).as_secs_f64();
        let mut phases = meter.phase_times(end);
        for p in phases.iter_mut().filter(|p| matches!(p.phase.as_str(), "copy" | "index" | "verify")) {
            if p.seconds > 0.0 && outcome.rows_this_run > 0 {
                p.rows_per_second = Some(outcome.rows_this_run as f64 / p.seconds);
                p.mb_per_second = Some(heap as f64 / 1e6 / p.seconds);
            }
        }
        let scaled: f64 = phases
            .iter()
            .map(|p| match (self.sample_every, p.phase.as_str()) {
                (Some(k), "copy" | "index" | "verify") => p.seconds * k as f64,
                _ => p.seconds,
            })
            .sum();
        let report = Report {
            migration_id: id,
            table: self.table.to_string(),
            statement: String::new(),
            resumed_from: meter.resumed_from.map(|p| p.as_str().to_owned()),
            sample_one_in: self.sample_every,
            total_seconds: total,
            projected_seconds: scaled + trial.wait_ms / 1000.0,
            phases,
            copy,
            wal_bytes: wal,
            extra_disk_bytes: extra_disk,
            backlog,
            replicas: meter.replicas,
            max_replica_lag_seconds: meter.max_replica_lag,
            trial_lock: trial,
            writes: Writes { before_per_second: meter.writes_before, during_capture_per_second: during },
            plan: meter.plan.clone(),
        };
        let m = state::migration(&self.control, id).await.during(id, phase, "reading the migration")?;
        let report = Report { statement: m.as_ref().map(|m| m.statement.clone()).unwrap_or_default(), ..report };
        self.stop_stream().await;
        if let Some(m) = m {
            super::cleanup::abort(&self.control, &m, &self.retry)
                .await
                .map_err(|e| MigrateError::Refused(format!("removing the rehearsal: {e}")))?;
        }
        self.phase = Phase::Aborted;
        let details = serde_json::to_value(&report).unwrap_or_default();
        let message = format!("rehearsal done in {total:.1} s; everything removed");
        self.event("rehearsal", &message, Some(Duration::from_secs_f64(total)), Some(details)).await;
        state::set_phase(&self.control, id, Phase::Aborted, "rehearsed: shadow table, triggers and change log removed")
            .await
            .during(id, Phase::Aborted, "recording the rehearsal's end")?;
        Ok(report)
    }

    /// The cut-over's lock, once, under `--lock-timeout`, released at once.
    async fn trial_lock(&mut self, spec: &Spec) -> Result<TrialLock, MigrateError> {
        let (id, phase) = (self.id, self.phase);
        let session = connect::connect(&self.session()).await?;
        let timeout = self.opts.lock_timeout;
        let sql = format!(
            "BEGIN; SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            timeout.as_millis().max(1),
            spec.original.sql()
        );
        let t = Instant::now();
        let result = session.batch_execute(&sql).await;
        let wait = t.elapsed();
        let holders = match &result {
            Ok(()) => Vec::new(),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                blockers::long_holders(&self.control, &spec.original.sql(), Duration::ZERO).await.unwrap_or_default()
            }
            Err(_) => Vec::new(),
        };
        let _ = session.batch_execute("ROLLBACK").await;
        match result {
            Err(e) if e.code() != Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                return Err(e).during(id, phase, "taking the cut-over's lock once");
            }
            _ => {}
        }
        let trial = TrialLock {
            granted: result.is_ok(),
            lock_timeout_ms: timeout.as_secs_f64() * 1000.0,
            wait_ms: wait.as_secs_f64() * 1000.0,
            holders,
        };
        let message = if trial.granted {
            format!("the cut-over's lock was granted after {:.1} ms, and released", trial.wait_ms)
        } else {
            let who: Vec<String> = trial.holders.iter().map(Holder::describe).collect();
            format!(
                "the cut-over's lock was not granted within {:.0} ms; held by {}",
                trial.lock_timeout_ms,
                who.join(", ")
            )
        };
        self.reporter.note(&message);
        self.event("trial_lock", &message, Some(wait), serde_json::to_value(&trial).ok()).await;
        Ok(trial)
    }
}
