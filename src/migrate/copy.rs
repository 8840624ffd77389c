//! Phase `copy`: keyset chunks in key order, each its own short transaction.
//!
//! One statement per chunk reads the next rows after the checkpoint (`WHERE key > $last
//! ORDER BY key LIMIT n`, an index range scan), inserts them into the shadow through the
//! column mapping, and moves the checkpoint in `ghostwire.migrations`, all atomically: a
//! crash between chunks neither skips nor repeats one. No snapshot outlives a chunk. The
//! chunk size adapts to a target time per chunk.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::spec::Spec;
use crate::sql::ident;

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

/// The copy statement: `$1` limit, `$2` migration id, then the checkpoint's key values.
pub fn chunk_sql(spec: &Spec, after_checkpoint: bool) -> String {
    let (targets, _) = spec.copy_lists();
    let copied: Vec<String> = spec
        .columns
        .iter()
        .filter_map(|c| c.source.as_deref())
        .enumerate()
        .map(|(i, src)| format!("({src}) AS gw_c{i}"))
        .collect();
    let aliases: Vec<String> = (0..copied.len()).map(|i| format!("gw_c{i}")).collect();
    let key_cols: Vec<String> =
        spec.key.iter().enumerate().map(|(i, k)| format!("{} AS gw_k{i}", ident(&k.name))).collect();
    let key_desc: Vec<String> = (0..spec.key.len()).map(|i| format!("gw_k{i} DESC")).collect();
    let filter = if after_checkpoint {
        format!("WHERE ({}) > {}", spec.key_list(), spec.key_params(3, false))
    } else {
        String::new()
    };
    format!(
        "WITH src AS (
             SELECT {copied}, {key_cols}, {key_text} AS gw_key
               FROM ONLY {original} {filter}
              ORDER BY {keys} LIMIT $1),
         ins AS (INSERT INTO {shadow} ({targets}) {overriding}SELECT {aliases} FROM src),
         last AS (SELECT gw_key FROM src ORDER BY {key_desc} LIMIT 1),
         upd AS (UPDATE ghostwire.migrations
                    SET checkpoint = (SELECT gw_key FROM last), rows_copied = rows_copied + (SELECT count(*) FROM src),
                        updated_at = now()
                  WHERE id = $2 AND EXISTS (SELECT 1 FROM src))
         SELECT count(*), (SELECT gw_key FROM last) FROM src",
        copied = copied.join(", "),
        key_cols = key_cols.join(", "),
        key_text = spec.key_as_text(""),
        original = spec.original.sql(),
        keys = spec.key_list(),
        shadow = spec.shadow().sql(),
        overriding = spec.overriding(),
        aliases = aliases.join(", "),
        key_desc = key_desc.join(", "),
    )
}

/// What one chunk did.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub rows: i64,
    pub took: Duration,
    pub next_size: i64,
}

/// Copies from `checkpoint` (None: from the start) to the end of the table. Calls
/// `on_chunk` after each chunk; returns the rows copied, or early when cancelled.
pub async fn run(
    client: &Client,
    spec: &Spec,
    mut checkpoint: Option<Vec<String>>,
    sizer: &mut ChunkSizer,
    cancel: &CancellationToken,
    mut on_chunk: impl FnMut(&Chunk),
) -> Result<i64, tokio_postgres::Error> {
    let first = client.prepare(&chunk_sql(spec, false)).await?;
    let next = client.prepare(&chunk_sql(spec, true)).await?;
    let id = spec.migration_id;
    let mut total = 0;
    while !cancel.is_cancelled() {
        let limit = sizer.rows;
        let started = Instant::now();
        let row = match &checkpoint {
            None => client.query_one(&first, &[&limit, &id]).await?,
            Some(key) => {
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&limit, &id];
                params.extend(key.iter().map(|k| k as &(dyn ToSql + Sync)));
                client.query_one(&next, &params).await?
            }
        };
        let took = started.elapsed();
        let rows: i64 = row.get(0);
        total += rows;
        metrics::counter!("ghostwire_rows_copied_total").increment(rows as u64);
        metrics::histogram!("ghostwire_chunk_seconds").record(took.as_secs_f64());
        if let Some(last) = row.get::<_, Option<Vec<String>>>(1) {
            checkpoint = Some(last);
        }
        sizer.observe(rows, took);
        on_chunk(&Chunk { rows, took, next_size: sizer.rows });
        if rows < limit {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_tracks_the_target_within_bounds() {
        let mut s = ChunkSizer::new(Duration::from_millis(200), 50_000);
        assert_eq!(s.rows, 1000);
        s.observe(1000, Duration::from_millis(20)); // 10x too fast: at most double
        assert_eq!(s.rows, 2000);
        s.observe(2000, Duration::from_millis(800)); // 4x too slow: at most halve
        assert_eq!(s.rows, 1000);
        s.observe(1000, Duration::from_millis(100));
        assert_eq!(s.rows, 2000);
        for _ in 0..20 {
            s.observe(s.rows, Duration::from_millis(1));
        }
        assert_eq!(s.rows, 50_000);
        s.observe(10, Duration::from_secs(10)); // a short tail chunk: ignored
        assert_eq!(s.rows, 50_000);
    }
}
