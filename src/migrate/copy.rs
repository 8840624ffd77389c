//! Phase `copy`: keyset chunks in key order, each its own short transaction.
//!
//! For each chunk: find its upper key, copy the key range `(last, upper]` into the shadow
//! through the column mapping, and move the checkpoint to `upper`, in one transaction: a
//! crash between chunks neither skips nor repeats one. Ranges are defined by keys, not
//! counts, so concurrent inserts and deletes cannot shift a chunk; a row written into a
//! range after it was copied is in the change log. The copy ends at the largest key seen
//! once capture is on (anything written later is captured). No snapshot outlives a chunk.
//!
//! Upper keys: the n-th key after the last (`OFFSET n-1`, an index-only walk); for a single
//! integer key, once a chunk has held rows, the last key plus a step sized from the rows per
//! key value seen so far (no walk). Not before: the only density known then comes from the
//! planner's row estimate, which can be far behind the table (analyzed at 100 rows, loaded
//! to 20,100 since, the first step took the whole table in one chunk). Either way the chunk
//! size adapts to a target time per chunk.
//!
//! With several jobs, chunks are copied in rounds: the next `jobs` consecutive ranges, each
//! on its own session at once. A round is recorded (`ghostwire.copy_round_<id>`) before its
//! chunks run; each chunk marks its range done in its own transaction; when all are done,
//! the checkpoint moves to the round's end and the record is cleared, in one transaction.
//! A run that died mid-round copies the ranges not marked done, and only those.

use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::spec::Spec;
use crate::sql::with_keys;

pub use crate::operate::ChunkSizer;

/// The statements of the copy, prepared once. Key parameters are text.
struct Statements {
    /// `$1` = n-1, then the copy's end, then the lower bound (when there is one): the
    /// chunk's upper key, when at least n rows remain before the end.
    upper_from_start: Statement,
    upper_after: Statement,
    /// Copies a range: the upper bound, then the lower bound (when there is one).
    copy_from_start: Statement,
    copy_after: Statement,
    /// Moves the checkpoint: `$1` migration id, `$2` checkpoint (text[]), `$3` rows copied.
    checkpoint: Statement,
    /// Marks a range of the current round done: `$1` its position, `$2` rows copied.
    mark_done: Statement,
    /// Clears the complete round and moves the checkpoint to `$2`, adding the round's rows
    /// (`$1` migration id).
    complete_round: Statement,
}

fn range_insert_sql(spec: &Spec, after: bool) -> String {
    let (targets, sources) = spec.copy_lists();
    let n = spec.key.len();
    let keys = spec.key_list();
    let mut filter = format!("({keys}) <= {}", spec.key_params(1, false));
    if after {
        filter.push_str(&format!(" AND ({keys}) > {}", spec.key_params(1 + n, false)));
    }
    format!(
        "INSERT INTO {shadow} ({targets}) {overriding}SELECT {sources} FROM ONLY {original} WHERE {filter}",
        shadow = spec.shadow().sql(),
        overriding = spec.overriding(),
        original = spec.original.sql(),
    )
}

impl Statements {
    async fn prepare(client: &Client, spec: &Spec) -> Result<Self, tokio_postgres::Error> {
        let round = round_table(spec.migration_id).sql();
        let original = spec.original.sql();
        let keys = spec.key_list();
        let key_text = spec.key_as_text("");
        let n = spec.key.len();
        let upper = |after: bool| {
            let mut filter = format!("({keys}) <= {}", spec.key_params(2, false));
            if after {
                filter.push_str(&format!(" AND ({keys}) > {}", spec.key_params(2 + n, false)));
            }
            format!("SELECT {key_text} FROM ONLY {original} WHERE {filter} ORDER BY {keys} OFFSET $1 LIMIT 1")
        };
        Ok(Statements {
            upper_from_start: client.prepare(&upper(false)).await?,
            upper_after: client.prepare(&upper(true)).await?,
            copy_from_start: client.prepare(&range_insert_sql(spec, false)).await?,
            copy_after: client.prepare(&range_insert_sql(spec, true)).await?,
            checkpoint: client
                .prepare(
                    "UPDATE ghostwire.migrations SET checkpoint = $2::text[], rows_copied = rows_copied + $3, updated_at = now()
                      WHERE id = $1",
                )
                .await?,
            mark_done: client.prepare(&format!("UPDATE {round} SET done = true, rows = $2 WHERE seq = $1")).await?,
            complete_round: client
                .prepare(&format!(
                    "WITH cleared AS (DELETE FROM {round} RETURNING rows)
                     UPDATE ghostwire.migrations
                        SET checkpoint = $2::text[], rows_copied = rows_copied + (SELECT coalesce(sum(rows), 0) FROM cleared),
                            updated_at = now()
                      WHERE id = $1"
                ))
                .await?,
        })
    }
}

/// Where a round of concurrent chunks is recorded until it is complete.
pub fn round_table(id: i64) -> crate::sql::QualifiedName {
    crate::sql::QualifiedName::new("ghostwire", format!("copy_round_{id}"))
}

/// Removes the round record of a migration (abort, and the end of the copy).
pub fn drop_round_sql(id: i64) -> String {
    format!("DROP TABLE IF EXISTS {}", round_table(id).sql())
}

/// One key range of a chunk: `(lower, upper]`, from the start when `lower` is None.
#[derive(Debug, Clone)]
struct Range {
    seq: i32,
    lower: Option<Vec<String>>,
    upper: Vec<String>,
    /// Already copied (a round recorded by a run that died).
    done: bool,
}

/// Copies one range and records it, in one transaction: the checkpoint itself when it is
/// a round of one, else the range's mark in the round record. Returns the rows copied.
async fn copy_range(
    client: &mut Client,
    s: &Statements,
    spec: &Spec,
    range: &Range,
    alone: bool,
) -> Result<(i64, Duration), tokio_postgres::Error> {
    let started = Instant::now();
    let tx = client.transaction().await?;
    let copied = match &range.lower {
        None => tx.execute(&s.copy_from_start, &with_keys(vec![], &[&range.upper])).await?,
        Some(lo) => tx.execute(&s.copy_after, &with_keys(vec![], &[&range.upper, lo])).await?,
    };
    let rows = copied as i64;
    crate::failpoint::hit("copy.in_chunk");
    if alone {
        tx.execute(&s.checkpoint, &[&spec.migration_id, &range.upper, &rows]).await?;
    } else {
        tx.execute(&s.mark_done, &[&range.seq, &rows]).await?;
    }
    tx.commit().await?;
    crate::failpoint::hit("copy.chunk");
    let took = started.elapsed();
    metrics::counter!("ghostwire_rows_copied_total").increment(rows as u64);
    metrics::histogram!("ghostwire_chunk_seconds").record(took.as_secs_f64());
    Ok((rows, took))
}

/// The table's largest key now, as text (None: empty).
pub async fn last_key(client: &Client, spec: &Spec) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let desc: Vec<String> = spec.key.iter().map(|k| format!("{} DESC", crate::sql::ident(&k.name))).collect();
    let sql = format!(
        "SELECT {} FROM ONLY {} ORDER BY {} LIMIT 1",
        spec.key_as_text(""),
        spec.original.sql(),
        desc.join(", ")
    );
    Ok(client.query_opt(&sql, &[]).await?.map(|r| r.get(0)))
}

/// What one chunk did.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub rows: i64,
    pub took: Duration,
    pub next_size: i64,
}

/// Steps through a single integer key by value.
#[derive(Debug, Clone)]
pub struct Stepper {
    min: i64,
    /// The last key to copy (the largest once capture was on).
    max: i64,
    /// Rows per key value: estimated at first, then measured.
    density: f64,
    span: i64,
    rows: i64,
}

impl Stepper {
    pub fn new(min: i64, max: i64, estimated_rows: i64) -> Stepper {
        let width = (max as f64 - min as f64 + 1.0).max(1.0);
        Stepper { min, max, density: (estimated_rows.max(1) as f64 / width).clamp(1e-9, 1.0), span: 0, rows: 0 }
    }

    /// The upper key of the next range of about `rows` rows after `lower` (exclusive; None:
    /// from the smallest key), or None when `lower` is already the last key.
    pub fn upper(&self, lower: Option<i64>, rows: i64) -> Option<i64> {
        let step = ((rows.max(1) as f64 / self.density).ceil() as i64).max(1);
        match lower {
            None => Some(self.min.saturating_add(step - 1).min(self.max)),
            Some(lo) if lo >= self.max => None,
            Some(lo) => Some(lo.saturating_add(step).min(self.max)),
        }
    }

    pub fn min_key(&self) -> i64 {
        self.min
    }

    /// Whether the density comes from rows copied (else only from the planner's estimate).
    pub fn measured(&self) -> bool {
        self.rows > 0
    }

    /// Learns the density from a range of `span` key values that held `rows` rows.
    pub fn observe(&mut self, span: i64, rows: i64) {
        self.span = self.span.saturating_add(span.max(1));
        self.rows += rows;
        if self.rows > 0 {
            self.density = (self.rows as f64 / self.span as f64).clamp(1e-9, 1.0);
        }
    }
}

/// The smallest and largest key of a single integer key column, if the table has rows.
pub async fn key_bounds(client: &Client, spec: &Spec) -> Result<Option<(i64, i64)>, tokio_postgres::Error> {
    let k = crate::sql::ident(&spec.key[0].name);
    let row = client
        .query_one(&format!("SELECT min({k})::int8, max({k})::int8 FROM ONLY {}", spec.original.sql()), &[])
        .await?;
    Ok(row.get::<_, Option<i64>>(0).zip(row.get::<_, Option<i64>>(1)))
}

/// The copy in progress: the engine asks for one chunk at a time, so that throttling,
/// live settings and catch-up can run in between.
pub struct Copier {
    statements: Statements,
    /// Further sessions for concurrent chunks (jobs - 1 of them), each with its statements.
    helpers: Vec<(Client, Statements)>,
    /// A round recorded by a run that died, to finish first.
    unfinished: Option<Vec<Range>>,
    pub sizer: ChunkSizer,
    stepper: Option<Stepper>,
    /// The last key copied.
    pub checkpoint: Option<Vec<String>>,
    /// The last key to copy: the largest once capture was on (fixed for the whole copy,
    /// resumes included; rows written beyond it are captured).
    pub end: Vec<String>,
    done: bool,
    pub total: i64,
    /// A sampled rehearsal: one round in this many is copied, the others skipped (the
    /// checkpoint moves past them).
    pub sample_every: Option<u64>,
    rounds: u64,
}

impl Copier {
    /// `end`: the copy's last key when resuming, else None (it is read now). `helpers`: the
    /// sessions for concurrent chunks besides `client` (empty: one chunk at a time). Returns
    /// None when there is nothing to copy.
    pub async fn start(
        client: &Client,
        spec: &Spec,
        checkpoint: Option<Vec<String>>,
        end: Option<Vec<String>>,
        sizer: ChunkSizer,
        estimated_rows: i64,
        helpers: Vec<Client>,
    ) -> Result<Option<Copier>, tokio_postgres::Error> {
        let Some(end) = (match end {
            Some(e) => Some(e),
            None => last_key(client, spec).await?,
        }) else {
            return Ok(None);
        };
        let stepper = match spec.integer_key() {
            true => {
                let k = crate::sql::ident(&spec.key[0].name);
                let min: Option<i64> = client
                    .query_one(&format!("SELECT min({k})::int8 FROM ONLY {}", spec.original.sql()), &[])
                    .await?
                    .get(0);
                let max = end[0].parse::<i64>().unwrap_or(i64::MAX);
                Some(Stepper::new(min.unwrap_or(max).min(max), max, estimated_rows))
            }
            false => None,
        };
        let round = round_table(spec.migration_id).sql();
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {round} (seq int PRIMARY KEY, lower text[], upper text[] NOT NULL,
                                                    rows bigint NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false)"
            ))
            .await?;
        let recorded = client.query(&format!("SELECT seq, lower, upper, done FROM {round} ORDER BY seq"), &[]).await?;
        let unfinished: Vec<Range> = recorded
            .iter()
            .map(|r| Range { seq: r.get(0), lower: r.get(1), upper: r.get(2), done: r.get(3) })
            .collect();
        let mut with_statements = Vec::new();
        for h in helpers {
            let st = Statements::prepare(&h, spec).await?;
            with_statements.push((h, st));
        }
        Ok(Some(Copier {
            statements: Statements::prepare(client, spec).await?,
            helpers: with_statements,
            unfinished: (!unfinished.is_empty()).then_some(unfinished),
            sizer,
            stepper,
            checkpoint,
            end,
            done: false,
            total: 0,
            sample_every: None,
            rounds: 0,
        }))
    }

    /// Whether the next call finishes a round an earlier run recorded (ranges above the
    /// checkpoint may be copied already).
    pub fn finishing_a_round(&self) -> bool {
        self.unfinished.is_some()
    }

    /// The upper key of the chunk after `lower` and whether it is the last chunk.
    async fn upper(
        &self,
        client: &Client,
        lower: Option<&Vec<String>>,
    ) -> Result<Option<(Vec<String>, bool)>, tokio_postgres::Error> {
        if let Some(st) = self.stepper.as_ref().filter(|st| st.measured()) {
            let lower = lower.map(|c| c[0].parse::<i64>().unwrap_or(i64::MAX));
            return Ok(st.upper(lower, self.sizer.rows).map(|u| (vec![u.to_string()], u >= st.max)));
        }
        let skip = self.sizer.rows - 1;
        let s = &self.statements;
        let upper = match lower {
            None => client.query_opt(&s.upper_from_start, &with_keys(vec![&skip], &[&self.end])).await?,
            Some(lo) => client.query_opt(&s.upper_after, &with_keys(vec![&skip], &[&self.end, lo])).await?,
        };
        Ok(Some(match upper {
            Some(row) => (row.get(0), false),
            None => (self.end.clone(), true), // fewer than n rows left: up to the end
        }))
    }

    /// The next round: up to one range per session, consecutive from the checkpoint.
    async fn plan_round(&self, client: &Client) -> Result<Vec<Range>, tokio_postgres::Error> {
        let mut ranges: Vec<Range> = Vec::new();
        let mut lower = self.checkpoint.clone();
        for seq in 0..=self.helpers.len() as i32 {
            let Some((upper, last)) = self.upper(client, lower.as_ref()).await? else { break };
            ranges.push(Range { seq, lower: lower.clone(), upper: upper.clone(), done: false });
            if last {
                break;
            }
            lower = Some(upper);
        }
        Ok(ranges)
    }

    /// Copies the next round of chunks; None when the copy is complete.
    pub async fn next(&mut self, client: &mut Client, spec: &Spec) -> Result<Option<Chunk>, tokio_postgres::Error> {
        if self.done {
            return Ok(None);
        }
        let started = Instant::now();
        // A round an earlier run recorded is finished first, through its record.
        let (round, recorded) = match self.unfinished.take() {
            Some(r) => (r, true),
            None => (self.plan_round(client).await?, false),
        };
        let Some(last) = round.last().cloned() else {
            self.done = true;
            return Ok(None);
        };
        let skipped = !recorded && self.sample_every.is_some_and(|k| self.rounds % k != 0);
        self.rounds += 1;
        if skipped {
            client.execute(&self.statements.checkpoint, &[&spec.migration_id, &last.upper, &0i64]).await?;
            self.done = last.upper == self.end;
            self.checkpoint = Some(last.upper);
            return Ok(Some(Chunk { rows: 0, took: started.elapsed(), next_size: self.sizer.rows }));
        }
        let alone = !recorded && round.len() == 1;
        let table = round_table(spec.migration_id).sql();
        if !alone && !recorded {
            // Recorded (one statement) before any of its chunks runs, so a crash leaves a
            // round to finish.
            let rows: Vec<String> =
                (0..round.len()).map(|i| format!("(${}, ${}, ${})", 3 * i + 1, 3 * i + 2, 3 * i + 3)).collect();
            let values: Vec<&(dyn ToSql + Sync)> =
                round.iter().flat_map(|r| [&r.seq as &(dyn ToSql + Sync), &r.lower as _, &r.upper as _]).collect();
            client
                .execute(&format!("INSERT INTO {table} (seq, lower, upper) VALUES {}", rows.join(", ")), &values)
                .await?;
        }
        let pending: Vec<&Range> = round.iter().filter(|r| !r.done).collect();
        let mut results = Vec::new();
        {
            // Each pending range on its own session, all at once.
            let mut sessions: Vec<(&mut Client, &Statements)> = vec![(&mut *client, &self.statements)];
            sessions.extend(self.helpers.iter_mut().map(|(c, s)| (c, &*s)));
            for batch in pending.chunks(sessions.len()) {
                let runs = batch.iter().zip(sessions.iter_mut()).map(|(r, (c, s))| copy_range(c, s, spec, r, alone));
                results.extend(futures_util::future::join_all(runs).await);
            }
        }
        let mut rows = 0;
        let mut slowest = Duration::ZERO;
        for (r, result) in pending.iter().zip(results) {
            let (n, took) = result?;
            rows += n;
            slowest = slowest.max(took);
            if let Some(st) = self.stepper.as_mut() {
                let lo = r.lower.as_ref().and_then(|c| c[0].parse::<i64>().ok()).unwrap_or(st.min_key() - 1);
                let hi = r.upper[0].parse::<i64>().unwrap_or(lo);
                st.observe(hi.saturating_sub(lo), n);
            }
        }
        if !alone {
            // The round is complete: the record is cleared and the checkpoint moves to its
            // end, in one statement.
            client.execute(&self.statements.complete_round, &[&spec.migration_id, &last.upper]).await?;
        }
        self.total += rows;
        // Every last range ends exactly at `end` (the stepper caps its steps there).
        self.done = last.upper == self.end;
        self.checkpoint = Some(last.upper);
        if pending.len() == round.len() {
            self.sizer.observe(rows / pending.len().max(1) as i64, slowest);
        }
        Ok(Some(Chunk { rows, took: started.elapsed(), next_size: self.sizer.rows }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_keys_step_by_value_to_the_last_key() {
        let mut st = Stepper::new(1, 1000, 500); // half the values used
        assert_eq!(st.upper(None, 100), Some(200));
        st.observe(200, 50); // sparser than estimated: a quarter
        assert_eq!(st.upper(Some(200), 100), Some(600));
        assert_eq!(st.upper(Some(990), 100), Some(1000));
        assert_eq!(st.upper(Some(1000), 100), None);
        let st = Stepper::new(i64::MAX - 5, i64::MAX, 6);
        assert_eq!(st.upper(Some(i64::MAX - 2), 10), Some(i64::MAX));
        assert_eq!(st.upper(None, 100), Some(i64::MAX));
    }

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
