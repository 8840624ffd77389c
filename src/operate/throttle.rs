//! "May I go on?": the throttle signals (DESIGN.md §6).
//!
//! Copy and catch-up ask before each chunk or batch. Signals: a manual pause, replica replay
//! lag (`pg_stat_replication`), the change backlog, the WAL a logical capture's slot
//! retains, active client sessions, and a user SQL check. A signal that cannot be read while a limit needs it throttles (fails closed),
//! with the reason saying so. Critical limits abort the run instead (everything it made is removed).

use std::time::Instant;

use tokio_postgres::Client;

use super::live::Settings;

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Go,
    /// Wait; the reason, for the status and the events.
    Throttle(String),
    /// Abort the run.
    Critical(String),
}

/// The largest replay lag of any replica, in milliseconds, and which replica. A replica
/// that is not streaming, or whose physical slot has no one connected, counts as infinitely
/// behind.
async fn replica_lag(client: &Client) -> Result<Option<(f64, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT 'replica ' || coalesce(application_name, client_addr::text, pid::text),
                    CASE WHEN state <> 'streaming' OR replay_lsn IS NULL THEN 'Infinity'::float8
                         ELSE extract(epoch FROM coalesce(replay_lag, '0'::interval)) * 1000 END
               FROM pg_catalog.pg_stat_replication
             UNION ALL
             SELECT 'the replica of slot ' || slot_name, 'Infinity'::float8
               FROM pg_catalog.pg_replication_slots WHERE slot_type = 'physical' AND NOT active",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get::<_, f64>(1), r.get::<_, String>(0))).max_by(|a, b| a.0.total_cmp(&b.0)))
}

/// Client sessions running a statement right now, in the whole cluster, ghostwire's own
/// excepted.
async fn active_sessions(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity
              WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
                AND coalesce(application_name, '') NOT LIKE 'ghostwire%'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// What the signals said. A signal no limit needs is not read (`None`); one that could not
/// be read is `Err` with the reason to report.
#[derive(Debug, Clone, PartialEq)]
pub struct Signals {
    /// The worst replica's lag in ms and its name (`None` inside: no replica).
    pub replica_lag: Option<Result<Option<(f64, String)>, String>>,
    pub active: Option<Result<i64, String>>,
    pub backlog: Result<i64, String>,
    pub query: Option<Result<bool, String>>,
    pub paused: bool,
    /// Logical capture: the WAL the slot retains, in bytes (None: no slot, or no limit).
    pub slot_lag: Option<Result<i64, String>>,
}

/// Reads the signals the settings need.
pub async fn read(
    client: &Client,
    s: &Settings,
    backlog: Result<i64, String>,
    paused: bool,
    slot_lag: Option<Result<i64, String>>,
) -> Signals {
    let why = |what: &str, e: tokio_postgres::Error| format!("{what}: {}", crate::connect::describe(&e));
    let replica_lag = if s.critical_replica_lag_ms.is_some() || s.max_replica_lag_ms.is_some() {
        Some(replica_lag(client).await.map_err(|e| why("cannot read replica lag", e)))
    } else {
        None
    };
    let active = if s.critical_active.is_some() || s.max_active.is_some() {
        Some(active_sessions(client).await.map_err(|e| why("cannot count active sessions", e)))
    } else {
        None
    };
    let query = match &s.throttle_query {
        Some(sql) => Some(match client.query_one(sql.as_str(), &[]).await {
            Ok(row) => {
                row.try_get::<_, bool>(0).map_err(|_| "the throttle query must return one boolean column".to_owned())
            }
            Err(e) => Err(why("the throttle query failed", e)),
        }),
        None => None,
    };
    let slot_lag = slot_lag.filter(|_| s.max_slot_lag_bytes.is_some() || s.critical_slot_lag_bytes.is_some());
    Signals { replica_lag, active, backlog, query, paused, slot_lag }
}

fn over(value: f64, limit: Option<u64>) -> bool {
    limit.is_some_and(|l| value > l as f64)
}

fn lag_text(ms: f64) -> String {
    if ms.is_infinite() { "not connected or not streaming".into() } else { format!("{ms:.0} ms behind") }
}

/// Whether the run may go on: critical limits first, then the operator's pause, then the
/// limits. A signal a limit needs but that could not be read holds the run (fails closed).
pub fn judge(s: &Settings, x: &Signals) -> Verdict {
    match &x.replica_lag {
        Some(Ok(Some((lag, name)))) if over(*lag, s.critical_replica_lag_ms) => {
            let limit = s.critical_replica_lag_ms.unwrap_or(0);
            return Verdict::Critical(format!("{name} is {} (critical limit {limit} ms)", lag_text(*lag)));
        }
        Some(Ok(Some((lag, name)))) if over(*lag, s.max_replica_lag_ms) => {
            let limit = s.max_replica_lag_ms.unwrap_or(0);
            return Verdict::Throttle(format!("{name} is {} (limit {limit} ms)", lag_text(*lag)));
        }
        Some(Err(reason)) => return Verdict::Throttle(reason.clone()),
        _ => {}
    }
    match &x.active {
        Some(Ok(n)) if s.critical_active.is_some_and(|l| *n > l) => {
            return Verdict::Critical(format!(
                "{n} active sessions (critical limit {})",
                s.critical_active.unwrap_or(0)
            ));
        }
        Some(Ok(n)) if s.max_active.is_some_and(|l| *n > l) => {
            return Verdict::Throttle(format!("{n} active sessions (limit {})", s.max_active.unwrap_or(0)));
        }
        Some(Err(reason)) => return Verdict::Throttle(reason.clone()),
        _ => {}
    }
    match &x.slot_lag {
        Some(Ok(bytes)) if s.critical_slot_lag_bytes.is_some_and(|l| *bytes > l) => {
            let limit = crate::plan::report::bytes(s.critical_slot_lag_bytes.unwrap_or(0));
            return Verdict::Critical(format!(
                "the replication slot retains {} of WAL (critical limit {limit})",
                crate::plan::report::bytes(*bytes)
            ));
        }
        Some(Ok(bytes)) if s.max_slot_lag_bytes.is_some_and(|l| *bytes > l) => {
            let limit = crate::plan::report::bytes(s.max_slot_lag_bytes.unwrap_or(0));
            return Verdict::Throttle(format!(
                "the replication slot retains {} of WAL (limit {limit})",
                crate::plan::report::bytes(*bytes)
            ));
        }
        Some(Err(reason)) => return Verdict::Throttle(reason.clone()),
        _ => {}
    }
    match &x.backlog {
        Ok(backlog) => {
            if let Some(limit) = s.critical_backlog.filter(|l| backlog > l) {
                return Verdict::Critical(format!("{backlog} captured changes waiting (critical limit {limit})"));
            }
        }
        Err(reason) if s.critical_backlog.is_some() || s.max_backlog.is_some() => {
            return Verdict::Throttle(reason.clone());
        }
        Err(_) => {}
    }
    if x.paused {
        return Verdict::Throttle("paused by the operator".into());
    }
    if let (Ok(backlog), Some(limit)) = (&x.backlog, s.max_backlog)
        && *backlog > limit
    {
        return Verdict::Throttle(format!("{backlog} captured changes waiting (limit {limit})"));
    }
    match &x.query {
        Some(Ok(true)) => Verdict::Throttle("the throttle query returned true".into()),
        Some(Err(reason)) => Verdict::Throttle(reason.clone()),
        _ => Verdict::Go,
    }
}

/// Whether a throttle reason is about the change backlog (catch-up can help).
pub fn is_backlog(reason: &str) -> bool {
    reason.contains("captured changes waiting")
}

/// Why the run is held back, since when, and the time not yet added to the
/// `ghostwire_throttled_seconds_total` counter (which counts whole seconds).
pub struct Throttled {
    reason: String,
    since: Instant,
    accounted: Instant,
    carry: f64,
}

impl Throttled {
    /// Why.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How long it has been held back for this reason.
    pub fn since(&self) -> std::time::Duration {
        self.since.elapsed()
    }

    pub fn new(reason: String) -> Throttled {
        let now = Instant::now();
        Throttled { reason, since: now, accounted: now, carry: 0.0 }
    }

    /// Adds the time since the last call to the counter, keeping the fraction for later.
    pub fn account(&mut self) {
        let now = Instant::now();
        self.carry += now.duration_since(self.accounted).as_secs_f64();
        self.accounted = now;
        let whole = self.carry.floor();
        if whole >= 1.0 {
            metrics::counter!("ghostwire_throttled_seconds_total", "reason" => reason_kind(&self.reason))
                .increment(whole as u64);
            self.carry -= whole;
        }
    }
}

/// A short label for a throttle reason (the metric's `reason`).
fn reason_kind(reason: &str) -> &'static str {
    if reason.contains("replica") {
        "replica_lag"
    } else if reason.contains("active sessions") {
        "active_sessions"
    } else if is_backlog(reason) {
        "backlog"
    } else if reason.contains("throttle query") {
        "throttle_query"
    } else if reason.contains("paused") {
        "paused"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calm() -> Signals {
        Signals { replica_lag: None, active: None, backlog: Ok(0), query: None, paused: false, slot_lag: None }
    }

    fn throttled(v: Verdict) -> String {
        match v {
            Verdict::Throttle(r) => r,
            other => panic!("expected a throttle, got {other:?}"),
        }
    }

    #[test]
    fn nothing_over_a_limit_goes() {
        let s = Settings {
            max_backlog: Some(10),
            max_active: Some(5),
            max_replica_lag_ms: Some(100),
            ..Settings::default()
        };
        let x = Signals {
            replica_lag: Some(Ok(Some((99.0, "replica a".into())))),
            active: Some(Ok(5)),
            backlog: Ok(10),
            query: Some(Ok(false)),
            paused: false,
            slot_lag: Some(Ok(10)),
        };
        assert_eq!(judge(&s, &x), Verdict::Go);
        assert_eq!(judge(&Settings::default(), &Signals { replica_lag: Some(Ok(None)), ..calm() }), Verdict::Go);
    }

    #[test]
    fn a_slot_retaining_too_much_wal_throttles_then_aborts() {
        let s = Settings {
            max_slot_lag_bytes: Some(1 << 20),
            critical_slot_lag_bytes: Some(1 << 30),
            ..Settings::default()
        };
        let at = |bytes: i64| judge(&s, &Signals { slot_lag: Some(Ok(bytes)), ..calm() });
        assert_eq!(at(1 << 20), Verdict::Go);
        assert!(throttled(at(2 << 20)).contains("retains 2.0 MB of WAL (limit 1.0 MB)"), "{:?}", at(2 << 20));
        assert!(matches!(at(2 << 30), Verdict::Critical(r) if r.contains("critical limit")));
        // Unreadable: held back, never waved through.
        let unknown = judge(&s, &Signals { slot_lag: Some(Err("cannot read the slot".into())), ..calm() });
        assert_eq!(unknown, Verdict::Throttle("cannot read the slot".into()));
    }

    #[test]
    fn each_signal_over_its_limit_throttles_and_says_why() {
        let s = Settings {
            max_backlog: Some(10),
            max_active: Some(5),
            max_replica_lag_ms: Some(100),
            ..Settings::default()
        };
        let lag = Signals { replica_lag: Some(Ok(Some((250.0, "replica a".into())))), ..calm() };
        assert_eq!(throttled(judge(&s, &lag)), "replica a is 250 ms behind (limit 100 ms)");
        let gone = Signals { replica_lag: Some(Ok(Some((f64::INFINITY, "the replica of slot s1".into())))), ..calm() };
        assert!(throttled(judge(&s, &gone)).contains("slot s1 is not connected"));
        assert_eq!(throttled(judge(&s, &Signals { active: Some(Ok(6)), ..calm() })), "6 active sessions (limit 5)");
        assert_eq!(
            throttled(judge(&s, &Signals { backlog: Ok(11), ..calm() })),
            "11 captured changes waiting (limit 10)"
        );
        assert_eq!(
            throttled(judge(&s, &Signals { query: Some(Ok(true)), ..calm() })),
            "the throttle query returned true"
        );
        assert_eq!(throttled(judge(&s, &Signals { paused: true, ..calm() })), "paused by the operator");
    }

    #[test]
    fn a_signal_that_cannot_be_read_fails_closed() {
        let s = Settings { max_backlog: Some(10), ..Settings::default() };
        for x in [
            Signals { replica_lag: Some(Err("cannot read replica lag: x".into())), ..calm() },
            Signals { active: Some(Err("cannot count active sessions: x".into())), ..calm() },
            Signals { backlog: Err("cannot read the change backlog: x".into()), ..calm() },
            Signals { query: Some(Err("the throttle query failed: x".into())), ..calm() },
        ] {
            assert!(throttled(judge(&s, &x)).ends_with(": x"), "{x:?}");
        }
        // An unreadable backlog with no backlog limit holds nothing.
        let x = Signals { backlog: Err("cannot read the change backlog: x".into()), ..calm() };
        assert_eq!(judge(&Settings::default(), &x), Verdict::Go);
    }

    #[test]
    fn critical_limits_come_first_even_when_paused() {
        let s = Settings { critical_backlog: Some(100), critical_active: Some(50), ..Settings::default() };
        let x = Signals { backlog: Ok(101), paused: true, ..calm() };
        assert_eq!(judge(&s, &x), Verdict::Critical("101 captured changes waiting (critical limit 100)".into()));
        let x = Signals { active: Some(Ok(51)), paused: true, ..calm() };
        assert!(matches!(judge(&s, &x), Verdict::Critical(r) if r.contains("51 active sessions")));
        let s = Settings { critical_replica_lag_ms: Some(1000), max_replica_lag_ms: Some(10), ..Settings::default() };
        let x = Signals { replica_lag: Some(Ok(Some((1500.0, "replica b".into())))), ..calm() };
        assert!(matches!(judge(&s, &x), Verdict::Critical(r) if r.contains("replica b is 1500 ms behind")));
    }
}
