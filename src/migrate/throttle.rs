//! "May I go on?": the throttle signals (DESIGN.md §6).
//!
//! Copy and catch-up ask before each chunk or batch. Signals: a manual pause, replica replay
//! lag (`pg_stat_replication`), the change backlog, active client sessions, and a user SQL
//! check. A signal that cannot be read while a limit needs it throttles (fails closed),
//! with the reason saying so. Critical limits abort the run instead (everything it made is removed).

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

/// The largest replay lag of any replica, in milliseconds, and which replica; a replica
/// that is not streaming counts as infinitely behind.
async fn replica_lag(client: &Client) -> Result<Option<(f64, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT coalesce(application_name, client_addr::text, pid::text),
                    CASE WHEN state <> 'streaming' OR replay_lsn IS NULL THEN 'Infinity'::float8
                         ELSE extract(epoch FROM coalesce(replay_lag, '0'::interval)) * 1000 END
               FROM pg_catalog.pg_stat_replication",
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

fn over(value: f64, limit: Option<u64>) -> bool {
    limit.is_some_and(|l| value > l as f64)
}

fn lag_text(ms: f64) -> String {
    if ms.is_infinite() { "not streaming".into() } else { format!("{ms:.0} ms behind") }
}

/// Reads the signals the settings need and says whether the run may go on.
pub async fn assess(client: &Client, s: &Settings, backlog: i64, paused: bool) -> Verdict {
    if s.critical_replica_lag_ms.is_some() || s.max_replica_lag_ms.is_some() {
        match replica_lag(client).await {
            Ok(Some((lag, name))) if over(lag, s.critical_replica_lag_ms) => {
                return Verdict::Critical(format!(
                    "replica {name} is {} (critical limit {} ms)",
                    lag_text(lag),
                    s.critical_replica_lag_ms.unwrap_or(0)
                ));
            }
            Ok(Some((lag, name))) if over(lag, s.max_replica_lag_ms) => {
                return Verdict::Throttle(format!(
                    "replica {name} is {} (limit {} ms)",
                    lag_text(lag),
                    s.max_replica_lag_ms.unwrap_or(0)
                ));
            }
            Ok(_) => {}
            Err(e) => return Verdict::Throttle(format!("cannot read replica lag: {}", crate::db::describe(&e))),
        }
    }
    if s.critical_active.is_some() || s.max_active.is_some() {
        match active_sessions(client).await {
            Ok(n) if s.critical_active.is_some_and(|l| n > l) => {
                return Verdict::Critical(format!(
                    "{n} active sessions (critical limit {})",
                    s.critical_active.unwrap_or(0)
                ));
            }
            Ok(n) if s.max_active.is_some_and(|l| n > l) => {
                return Verdict::Throttle(format!("{n} active sessions (limit {})", s.max_active.unwrap_or(0)));
            }
            Ok(_) => {}
            Err(e) => return Verdict::Throttle(format!("cannot count active sessions: {}", crate::db::describe(&e))),
        }
    }
    if let Some(limit) = s.critical_backlog.filter(|l| backlog > *l) {
        return Verdict::Critical(format!("{backlog} captured changes waiting (critical limit {limit})"));
    }
    if paused {
        return Verdict::Throttle("paused by the operator".into());
    }
    if let Some(limit) = s.max_backlog.filter(|l| backlog > *l) {
        return Verdict::Throttle(format!("{backlog} captured changes waiting (limit {limit})"));
    }
    if let Some(sql) = &s.throttle_query {
        match client.query_one(sql.as_str(), &[]).await.map(|r| r.try_get::<_, bool>(0)) {
            Ok(Ok(true)) => return Verdict::Throttle("the throttle query returned true".into()),
            Ok(Ok(false)) => {}
            Ok(Err(_)) => return Verdict::Throttle("the throttle query must return one boolean column".into()),
            Err(e) => return Verdict::Throttle(format!("the throttle query failed: {}", crate::db::describe(&e))),
        }
    }
    Verdict::Go
}

/// Whether a throttle reason is about the change backlog (catch-up can help).
pub fn is_backlog(reason: &str) -> bool {
    reason.contains("captured changes waiting")
}
