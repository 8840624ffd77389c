//! Whether streamed transactions are visible yet to other sessions.
//!
//! A transaction's commit record is flushed, and can be decoded and streamed, before its
//! backend leaves the process array (after a synchronous standby answers, when there is
//! one): in that moment the change is in the stream but a new snapshot does not see it.
//! Catch-up applies a logged key by reading the row as it is then, and the copy skips logged
//! keys it has yet to reach because it will read them; either would read the row without the
//! change, and the log entry that should bring it would be gone. So entries are logged only
//! once their transactions are visible: a snapshot taken now has them neither in progress
//! nor at or past its xmax (`pg_current_snapshot()`, one read of the process array).

use std::time::{Duration, Instant};

/// A snapshot as `pg_current_snapshot()::text` gives it: `xmin:xmax:xip,…`, 64-bit ids.
#[derive(Debug, PartialEq)]
pub(super) struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl Snapshot {
    pub(super) fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        parts.next().is_none().then_some(Snapshot { xmin, xmax, in_progress })
    }

    /// The 64-bit id of `xid`, a 32-bit id of a transaction that began within 2^31
    /// transactions of this snapshot's xmax (a transaction just streamed is far closer).
    fn widen(&self, xid: u32) -> u64 {
        const EPOCH: i64 = 1 << 32;
        let guess = (self.xmax as i64 & !(EPOCH - 1)) | xid as i64;
        let widened = if guess - self.xmax as i64 > EPOCH / 2 {
            guess - EPOCH
        } else if self.xmax as i64 - guess > EPOCH / 2 {
            guess + EPOCH
        } else {
            guess
        };
        widened.max(0) as u64
    }

    /// Whether transaction `xid` is over for this snapshot (a snapshot taken later sees it
    /// too).
    pub(super) fn sees(&self, xid: u32) -> bool {
        let x = self.widen(xid);
        x < self.xmin || (x < self.xmax && !self.in_progress.contains(&x))
    }
}

/// Waits until a new snapshot sees every transaction of `xids`, telling the server through
/// `repl` every `status_every` meanwhile that the stream is still at `confirmed` (so the
/// walsender's timeout does not end it). Gives up when `cancel` is cancelled (the stream
/// stops; what was not logged is streamed again next time).
pub(super) async fn wait(
    cancel: &tokio_util::sync::CancellationToken,
    log: &tokio_postgres::Client,
    repl: &mut crate::replication::ReplicationClient,
    confirmed: u64,
    xids: &[u32],
    status_every: Duration,
) -> Result<(), super::LogicalError> {
    let started = Instant::now();
    let mut last_status = Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut said = false;
    loop {
        let text: String = log.query_one("SELECT pg_catalog.pg_current_snapshot()::text", &[]).await?.get(0);
        let snapshot = Snapshot::parse(&text)
            .ok_or_else(|| super::LogicalError::Stream(format!("the server gave an unreadable snapshot: {text}")))?;
        let Some(&running) = xids.iter().find(|&&x| !snapshot.sees(x)) else { return Ok(()) };
        if !said && started.elapsed() > Duration::from_secs(5) {
            tracing::warn!(
                "transaction {running} is committed but not yet visible to other sessions (a synchronous standby not \
                 answering?); its changes are logged once it is"
            );
            said = true;
        }
        if last_status.elapsed() >= status_every {
            repl.send_status(confirmed, false).await?;
            last_status = Instant::now();
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(super::LogicalError::Stream("stopped".into())),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_what_ended_before_it() {
        let s = Snapshot::parse("100:110:102,105").unwrap();
        assert!(s.sees(99) && s.sees(101) && s.sees(109));
        assert!(!s.sees(102) && !s.sees(105), "in progress");
        assert!(!s.sees(110) && !s.sees(111), "at or past xmax: not yet visible");
        assert_eq!(Snapshot::parse("5:5:").unwrap(), Snapshot { xmin: 5, xmax: 5, in_progress: vec![] });
        for bad in ["", "1:2", "1:2:x", "1:2:3:4", "a:2:"] {
            assert!(Snapshot::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_32_bit_id_is_widened_across_an_epoch() {
        let epoch = 1u64 << 32;
        // xmax just past the wraparound; the transaction just before it.
        let s = Snapshot::parse(&format!("{}:{}:", epoch + 3, epoch + 5)).unwrap();
        assert_eq!(s.widen(u32::MAX), epoch - 1);
        assert!(s.sees(u32::MAX) && s.sees(4) && !s.sees(5) && !s.sees(6));
        // xmax just before it; a transaction past it is not visible.
        let s = Snapshot::parse(&format!("{}:{}:", epoch - 10, epoch - 2)).unwrap();
        assert_eq!(s.widen(1), epoch + 1);
        assert!(!s.sees(1) && s.sees(u32::MAX - 3) && !s.sees(u32::MAX - 1));
    }
}
