//! The proxies in front of the application (`--proxy`): drained around a swap, or around a
//! version schema's contract, and opened again. Draining one that fails reopens them all.

use std::time::{Duration, Instant};

use crate::connect::Secret;

pub struct Proxies<'a> {
    /// Their control APIs.
    pub urls: &'a [String],
    pub token: Option<&'a Secret>,
    /// How long a proxy may stay closed; it reopens by itself after it.
    pub drain_timeout: Duration,
}

impl Proxies<'_> {
    /// Drains every proxy; on any failure reopens them all. `Ok(None)` without proxies,
    /// else how long draining took.
    pub async fn drain(&self) -> Result<Option<Duration>, String> {
        if self.urls.is_empty() {
            return Ok(None);
        }
        let started = Instant::now();
        let path = format!("/drain?deadline_ms={}", self.drain_timeout.as_millis());
        let timeout = self.drain_timeout + Duration::from_secs(2);
        let calls = self.urls.iter().map(|p| crate::control::call(p, self.token, "POST", &path, timeout));
        let results = futures_util::future::join_all(calls).await;
        let failures: Vec<String> = self
            .urls
            .iter()
            .zip(results)
            .filter_map(|(p, r)| match r {
                Ok((200, _)) => None,
                Ok((status, body)) => Some(format!("{p}: {status} {body}")),
                Err(e) => Some(format!("{p}: {e}")),
            })
            .collect();
        if failures.is_empty() {
            Ok(Some(started.elapsed()))
        } else {
            self.open().await;
            Err(failures.join("; "))
        }
    }

    /// Opens every proxy (one that cannot be reached reopens by itself at its deadline).
    pub async fn open(&self) {
        let calls =
            self.urls.iter().map(|p| crate::control::call(p, self.token, "POST", "/open", Duration::from_secs(5)));
        for (p, r) in self.urls.iter().zip(futures_util::future::join_all(calls).await) {
            match r {
                Ok((200, _)) => {}
                Ok((status, body)) => tracing::warn!("opening proxy {p}: {status} {body}"),
                Err(e) => tracing::warn!("opening proxy {p}: {e}; it reopens by itself at its deadline"),
            }
        }
    }
}
