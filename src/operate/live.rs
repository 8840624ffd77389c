//! What a running migration shares with its operator: live settings (changed without a
//! restart), progress, pause, postponed cut-over, abort; and the HTTP control API over them
//! (`migrate --control ADDR`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::control::{self, Handler, Request, Response};

/// Settings that can change while the migration runs (`PUT /settings`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub chunk_time_ms: u64,
    pub chunk_rows: i64,
    /// Pause copy and catch-up while a replica replays further behind than this.
    pub max_replica_lag_ms: Option<u64>,
    /// … while more captured changes than this wait to be applied.
    pub max_backlog: Option<i64>,
    /// … while more client sessions than this are active.
    pub max_active: Option<i64>,
    /// … while this SQL returns true.
    pub throttle_query: Option<String>,
    /// Abort the run (removing everything it made) beyond these.
    pub critical_replica_lag_ms: Option<u64>,
    pub critical_backlog: Option<i64>,
    pub critical_active: Option<i64>,
    /// Logical capture: pause while the slot retains more WAL than this (bytes) …
    #[serde(default)]
    pub max_slot_lag_bytes: Option<i64>,
    /// … and abort the run beyond this.
    #[serde(default)]
    pub critical_slot_lag_bytes: Option<i64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            chunk_time_ms: 250,
            chunk_rows: 1_000_000,
            max_replica_lag_ms: None,
            max_backlog: None,
            max_active: None,
            throttle_query: None,
            critical_replica_lag_ms: None,
            critical_backlog: None,
            critical_active: None,
            max_slot_lag_bytes: None,
            critical_slot_lag_bytes: None,
        }
    }
}

impl Settings {
    /// Applies a JSON object of changes; a field set to null clears a limit.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<Settings, String> {
        let serde_json::Value::Object(changes) = patch else { return Err("expected a JSON object".into()) };
        let mut merged = serde_json::to_value(self).map_err(|e| e.to_string())?;
        for (k, v) in changes {
            if merged.get(k).is_none() {
                return Err(format!("unknown setting {k:?}"));
            }
            merged[k] = v.clone();
        }
        let s: Settings = serde_json::from_value(merged).map_err(|e| format!("invalid settings: {e}"))?;
        if s.chunk_time_ms == 0 || s.chunk_rows < 1 {
            return Err("chunk_time_ms and chunk_rows must be positive".into());
        }
        Ok(s)
    }

    pub fn chunk_time(&self) -> Duration {
        Duration::from_millis(self.chunk_time_ms)
    }
}

/// Progress, as `/status` and `ghostwire status --control` show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub migration_id: i64,
    pub table: String,
    pub phase: String,
    pub rows_copied: i64,
    pub rows_estimated: i64,
    pub rows_per_second: f64,
    /// A backfill: the rows its statement changed (`rows_copied` counts the keys walked).
    #[serde(default)]
    pub rows_changed: i64,
    pub eta_seconds: Option<f64>,
    pub backlog: i64,
    pub chunk_rows: i64,
    pub throttled: Option<String>,
    pub paused: bool,
    /// The cut-over is not allowed yet (`--postpone-cutover`).
    pub cutover_postponed: bool,
    /// Ready for the cut-over and waiting for it to be allowed, keeping the shadow in step.
    pub awaiting_cutover: bool,
    pub cutover_attempts: u32,
    /// Logical capture: WAL the slot retains, and seconds since the stream last confirmed.
    pub slot_retained_bytes: Option<i64>,
    pub slot_confirmed_ago_seconds: Option<f64>,
}

#[derive(Debug)]
pub struct Live {
    settings: Mutex<Settings>,
    progress: Mutex<Progress>,
    paused: AtomicBool,
    cutover_allowed: AtomicBool,
    abort: CancellationToken,
    revert: CancellationToken,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Live {
    pub fn new(settings: Settings, postpone_cutover: bool) -> Arc<Live> {
        Arc::new(Live {
            settings: Mutex::new(settings),
            progress: Mutex::new(Progress { cutover_postponed: postpone_cutover, ..Progress::default() }),
            paused: AtomicBool::new(false),
            cutover_allowed: AtomicBool::new(!postpone_cutover),
            abort: CancellationToken::new(),
            revert: CancellationToken::new(),
            changed: Notify::new(),
        })
    }

    pub fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    pub fn set_settings(&self, s: Settings) {
        *lock(&self.settings) = s;
        self.changed.notify_waiters();
    }

    pub fn progress(&self) -> Progress {
        let mut p = lock(&self.progress).clone();
        p.paused = self.paused();
        p.cutover_postponed = !self.cutover_allowed();
        p
    }

    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.progress));
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn cutover_allowed(&self) -> bool {
        self.cutover_allowed.load(Ordering::SeqCst)
    }

    pub fn allow_cutover(&self) {
        self.cutover_allowed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Asks the run to stop and remove everything it made.
    pub fn request_abort(&self) {
        self.abort.cancel();
        self.changed.notify_waiters();
    }

    pub fn abort_requested(&self) -> bool {
        self.abort.is_cancelled()
    }

    /// Asks for a revert once the swap is done (`--revert-window`).
    pub fn request_revert(&self) {
        self.revert.cancel();
        self.changed.notify_waiters();
    }

    /// Resolves once a revert is asked for.
    pub async fn revert_requested(&self) {
        self.revert.cancelled().await
    }

    /// Waits until a command or setting changes, or `timeout` passes.
    pub async fn wait_for_change(&self, timeout: Duration) {
        let changed = self.changed.notified();
        let _ = tokio::time::timeout(timeout, changed).await;
    }

    /// The handler of the live control API.
    pub fn control(self: &Arc<Self>) -> Handler {
        let live = Arc::clone(self);
        Arc::new(move |req: Request| {
            let live = Arc::clone(&live);
            Box::pin(async move { live.handle(req) })
        })
    }

    fn handle(&self, req: Request) -> Response {
        let ok = |what: &str| Response::json(200, &json!({ "ok": what, "status": self.progress() }));
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/status") => {
                Response::json(200, &json!({ "progress": self.progress(), "settings": self.settings() }))
            }
            ("POST", "/pause") => {
                self.set_paused(true);
                ok("paused")
            }
            ("POST", "/resume") => {
                self.set_paused(false);
                ok("resumed")
            }
            ("POST", "/cutover") => {
                self.allow_cutover();
                ok("cut-over allowed")
            }
            ("POST", "/abort") => {
                self.request_abort();
                ok("abort requested")
            }
            ("POST", "/revert") => {
                self.request_revert();
                ok("revert requested: it runs once the swap is done, while --revert-window is open")
            }
            ("PUT", "/settings") => {
                let patch: serde_json::Value = match serde_json::from_slice(&req.body) {
                    Ok(v) => v,
                    Err(e) => return Response::json(400, &json!({ "error": format!("invalid JSON: {e}") })),
                };
                match self.settings().patched(&patch) {
                    Ok(s) => {
                        self.set_settings(s.clone());
                        Response::json(200, &json!({ "settings": s }))
                    }
                    Err(e) => Response::json(400, &json!({ "error": e })),
                }
            }
            ("GET", "/metrics") => Response::text(200, control::metrics().render()),
            _ => Response::not_found(),
        }
    }
}

/// The throttle reasons, as the `reason` label of `ghostwire_throttled_seconds_total`.
pub const THROTTLE_REASONS: [&str; 6] =
    ["replica_lag", "active_sessions", "backlog", "throttle_query", "paused", "other"];

/// Describes the migration's metrics and creates every series at zero, so `/metrics` lists
/// them from the start (a counter that appears only when first used breaks `rate()`).
pub fn register_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("ghostwire_rows_copied_total", Unit::Count, "rows copied into the shadow table");
    describe_histogram!("ghostwire_chunk_seconds", Unit::Seconds, "time per copy chunk");
    describe_gauge!("ghostwire_backlog", Unit::Count, "captured changes waiting to be applied");
    describe_counter!("ghostwire_changes_applied_total", Unit::Count, "captured changes applied to the shadow");
    describe_counter!("ghostwire_throttled_seconds_total", Unit::Seconds, "time copy and catch-up waited, by reason");
    describe_counter!("ghostwire_cutover_attempts_total", Unit::Count, "cut-over attempts, by outcome");
    describe_histogram!("ghostwire_lock_wait_seconds", Unit::Seconds, "time waited for the table lock at cut-over");
    describe_histogram!("ghostwire_lock_hold_seconds", Unit::Seconds, "time the table lock was held at cut-over");
    describe_counter!("ghostwire_lock_retries_total", Unit::Count, "DDL retried after a lock timeout");
    metrics::counter!("ghostwire_rows_copied_total").increment(0);
    metrics::counter!("ghostwire_changes_applied_total").increment(0);
    metrics::counter!("ghostwire_lock_retries_total").increment(0);
    metrics::gauge!("ghostwire_backlog").increment(0.0);
    for reason in THROTTLE_REASONS {
        metrics::counter!("ghostwire_throttled_seconds_total", "reason" => reason).increment(0);
    }
    for outcome in ["swapped", "lock_timeout", "snapshot_hazard", "drain_failed"] {
        metrics::counter!("ghostwire_cutover_attempts_total", "outcome" => outcome).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_patch_validates() {
        let s = Settings::default();
        let p = s.patched(&json!({"chunk_rows": 50, "max_backlog": 1000})).unwrap();
        assert_eq!((p.chunk_rows, p.max_backlog), (50, Some(1000)));
        let cleared = p.patched(&json!({"max_backlog": null})).unwrap();
        assert_eq!(cleared.max_backlog, None);
        assert!(s.patched(&json!({"nope": 1})).unwrap_err().contains("unknown setting"));
        assert!(s.patched(&json!({"chunk_rows": 0})).is_err());
        assert!(s.patched(&json!({"chunk_rows": "many"})).is_err());
        assert!(s.patched(&json!([1])).is_err());
    }
}
