//! Short lock waits with jittered retries, for every statement that locks a live table.
//!
//! A waiting ACCESS EXCLUSIVE request blocks every later query on the table, so ghostwire
//! never waits long: each attempt runs under `lock_timeout`, and a lock timeout or deadlock
//! (recognised by SQLSTATE, not by message) is retried after a jittered, growing pause.

use std::time::Duration;

use rand::Rng;
use tokio_postgres::error::SqlState;

/// How to retry lock acquisition.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// `lock_timeout` for each attempt.
    pub lock_timeout: Duration,
    pub attempts: u32,
    /// The longest pause between attempts.
    pub max_pause: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { lock_timeout: Duration::from_millis(100), attempts: 30, max_pause: Duration::from_secs(5) }
    }
}

impl RetryPolicy {
    /// `SET LOCAL lock_timeout = '…ms'`.
    pub fn set_local(&self) -> String {
        format!("SET LOCAL lock_timeout = '{}ms'", self.lock_timeout.as_millis().max(1))
    }

    /// The pause before attempt `attempt` (1-based): doubling from the lock timeout, capped,
    /// then scaled by a random factor in [0.5, 1.5).
    pub fn pause(&self, attempt: u32) -> Duration {
        let base = self.lock_timeout.max(Duration::from_millis(10));
        let grown = base.saturating_mul(1u32 << attempt.min(16)).min(self.max_pause);
        grown.mul_f64(rand::rng().random_range(0.5..1.5))
    }
}

/// A lock timeout, a deadlock, or a serialization failure: worth another attempt.
pub fn is_lock_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::LOCK_NOT_AVAILABLE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// Runs `sql` (one or several statements) in one transaction; on failure the transaction
/// is rolled back, so the session is usable again.
pub async fn in_transaction(client: &tokio_postgres::Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    let result = client.batch_execute(&format!("BEGIN; {sql}; COMMIT;")).await;
    if result.is_err() {
        // A failed statement leaves the transaction block aborted: end it.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// Sleeps for `pause`, ending early when `client`'s connection is gone (a run aborted
/// from elsewhere, a server restart: the next statement would fail anyway).
pub async fn pause_unless_closed(client: &tokio_postgres::Client, pause: Duration) {
    let until = tokio::time::Instant::now() + pause;
    while !client.is_closed() {
        let now = tokio::time::Instant::now();
        if now >= until {
            return;
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
    }
}

/// How long a change waited for its lock (the failed attempts and the pauses between them)
/// and how long its transaction ran once it got it (at most: the transaction's time
/// includes the successful attempt's own wait, under the lock timeout).
#[derive(Debug, Clone, Copy)]
pub struct LockTimes {
    pub attempts: u32,
    pub waited: Duration,
    pub held: Duration,
}

/// Runs `attempt` inside `BEGIN` under the policy's `lock_timeout` until it commits, retrying
/// lock conflicts after jittered pauses; a failed attempt is rolled back.
pub async fn transaction<T, F, Fut>(
    client: &tokio_postgres::Client,
    policy: &RetryPolicy,
    what: &str,
    mut attempt: F,
) -> Result<(T, LockTimes), tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let started = std::time::Instant::now();
    let mut n = 1;
    loop {
        let t = std::time::Instant::now();
        let result = async {
            client.batch_execute(&format!("BEGIN; {}", policy.set_local())).await?;
            let value = attempt().await?;
            client.batch_execute("COMMIT").await?;
            Ok(value)
        }
        .await;
        match result {
            Ok(value) => return Ok((value, LockTimes { attempts: n, waited: t - started, held: t.elapsed() })),
            Err(e) => {
                // A failed statement leaves the transaction block aborted: end it.
                let _ = client.batch_execute("ROLLBACK").await;
                if !is_lock_conflict(&e) || n >= policy.attempts {
                    return Err(e);
                }
                let pause = policy.pause(n);
                tracing::info!("{what}: lock not granted (attempt {n} of {}), retrying in {pause:?}", policy.attempts);
                metrics::counter!("ghostwire_lock_retries_total").increment(1);
                pause_unless_closed(client, pause).await;
                n += 1;
            }
        }
    }
}

/// Runs `sql` (one or several statements) in its own transaction under the policy's
/// `lock_timeout`, with retries.
pub async fn ddl(
    client: &tokio_postgres::Client,
    policy: &RetryPolicy,
    what: &str,
    sql: &str,
) -> Result<(), tokio_postgres::Error> {
    transaction(client, policy, what, || client.batch_execute(sql)).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_with_jitter_and_a_cap() {
        let p =
            RetryPolicy { lock_timeout: Duration::from_millis(100), attempts: 5, max_pause: Duration::from_secs(2) };
        for attempt in 1..20 {
            let pause = p.pause(attempt);
            let nominal = Duration::from_millis(100).saturating_mul(1 << attempt.min(16)).min(Duration::from_secs(2));
            assert!(pause >= nominal.mul_f64(0.5) && pause < nominal.mul_f64(1.5), "{attempt}: {pause:?}");
        }
        assert_eq!(p.set_local(), "SET LOCAL lock_timeout = '100ms'");
    }
}
