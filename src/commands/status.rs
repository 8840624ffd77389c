//! `ghostwire status [TABLE]`.

use serde_json::json;

use super::CommandError;
use crate::plan::report::thousands;
use crate::state::{self, Migration};
use crate::{connect, migrate};

async fn backlog(client: &tokio_postgres::Client, m: &Migration) -> Option<i64> {
    if !m.phase.before_swap() || m.phase < state::Phase::Capture {
        return None;
    }
    migrate::capture::backlog(client, m.id).await.ok()
}

/// The revert window of a swapped migration, if open: (reverse changes pending, bytes the
/// old table holds).
async fn window(client: &tokio_postgres::Client, m: &Migration) -> Option<(i64, i64)> {
    if m.phase != state::Phase::Swapped || migrate::version_schema::of(m).is_some() {
        return None;
    }
    let log = migrate::revert::capture::log_table(m.id).sql();
    let open: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&log]).await.ok()?.get(0);
    if !open {
        return None;
    }
    let pending = migrate::revert::apply::backlog(client, m.id).await.ok()?;
    let old = crate::sql::QualifiedName::new(migrate::spec::archive_schema(m.id), &m.table.name).sql();
    let bytes: i64 =
        client.query_one("SELECT coalesce(pg_total_relation_size(to_regclass($1)), 0)", &[&old]).await.ok()?.get(0);
    Some((pending, bytes))
}

/// The replication slot of a logical-capture migration, if it has one.
async fn slot(
    client: &tokio_postgres::Client,
    m: &Migration,
) -> Option<(crate::replication::slot::Names, crate::replication::slot::SlotState)> {
    if migrate::capture::Mode::of(m) != migrate::capture::Mode::Logical {
        return None;
    }
    let names = crate::replication::slot::Names::of(client, m.id).await.ok()?;
    let state = crate::replication::slot::state(client, &names).await.ok()??;
    Some((names, state))
}

fn slot_json(
    found: &Option<(crate::replication::slot::Names, crate::replication::slot::SlotState)>,
) -> serde_json::Value {
    match found {
        Some((names, s)) => json!({
            "name": names.slot, "publication": names.publication, "retained_wal_bytes": s.retained_bytes,
            "confirmed_flush_lsn": s.confirmed_flush, "wal_status": s.wal_status, "active_pid": s.active_pid,
            "confirmed_seconds_ago": s.reply_age_seconds,
        }),
        None => serde_json::Value::Null,
    }
}

/// The proxies `status --proxy` asks about their routes.
pub struct Proxies<'a> {
    pub urls: &'a [String],
    pub token: Option<&'a crate::connect::Secret>,
}

impl Proxies<'_> {
    /// One line per route of each proxy: its rule, search_path and sessions.
    async fn routes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for url in self.urls {
            let answer =
                crate::control::call(url, self.token, "GET", "/status", std::time::Duration::from_secs(5)).await;
            let status: Option<serde_json::Value> = match answer {
                Ok((200, body)) => serde_json::from_str(&body).ok(),
                Ok((code, body)) => {
                    out.push(format!("proxy {url}: {code} {body}"));
                    continue;
                }
                Err(e) => {
                    out.push(format!("proxy {url}: {e}"));
                    continue;
                }
            };
            let routes = status.as_ref().and_then(|s| s["routes"].as_array().cloned()).unwrap_or_default();
            if routes.is_empty() {
                out.push(format!("proxy {url}: no --route"));
            }
            for r in routes {
                out.push(format!(
                    "proxy {url}: route {} (search_path {}): {} session(s) now, {} routed since it started",
                    r["rule"].as_str().unwrap_or("?"),
                    r["search_path"].as_str().unwrap_or("?"),
                    r["sessions"],
                    r["routed_total"]
                ));
            }
        }
        out
    }
}

pub async fn run(
    url: Option<&str>,
    table: Option<&str>,
    json: bool,
    proxies: &Proxies<'_>,
) -> Result<(), CommandError> {
    let config = connect::params(url, "ghostwire status")?;
    let client = connect::connect(&config).await?;
    if !state::schema_exists(&client).await.map_err(CommandError::failed)? {
        if json {
            say!("[]");
        } else {
            say!("No ghostwire migration has run in this database.");
        }
        return Ok(());
    }
    let filter = match table {
        Some(t) => {
            let (schema, name) = crate::plan::parse::table_name(t).map_err(CommandError::refused)?;
            let schema = match schema {
                Some(s) => s,
                None => client
                    .query_one("SELECT coalesce((SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = to_regclass($1)), current_schema())", &[&crate::sql::ident(&name)])
                    .await
                    .map_err(CommandError::failed)?
                    .get(0),
            };
            Some(crate::sql::QualifiedName::new(schema.trim_matches('"'), name))
        }
        None => None,
    };
    let migrations = state::list(&client, filter.as_ref(), 5).await.map_err(CommandError::failed)?;
    if json {
        let mut out = Vec::new();
        for m in &migrations {
            let events = state::recent_events(&client, m.id, 10).await.map_err(CommandError::failed)?;
            let slot = slot_json(&slot(&client, m).await);
            let window = window(&client, m).await.map(|(p, b)| json!({"reverse_pending": p, "old_table_bytes": b}));
            out.push(json!({ "migration": m, "backlog": backlog(&client, m).await, "slot": slot,
                             "revert_window": window, "events": events }));
        }
        say!("{}", serde_json::to_string_pretty(&out).map_err(CommandError::failed)?);
        return Ok(());
    }
    if migrations.is_empty() {
        say!("No migrations{}.", filter.map(|f| format!(" of {f}")).unwrap_or_default());
        return Ok(());
    }
    for m in &migrations {
        let progress = if m.strategy == crate::backfill::STRATEGY {
            let at = m.checkpoint.as_ref().map(|c| format!(", up to the key {}", c.join(", "))).unwrap_or_default();
            format!(", backfill: {} row(s) changed{at}", thousands(m.rows_copied))
        } else if m.strategy == "copy" && (m.rows_estimated > 0 || m.rows_copied > 0) {
            let pct = if m.rows_estimated > 0 {
                (m.rows_copied as f64 * 100.0 / m.rows_estimated as f64).min(100.0)
            } else {
                100.0
            };
            format!(
                ", {} of ~{} rows copied ({pct:.0}%)",
                thousands(m.rows_copied),
                thousands(m.rows_estimated.max(m.rows_copied))
            )
        } else {
            String::new()
        };
        say!("#{} {}: phase {}{progress}", m.id, m.table, m.phase);
        say!("    {}", m.statement);
        say!(
            "    started {}, updated {}{}",
            m.started_at,
            m.updated_at,
            m.finished_at.as_ref().map(|f| format!(", done {f}")).unwrap_or_default()
        );
        if m.phase == state::Phase::Swapped
            && let Some(schema) = migrate::version_schema::of(m)
        {
            let shown = crate::sql::display_ident(&schema);
            say!(
                "    version schema {shown} open since {}: new code uses search_path={shown},{}; `ghostwire finish {}` \
                 applies the change (proxies' /status count each --route's sessions)",
                m.updated_at,
                crate::sql::display_ident(&m.table.schema),
                m.table
            );
            for line in proxies.routes().await {
                say!("    {line}");
            }
        }
        if let Some(b) = backlog(&client, m).await {
            say!("    change backlog: {b}");
        }
        if let Some((pending, bytes)) = window(&client, m).await {
            say!(
                "    revert window open since {}: {pending} reverse change(s) pending, the old table holds {}; \
                 `ghostwire revert {}` goes back, `ghostwire finish {}` closes it",
                m.updated_at,
                crate::plan::report::bytes(bytes),
                m.table,
                m.table
            );
        }
        if let Some((names, s)) = slot(&client, m).await {
            let who = match s.active_pid {
                Some(pid) => format!(
                    "streamed by pid {pid}{}",
                    s.reply_age_seconds.map(|a| format!(", last confirmed {a:.1} s ago")).unwrap_or_default()
                ),
                None if m.phase.before_swap() => {
                    format!(
                        "not streamed: `ghostwire resume {}` continues, `ghostwire abort {}` drops it",
                        m.table, m.table
                    )
                }
                None => format!("not streamed: `ghostwire finish {}` drops it", m.table),
            };
            say!(
                "    replication slot {}: retains {} of WAL, confirmed up to {}{}; {who}",
                names.slot,
                crate::plan::report::bytes(s.retained_bytes),
                s.confirmed_flush.as_deref().unwrap_or("nothing yet"),
                s.wal_status.as_deref().map(|w| format!(" (wal_status {w})")).unwrap_or_default(),
            );
        }
        if let Some(t) = m.throttled.as_deref().filter(|_| !m.phase.is_done()) {
            say!("    throttled: {t}");
        }
        if m.cutover_attempts > 0 {
            let times = match (m.lock_wait_ms, m.lock_hold_ms) {
                (Some(w), Some(h)) => format!("; lock waited {w:.1} ms, held {h:.1} ms"),
                _ => String::new(),
            };
            say!("    cut-over attempts: {}{times}", m.cutover_attempts);
        }
        if let Some(e) = &m.error {
            say!("    error: {e}");
        }
        if !m.phase.is_done() {
            let events = state::recent_events(&client, m.id, 5).await.map_err(CommandError::failed)?;
            for e in events {
                let took = e.duration_ms.map(|d| format!(" ({d:.0} ms)")).unwrap_or_default();
                say!("    {} [{}] {}: {}{took}", e.at, e.phase, e.kind, e.message);
            }
        }
    }
    Ok(())
}
