//! Crash points for tests: `GHOSTWIRE_FAILPOINT=name` (or `name:n`, the n-th time it is
//! reached) makes the process kill itself with SIGKILL there, as a crash would. Unset, a
//! failpoint costs one branch on a cached value.
//!
//! Points: `copy.chunk` (after a chunk committed), `copy.in_chunk` (between a chunk's rows
//! and its checkpoint, inside its transaction), `index.built` (after one index),
//! `catchup.batch`, `verify.range`, `cutover.locked` (inside the swap transaction, lock
//! held), `cutover.before_commit`, `cutover.committed`; logical capture: `logical.received`
//! (a change received, its log row not written), `logical.logged` (log rows committed, not
//! yet confirmed to the server), `logical.fence` (a fence reached, its caller not yet told),
//! `cutover.fenced` (under the swap's lock, the fence reached, the last changes not applied);
//! revert: `revert.batch` (after a catch-up batch committed), `revert.locked` (the swap
//! back's lock held, the last changes applied), `revert.before_commit`, `revert.committed`;
//! backfill: `backfill.batch` (a batch's rows changed, its checkpoint not yet written, inside
//! its transaction), `backfill.committed` (after a batch and its checkpoint committed).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Target {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let spec = std::env::var("GHOSTWIRE_FAILPOINT").ok()?;
            let (name, nth) = match spec.rsplit_once(':') {
                Some((n, k)) if k.parse::<u64>().is_ok() => (n.to_owned(), k.parse().unwrap_or(1)),
                _ => (spec, 1),
            };
            Some(Target { name, nth: nth.max(1), seen: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Kills the process here if `GHOSTWIRE_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if let Some(t) = target()
        && t.name == name
        && t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.nth
    {
        tracing::warn!("failpoint {name}: killing the process");
        // SAFETY: raising a signal on our own process has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}
