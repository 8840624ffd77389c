//! Phase `verify`: compare the original and the shadow, range by range.
//!
//! The key space is cut into ranges at every n-th key of the original (one pass over the key
//! index). For each range, in one short REPEATABLE READ transaction: the count and an
//! order-independent hash (XOR of 64-bit hashes) of every mapped row, on both sides, leaving
//! out rows whose key has a pending change-log entry in the same snapshot (a write not yet
//! caught up: it may differ). When they differ, the differing keys are listed; each must have
//! a pending entry. Any other difference is a defect.
//!
//! Columns that cannot be compared are left out: new columns (their defaults may be
//! volatile), stored generated columns, and columns converted with a volatile USING. When a
//! key conversion does not keep the key order, shadow rows are matched by key instead of by
//! range, and extra rows in the shadow are not detected.

use std::sync::Arc;

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
    /// The same, leaving out rows whose key has a pending change-log entry (used while the
    /// log has entries: their differences are expected, and need no diff).
    original_agg_settled: [String; 4],
    shadow_agg_settled: [String; 4],
    /// Whether the log has entries, and whether one of them is a TRUNCATE.
    log_state: String,
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

/// How rows are hashed: by each column type's own hash function (fast; PostgreSQL 14+,
/// types with a hash opclass), or through their text form (works for any type).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Hashing {
    Typed,
    Text,
}

fn queries(spec: &Spec, hashing: Hashing) -> Queries {
    let n = spec.key.len();
    let compared: Vec<_> = spec.columns.iter().filter(|c| c.compare).collect();
    let orig_row: Vec<String> = compared
        .iter()
        .map(|c| format!("CAST(({}) AS {})", c.source.as_deref().unwrap_or("NULL"), c.shadow_type_sql))
        .collect();
    let shadow_row: Vec<String> = compared.iter().map(|c| ident(&c.shadow)).collect();
    let hash = |row: &[String]| match hashing {
        Hashing::Typed => format!("hash_record_extended(ROW({}), 0)", row.join(", ")),
        Hashing::Text => format!("hashtextextended(ROW({})::text, 0)", row.join(", ")),
    };
    let orig_hash = hash(&orig_row);
    let shadow_hash = hash(&shadow_row);
    // Every row holds its unique key, so no two rows are equal and XOR cannot cancel them.
    let combine = |h: &str| {
        if spec.table.server_version_num >= 140000 {
            format!("coalesce(bit_xor({h}), 0)::text")
        } else {
            format!("coalesce(sum({h}::numeric), 0)::text")
        }
    };
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
    let list = |items: Vec<String>| items.join(", ");
    // Hash anti-joins against the log, in each side's key form.
    let orig_settled = format!(
        "NOT EXISTS (SELECT 1 FROM {log} AS ghostwire_log WHERE NOT ghostwire_log.ghostwire_truncated AND ({}) = ({}))",
        list(spec.key.iter().map(|k| format!("ghostwire_log.{}", ident(&k.name))).collect()),
        list(spec.key.iter().map(|k| format!("{original}.{}", ident(&k.name))).collect()),
    );
    let shadow_settled = format!(
        "NOT EXISTS (SELECT 1 FROM {log} AS {alias} WHERE NOT {alias}.ghostwire_truncated AND ({}) = ({}))",
        list(spec.key.iter().map(|k| k.to_shadow.clone()).collect()),
        list(spec.key.iter().map(|k| format!("{shadow}.{}", ident(&k.shadow_name))).collect()),
    );
    Queries {
        original_agg_settled: make(&|lo, hi| {
            format!(
                "SELECT count(*), {} FROM ONLY {original} WHERE {} AND {orig_settled}",
                combine(&orig_hash),
                orig_filter(lo, hi)
            )
        }),
        shadow_agg_settled: make(&|lo, hi| {
            format!(
                "SELECT count(*), {} FROM {shadow} WHERE {} AND {shadow_settled}",
                combine(&shadow_hash),
                shadow_filter(lo, hi, 1)
            )
        }),
        log_state: format!(
            "SELECT EXISTS (SELECT 1 FROM {log} WHERE NOT ghostwire_truncated), EXISTS (SELECT 1 FROM {log} WHERE ghostwire_truncated)"
        ),
        original_agg: make(&|lo, hi| {
            format!("SELECT count(*), {} FROM ONLY {original} WHERE {}", combine(&orig_hash), orig_filter(lo, hi))
        }),
        shadow_agg: make(&|lo, hi| {
            format!("SELECT count(*), {} FROM {shadow} WHERE {}", combine(&shadow_hash), shadow_filter(lo, hi, 1))
        }),
        diff: make(&|lo, hi| {
            let after = 1 + n * (usize::from(lo) + usize::from(hi));
            format!(
                "SELECT d.k, t.truncated OR p.k IS NOT NULL
                   FROM (SELECT coalesce(o.k, s.k) AS k
                           FROM (SELECT {orig_key_text} AS k, {orig_hash} AS h FROM ONLY {original} WHERE {}) o
                           FULL JOIN (SELECT {shadow_key_text} AS k, {shadow_hash} AS h FROM {shadow} WHERE {}) s ON o.k = s.k
                          WHERE o.h IS DISTINCT FROM s.h) d
                   LEFT JOIN (SELECT DISTINCT {orig_key_text} AS k FROM {log} AS {alias} WHERE NOT ghostwire_truncated) p
                          ON p.k = d.k
                  CROSS JOIN (SELECT EXISTS (SELECT 1 FROM {log} WHERE ghostwire_truncated) AS truncated) t",
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

/// Hands out ranges in key order: each is cut at the `every`-th key after the previous
/// cut (an index-only walk), when a worker asks for it.
struct Cursor {
    lower: Bound,
    finished: bool,
    /// For a single integer key: ranges stepped by value.
    stepper: Option<super::copy::Stepper>,
}

fn next_cut_sql(spec: &Spec, after: bool) -> String {
    let filter =
        if after { format!("WHERE ({}) > {}", spec.key_list(), spec.key_params(2, false)) } else { String::new() };
    format!(
        "SELECT {} FROM ONLY {} {filter} ORDER BY {} OFFSET $1 LIMIT 1",
        spec.key_as_text(""),
        spec.original.sql(),
        spec.key_list()
    )
}

/// The next range to check, or None when the key space is covered.
async fn next_range(
    client: &Client,
    spec: &Spec,
    cursor: &tokio::sync::Mutex<Cursor>,
    every: i64,
) -> Result<Option<(Bound, Bound)>, tokio_postgres::Error> {
    let mut c = cursor.lock().await;
    if c.finished {
        return Ok(None);
    }
    if let Some(st) = &c.stepper {
        let lower = c.lower.as_ref().and_then(|l| l[0].parse::<i64>().ok());
        // The last range is open-ended: shadow rows beyond the largest key are checked too.
        let upper = st.upper(lower, every).filter(|u| lower.is_none_or(|l| *u > l));
        let range = (c.lower.clone(), upper.map(|u| vec![u.to_string()]));
        match upper {
            Some(u) if range.1.is_some() && st.upper(Some(u), every).is_some() => c.lower = Some(vec![u.to_string()]),
            _ => {
                c.finished = true;
                return Ok(Some((range.0, None)));
            }
        }
        return Ok(Some(range));
    }
    let skip = every - 1;
    let cut: Option<Vec<String>> = match &c.lower {
        None => client.query_opt(&next_cut_sql(spec, false), &[&skip]).await?,
        Some(lo) => {
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&skip];
            params.extend(lo.iter().map(|v| v as &(dyn ToSql + Sync)));
            client.query_opt(&next_cut_sql(spec, true), &params).await?
        }
    }
    .map(|r| r.get(0));
    let range = (c.lower.clone(), cut.clone());
    match cut {
        Some(cut) => c.lower = Some(cut),
        None => c.finished = true,
    }
    Ok(Some(range))
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
        // While changes are pending, compare only the rows without one: equal means every
        // other row matches, with no diff to run (under writes, most ranges have one).
        let log = client.query_one(&q.log_state, &[]).await?;
        let settled = log.get::<_, bool>(0) && !log.get::<_, bool>(1);
        let (original_agg, shadow_agg) =
            if settled { (&q.original_agg_settled, &q.shadow_agg_settled) } else { (&q.original_agg, &q.shadow_agg) };
        let o = client.query_one(&original_agg[variant], &as_params(&orig_params)).await?;
        let s = client.query_one(&shadow_agg[variant], &as_params(&shadow_params)).await?;
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

/// Whether every compared column's type has a hash function (tried on one shadow row).
async fn typed_hashing_works(client: &Client, spec: &Spec) -> bool {
    if spec.table.server_version_num < 140000 {
        return false;
    }
    let columns: Vec<String> = spec.columns.iter().filter(|c| c.compare).map(|c| ident(&c.shadow)).collect();
    let sql =
        format!("SELECT hash_record_extended(ROW({}), 0) FROM {} LIMIT 1", columns.join(", "), spec.shadow().sql());
    client.query(&sql, &[]).await.is_ok()
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
    let stepper = match spec.integer_key() {
        true => super::copy::key_bounds(&first, spec).await?.map(|(min, max)| {
            let estimate = spec.table.estimated_rows.max(1);
            super::copy::Stepper::new(min, max, estimate)
        }),
        false => None,
    };
    let cursor = Arc::new(tokio::sync::Mutex::new(Cursor { lower: None, finished: false, stepper }));
    let every = range_rows.max(1);
    let hashing = if typed_hashing_works(&first, spec).await { Hashing::Typed } else { Hashing::Text };
    let spec = Arc::new(spec.clone());
    let q = Arc::new(queries(&spec, hashing));
    let mut workers = Vec::new();
    let mut first = Some(first);
    for _ in 0..parallel.max(1) {
        let client = match first.take() {
            Some(c) => c,
            None => crate::db::connect(config).await?,
        };
        let (cursor, spec, q, cancel) = (Arc::clone(&cursor), Arc::clone(&spec), Arc::clone(&q), cancel.clone());
        workers.push(tokio::spawn(async move {
            let mut report = Report::default();
            loop {
                let Some((lo, hi)) = next_range(&client, &spec, &cursor, every).await? else { break };
                if cancel.is_cancelled() {
                    break;
                }
                let r = check_range(&client, &spec, &q, &lo, &hi).await?;
                crate::failpoint::hit("verify.range");
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
