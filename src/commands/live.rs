//! `ghostwire status|pause|resume|cutover|abort --control ADDR`: commands to a running
//! migration through its control API.

use std::time::Duration;

use bytes::Bytes;

use super::CommandError;
use crate::connect::Secret;
use crate::control;
use crate::migrate::{Progress, Settings};
use crate::plan::report::thousands;

/// A running migration's control API, and the token it wants.
#[derive(Debug, Clone, Copy)]
pub struct Remote<'a> {
    pub addr: &'a str,
    pub token: Option<&'a Secret>,
}

async fn call(remote: Remote<'_>, method: &str, path: &str) -> Result<serde_json::Value, CommandError> {
    send(remote, method, path, Bytes::new()).await
}

async fn send(remote: Remote<'_>, method: &str, path: &str, body: Bytes) -> Result<serde_json::Value, CommandError> {
    let addr = remote.addr;
    let (status, body) = control::send(addr, remote.token, method, path, body, Duration::from_secs(10))
        .await
        .map_err(CommandError::failed)?;
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    if status != 200 {
        return Err(CommandError::failed(format!("{addr} answered {status}: {value}")));
    }
    Ok(value)
}

/// Sends `POST path` and prints what the migration says.
pub async fn command(remote: Remote<'_>, path: &str) -> Result<(), CommandError> {
    let v = call(remote, "POST", path).await?;
    say!("{}", v["ok"].as_str().unwrap_or("done"));
    Ok(())
}

pub async fn status(remote: Remote<'_>, json: bool) -> Result<(), CommandError> {
    let addr = remote.addr;
    let v = call(remote, "GET", "/status").await?;
    if json {
        say!("{}", serde_json::to_string_pretty(&v).map_err(CommandError::failed)?);
        return Ok(());
    }
    let p: Progress = serde_json::from_value(v["progress"].clone()).map_err(CommandError::failed)?;
    let s: Settings = serde_json::from_value(v["settings"].clone()).map_err(CommandError::failed)?;
    say!("#{} {}: phase {}", p.migration_id, p.table, p.phase);
    let eta = p.eta_seconds.map(|e| format!(", about {e:.0} s left")).unwrap_or_default();
    say!(
        "    {} of ~{} rows copied, {} rows/s{eta}; chunk {} rows",
        thousands(p.rows_copied),
        thousands(p.rows_estimated.max(p.rows_copied)),
        thousands(p.rows_per_second as i64),
        thousands(p.chunk_rows)
    );
    say!("    change backlog: {}; cut-over attempts: {}", thousands(p.backlog), p.cutover_attempts);
    match (&p.throttled, p.paused) {
        (Some(r), _) => say!("    throttled: {r}"),
        (None, true) => say!("    paused"),
        (None, false) => say!("    not throttled"),
    }
    if p.awaiting_cutover {
        say!(
            "    ready for the cut-over, keeping the shadow in step; allow it with `ghostwire cutover --control {addr}`"
        );
    } else if p.cutover_postponed {
        say!("    cut-over postponed (allow it with `ghostwire cutover --control {addr}`)");
    }
    say!("    settings: {}", serde_json::to_string(&s).map_err(CommandError::failed)?);
    Ok(())
}

/// `NAME=VALUE` pairs as a JSON patch: VALUE is JSON when it parses, else a string.
fn patch(changes: &[String]) -> Result<serde_json::Value, CommandError> {
    let mut patch = serde_json::Map::new();
    for change in changes {
        let Some((name, value)) = change.split_once('=') else {
            return Err(CommandError::refused(format!(
                "expected NAME=VALUE, got {change:?} (example: chunk_rows=5000)"
            )));
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
        patch.insert(name.trim().to_owned(), value);
    }
    Ok(serde_json::Value::Object(patch))
}

/// `ghostwire settings --control ADDR [NAME=VALUE…]`: changes, then prints, the settings.
pub async fn settings(remote: Remote<'_>, changes: &[String]) -> Result<(), CommandError> {
    let v = if changes.is_empty() {
        call(remote, "GET", "/status").await?
    } else {
        let body = serde_json::to_vec(&patch(changes)?).map_err(CommandError::failed)?;
        send(remote, "PUT", "/settings", Bytes::from(body)).await?
    };
    say!("{}", serde_json::to_string_pretty(&v["settings"]).map_err(CommandError::failed)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_value_pairs_become_a_json_patch() {
        let p =
            patch(&["chunk_rows=500".into(), "max_backlog=null".into(), "throttle_query=SELECT true".into()]).unwrap();
        assert_eq!(p, serde_json::json!({"chunk_rows": 500, "max_backlog": null, "throttle_query": "SELECT true"}));
        assert!(patch(&["chunk_rows".into()]).is_err());
    }
}
