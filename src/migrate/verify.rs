//! Phase `verify`: compare the original and the shadow, range by range.
//!
//! The key space is cut into ranges at every n-th key of the original (one pass over the key
//! index). For each range, in one short REPEATABLE READ transaction: the count and an
//! order-independent hash (sum of 64-bit hashes) of every mapped row, on both sides. When
//! they differ, the differing keys are listed; each must have a pending change-log entry in
//! the same snapshot (a write not yet caught up). Any other difference is a defect.
//!
//! Columns that cannot be compared are left out: new columns (their defaults may be
//! volatile), stored generated columns, and columns converted with a volatile USING. When a
//! key conversion does not keep the key order, shadow rows are matched by key instead of by
//! range, and extra rows in the shadow are not detected.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config};
use tokio_util::sync::CancellationToken;

use super::spec::Spec;
use crate::sql::ident;

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub ranges: usize,
    pub rows: i64,
    /// Rows that differ with a pending change (expected while writes go on).
    pub pending: usize,
    /// Keys (in the shadow's form) that differ without a pending change.
    pub unexplained: Vec<Vec<String>>,
    /// Matched by key rather than by range (extra shadow rows not detected).
    pub matched_by_key: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Connect(#[from] crate::db::ConnectError),
    #[error("{}", crate::db::describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("a verification task failed: {0}")]
    Worker(String),
}

type Bound = Option<Vec<String>>;

/// SQL fragments shared by every range check.
struct Queries {
    /// `(count, hash)` of the original within `$1..` (lower, exclusive) and upper (inclusive).
    original_agg: [String; 4],
    shadow_agg: [String; 4],
    /// Differing keys, each with whether a change is pending for it.
    diff: [String; 4],
    to_shadow_bound: String,
}

/// `keys > lower AND keys <= upper`, with parameters numbered from `first`.
fn range_filter(
    keys: &str,
    params: impl Fn(usize) -> String,
    first: usize,
    has_lo: bool,
    has_hi: bool,
    n: usize,
) -> String {
    let mut parts = Vec::new();
    if has_lo {
        parts.push(format!("({keys}) > {}", params(first)));
    }
    if has_hi {
        parts.push(format!("({keys}) <= {}", params(if has_lo { first + n } else { first })));
    }
    if parts.is_empty() { "true".into() } else { parts.join(" AND ") }
}

fn queries(spec: &Spec) -> Queries {
    let n = spec.key.len();
    let compared: Vec<_> = spec.columns.iter().filter(|c| c.compare).collect();
    let orig_row: Vec<String> = compared
        .iter()
        .map(|c| format!("CAST(({}) AS {})", c.source.as_deref().unwrap_or("NULL"), c.shadow_type_sql))
        .collect();
    let shadow_row: Vec<String> = compared.iter().map(|c| ident(&c.shadow)).collect();
    let orig_hash = format!("hashtextextended(ROW({})::text, 0)", orig_row.join(", "));
    let shadow_hash = format!("hashtextextended(ROW({})::text, 0)", shadow_row.join(", "));
    let orig_key_text = format!(
        "ARRAY[{}]",
        spec.key.iter().map(|k| format!("({})::text", k.to_shadow)).collect::<Vec<_>>().join(", ")
    );
    let shadow_key_text = format!(
        "ARRAY[{}]",
        spec.key.iter().map(|k| format!("{}::text", ident(&k.shadow_name))).collect::<Vec<_>>().join(", ")
    );
    let original = spec.original.sql();
    let shadow = spec.shadow().sql();
    let by_range = spec.key_order_preserved();
    let variants = [(false, false), (true, false), (false, true), (true, true)];
    let make = |f: &dyn Fn(bool, bool) -> String| -> [String; 4] { variants.map(|(lo, hi)| f(lo, hi)) };
    let orig_filter = |lo, hi| range_filter(&spec.key_list(), |i| spec.key_params(i, false), 1, lo, hi, n);
    // The shadow's bounds follow the original's in the diff query, by range; matched by key,
    // the shadow reuses the original's.
    let shadow_filter = |lo: bool, hi: bool, first: usize| {
        if by_range {
            range_filter(&spec.shadow_key_list(), |i| spec.key_params(i, true), first, lo, hi, n)
        } else {
            format!("{shadow_key_text} IN (SELECT {orig_key_text} FROM ONLY {original} WHERE {})", orig_filter(lo, hi))
        }
    };
    let log = spec.log_table().sql();
    let alias = ident(&spec.original.name);
    Queries {
        original_agg: make(&|lo, hi| {
            format!(
                "SELECT count(*), coalesce(sum({orig_hash}::numeric), 0)::text FROM ONLY {original} WHERE {}",
                orig_filter(lo, hi)
            )
        }),
        shadow_agg: make(&|lo, hi| {
            format!(
                "SELECT count(*), coalesce(sum({shadow_hash}::numeric), 0)::text FROM {shadow} WHERE {}",
                shadow_filter(lo, hi, 1)
            )
        }),
        diff: make(&|lo, hi| {
            let after = 1 + n * (usize::from(lo) + usize::from(hi));
            format!(
                "SELECT d.k, EXISTS (SELECT 1 FROM {log} AS {alias} WHERE ghostwire_truncated OR {orig_key_text} = d.k)
                   FROM (SELECT coalesce(o.k, s.k) AS k
                           FROM (SELECT {orig_key_text} AS k, {orig_hash} AS h FROM ONLY {original} WHERE {}) o
                           FULL JOIN (SELECT {shadow_key_text} AS k, {shadow_hash} AS h FROM {shadow} WHERE {}) s ON o.k = s.k
                          WHERE o.h IS DISTINCT FROM s.h) d",
                orig_filter(lo, hi),
                shadow_filter(lo, hi, after)
            )
        }),
        to_shadow_bound: format!(
            "SELECT {orig_key_text} FROM (SELECT {}) AS {}",
            spec.key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("${}::text::{} AS {}", i + 1, k.type_sql, ident(&k.name)))
                .collect::<Vec<_>>()
                .join(", "),
            ident(&spec.original.name)
        ),
    }
}

/// Range boundaries: every `every`-th key of the original, in key order.
async fn boundaries(client: &Client, spec: &Spec, every: i64) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT k FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS rn FROM ONLY {}) x(k, rn) WHERE rn % $1 = 0 ORDER BY rn",
        spec.key_as_text(""),
        spec.key_list(),
        spec.original.sql()
    );
    Ok(client.query(&sql, &[&every]).await?.iter().map(|r| r.get(0)).collect())
}

struct RangeResult {
    rows: i64,
    pending: usize,
    unexplained: Vec<Vec<String>>,
}

fn as_params<'a>(values: &[&'a String]) -> Vec<&'a (dyn ToSql + Sync)> {
    values.iter().map(|s| *s as &(dyn ToSql + Sync)).collect()
}

async fn check_range(
    client: &Client,
    spec: &Spec,
    q: &Queries,
    lo: &Bound,
    hi: &Bound,
) -> Result<RangeResult, tokio_postgres::Error> {
    let variant = usize::from(lo.is_some()) + 2 * usize::from(hi.is_some());
    let orig_params: Vec<&String> = lo.iter().chain(hi.iter()).flatten().collect();
    // The shadow's bounds: the same keys converted, when the conversion is not the identity.
    let mut shadow_bounds = Vec::new();
    for b in [lo, hi].into_iter().flatten() {
        let identity = spec.key.iter().all(|k| k.to_shadow == ident(&k.name));
        if identity || !spec.key_order_preserved() {
            shadow_bounds.extend(b.iter().cloned());
        } else {
            let params: Vec<&(dyn ToSql + Sync)> = b.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            let converted: Vec<String> = client.query_one(&q.to_shadow_bound, &params).await?.get(0);
            shadow_bounds.extend(converted);
        }
    }
    let shadow_params: Vec<&String> =
        if spec.key_order_preserved() { shadow_bounds.iter().collect() } else { orig_params.clone() };
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
    let result = async {
        let o = client.query_one(&q.original_agg[variant], &as_params(&orig_params)).await?;
        let s = client.query_one(&q.shadow_agg[variant], &as_params(&shadow_params)).await?;
        let rows: i64 = o.get(0);
        if o.get::<_, i64>(0) == s.get::<_, i64>(0) && o.get::<_, String>(1) == s.get::<_, String>(1) {
            return Ok(RangeResult { rows, pending: 0, unexplained: Vec::new() });
        }
        let mut diff_params = orig_params.clone();
        if spec.key_order_preserved() {
            diff_params.extend(shadow_params.iter());
        }
        let diffs = client.query(&q.diff[variant], &as_params(&diff_params)).await?;
        let pending = diffs.iter().filter(|r| r.get::<_, bool>(1)).count();
        let unexplained = diffs.iter().filter(|r| !r.get::<_, bool>(1)).map(|r| r.get(0)).collect();
        Ok(RangeResult { rows, pending, unexplained })
    }
    .await;
    client.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" }).await?;
    result
}

/// Verifies the whole table with `parallel` workers, `range_rows` rows per range.
pub async fn run(
    config: &Config,
    spec: &Spec,
    range_rows: i64,
    parallel: usize,
    cancel: &CancellationToken,
) -> Result<Report, VerifyError> {
    let first = crate::db::connect(config).await?;
    let cuts = boundaries(&first, spec, range_rows.max(1)).await?;
    let mut ranges: VecDeque<(Bound, Bound)> = VecDeque::new();
    let mut lo: Bound = None;
    for cut in cuts {
        ranges.push_back((lo.clone(), Some(cut.clone())));
        lo = Some(cut);
    }
    ranges.push_back((lo, None));
    let count = ranges.len();
    let queue = Arc::new(Mutex::new(ranges));
    let spec = Arc::new(spec.clone());
    let q = Arc::new(queries(&spec));
    let mut workers = Vec::new();
    let mut first = Some(first);
    for _ in 0..parallel.clamp(1, count) {
        let client = match first.take() {
            Some(c) => c,
            None => crate::db::connect(config).await?,
        };
        let (queue, spec, q, cancel) = (Arc::clone(&queue), Arc::clone(&spec), Arc::clone(&q), cancel.clone());
        workers.push(tokio::spawn(async move {
            let mut report = Report::default();
            loop {
                let next = queue.lock().map(|mut q| q.pop_front()).unwrap_or(None);
                let Some((lo, hi)) = next else { break };
                if cancel.is_cancelled() {
                    break;
                }
                let r = check_range(&client, &spec, &q, &lo, &hi).await?;
                report.ranges += 1;
                report.rows += r.rows;
                report.pending += r.pending;
                report.unexplained.extend(r.unexplained);
            }
            Ok::<_, tokio_postgres::Error>(report)
        }));
    }
    let mut total = Report { matched_by_key: !spec.key_order_preserved(), ..Report::default() };
    for w in workers {
        let r = w.await.map_err(|e| VerifyError::Worker(e.to_string()))??;
        total.ranges += r.ranges;
        total.rows += r.rows;
        total.pending += r.pending;
        total.unexplained.extend(r.unexplained);
    }
    Ok(total)
}
