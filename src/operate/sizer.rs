//! How much to do in one go: the size of a copy chunk or a backfill batch, adapted to a
//! target time per transaction.

use std::time::Duration;

/// Chooses the next chunk's size from how long the last one took.
#[derive(Debug, Clone)]
pub struct ChunkSizer {
    pub target: Duration,
    pub rows: i64,
    pub max_rows: i64,
}

impl ChunkSizer {
    pub const MIN_ROWS: i64 = 100;

    pub fn new(target: Duration, max_rows: i64) -> Self {
        ChunkSizer { target, rows: 1000.min(max_rows).max(Self::MIN_ROWS.min(max_rows)), max_rows }
    }

    /// Scales toward the target, at most halving or doubling per step.
    pub fn observe(&mut self, rows_done: i64, took: Duration) {
        if rows_done < self.rows / 2 {
            return; // a short last chunk says little about the rate
        }
        let ratio = self.target.as_secs_f64() / took.as_secs_f64().max(1e-4);
        let next = (self.rows as f64 * ratio.clamp(0.5, 2.0)) as i64;
        self.rows = next.clamp(Self::MIN_ROWS.min(self.max_rows), self.max_rows);
    }
}
