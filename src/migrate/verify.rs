//! Phase `verify`: compare the original and the shadow, range by range.
//!
//! The key space is cut into ranges at every n-th key of the original (one pass over the key
//! index). For each range, one query in one short REPEATABLE READ transaction joins the
//! original's rows (mapped as the copy maps them) with the shadow's by key, both read in key
//! order, and compares them column by column: a row on one side only, or with any column
//! different, must have a pending change-log entry in the same snapshot (a write not yet
//! caught up). Any other difference is a defect.
//!
//! Columns that cannot be compared are left out: new columns (their defaults may be
//! volatile), stored generated columns, and columns converted with a volatile USING. When a
//! key conversion does not keep the key order, shadow rows are matched by key instead of by
//! range, and extra rows in the shadow are not detected.

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::spec::Spec;
use crate::sql::ident;

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub ranges: usize,
    pub rows: i64,
    /// Rows that differ with a pending change (expected while writes go on).
    pub pending: usize,
    /// Keys (in the shadow's form, shown as `(k1, k2)`) that differ without a pending change.
    pub unexplained: Vec<String>,
    /// Matched by key rather than by range (extra shadow rows not detected).
    pub matched_by_key: bool,
}

type Bound = Option<Vec<String>>;

/// The SQL of the range checks.
struct Queries {
    /// By which bounds a range has (none, lower, upper, both): the original's rows in the
    /// range, the differing rows, and those without a pending change (shown).
    /// Parameters: the original's bounds, then the shadow's (by range).
    compare: [String; 4],
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

/// How column values are compared: with each type's own equality (fast; types with an `=`
/// operator), or through their text form (works for any type, `json` included).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Comparison {
    Typed,
    Text,
}

/// `shadow_only` (a sampled rehearsal, whose shadow holds a share of the rows): every shadow
/// row is compared with the original's, and rows of the original the shadow lacks are not
/// differences.
fn queries(spec: &Spec, comparison: Comparison, shadow_only: bool) -> Queries {
    let n = spec.key.len();
    let compared: Vec<_> = spec.columns.iter().filter(|c| c.compare).collect();
    let original = spec.original.sql();
    let shadow = spec.shadow().sql();
    let by_range = spec.key_order_preserved();
    let orig_key_text = format!(
        "ARRAY[{}]",
        spec.key.iter().map(|k| format!("({})::text", k.to_shadow)).collect::<Vec<_>>().join(", ")
    );
    let variants = [(false, false), (true, false), (false, true), (true, true)];
    let orig_filter = |lo, hi| range_filter(&spec.key_list(), |i| spec.key_params(i, false), 1, lo, hi, n);
    // The shadow's bounds follow the original's parameters, by range; matched by key, the
    // shadow reuses the original's.
    let shadow_filter = |lo: bool, hi: bool, first: usize| {
        if by_range {
            range_filter(&spec.shadow_key_list(), |i| spec.key_params(i, true), first, lo, hi, n)
        } else {
            let keys = spec.key.iter().map(|k| k.to_shadow.clone()).collect::<Vec<_>>().join(", ");
            format!(
                "({}) IN (SELECT {keys} FROM ONLY {original} WHERE {})",
                spec.shadow_key_list(),
                orig_filter(lo, hi)
            )
        }
    };
    // Both sides in the shadow's terms: its key (gw_k*) and compared columns (gw_c*).
    let orig_cols: Vec<String> = spec
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} AS gw_k{i}", k.to_shadow))
        .chain(compared.iter().enumerate().map(|(i, c)| {
            format!("CAST(({}) AS {}) AS gw_c{i}", c.source.as_deref().unwrap_or("NULL"), c.shadow_type_sql)
        }))
        .collect();
    let shadow_cols: Vec<String> = spec
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} AS gw_k{i}", ident(&k.shadow_name)))
        .chain(compared.iter().enumerate().map(|(i, c)| format!("{} AS gw_c{i}", ident(&c.shadow))))
        .collect();
    let join_on: Vec<String> = (0..n).map(|i| format!("gw_o.gw_k{i} = gw_s.gw_k{i}")).collect();
    let column_differs = |i: usize| match comparison {
        Comparison::Typed => format!("gw_o.gw_c{i} IS DISTINCT FROM gw_s.gw_c{i}"),
        Comparison::Text => format!("gw_o.gw_c{i}::text IS DISTINCT FROM gw_s.gw_c{i}::text"),
    };
    let differs: Vec<String> = ["gw_o.gw_k0 IS NULL".to_owned(), "gw_s.gw_k0 IS NULL".to_owned()]
        .into_iter()
        .chain((0..compared.len()).map(column_differs))
        .collect();
    let differs = differs.join(" OR ");
    let either_key: Vec<String> = (0..n).map(|i| format!("gw.gw_k{i}::text")).collect();
    let log = spec.log_table().sql();
    let alias = ident(&spec.original.name);
    // Looked at for differing rows only: a TRUNCATE marker explains everything.
    let pending = format!(
        "(EXISTS (SELECT 1 FROM {log} WHERE ghostwire_truncated)
          OR ARRAY[{keys}] IN (SELECT {orig_key_text} FROM {log} AS {alias} WHERE NOT ghostwire_truncated))",
        keys = either_key.join(", "),
    );
    let keys_out: Vec<String> = (0..n).map(|i| format!("coalesce(gw_o.gw_k{i}, gw_s.gw_k{i}) AS gw_k{i}")).collect();
    // OFFSET 0 keeps the join a subquery, so each row's comparison runs once.
    let compare = variants.map(|(lo, hi)| {
        let after = 1 + n * (usize::from(lo) + usize::from(hi));
        format!(
            "SELECT count(*) FILTER (WHERE gw.in_original),
                    count(*) FILTER (WHERE gw.differs),
                    coalesce(array_agg('(' || concat_ws(', ', {shown}) || ')') FILTER (WHERE gw.differs AND NOT {pending}), '{{}}')
               FROM (SELECT gw_o.gw_k0 IS NOT NULL AS in_original, {differs} AS differs, {keys_out}
                       FROM (SELECT {orig_cols} FROM ONLY {original} WHERE {orig_where}) gw_o
                       {join} JOIN (SELECT {shadow_cols} FROM {shadow} WHERE {shadow_where}) gw_s ON {join_on}
                     OFFSET 0) gw",
            shown = either_key.join(", "),
            keys_out = keys_out.join(", "),
            orig_cols = orig_cols.join(", "),
            shadow_cols = shadow_cols.join(", "),
            orig_where = orig_filter(lo, hi),
            shadow_where = shadow_filter(lo, hi, after),
            join_on = join_on.join(" AND "),
            join = if shadow_only { "RIGHT" } else { "FULL" },
        )
    });
    Queries {
        compare,
        to_shadow_bound: format!(
            "SELECT {orig_key_text} FROM (SELECT {}) AS {alias}",
            spec.key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("${}::text::{} AS {}", i + 1, k.type_sql, ident(&k.name)))
                .collect::<Vec<_>>()
                .join(", "),
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
    unexplained: Vec<String>,
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
    if spec.key_order_preserved() {
        let identity = spec.key.iter().all(|k| k.to_shadow == ident(&k.name));
        for b in [lo, hi].into_iter().flatten() {
            if identity {
                shadow_bounds.extend(b.iter().cloned());
            } else {
                let params: Vec<&(dyn ToSql + Sync)> = b.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let converted: Vec<String> = client.query_one(&q.to_shadow_bound, &params).await?.get(0);
                shadow_bounds.extend(converted);
            }
        }
    }
    let mut params = orig_params;
    params.extend(shadow_bounds.iter());
    client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
    let result = client.query_one(&q.compare[variant], &as_params(&params)).await;
    client.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" }).await?;
    let row = result?;
    let unexplained: Vec<String> = row.get(2);
    let pending = (row.get::<_, i64>(1) as usize).saturating_sub(unexplained.len());
    Ok(RangeResult { rows: row.get(0), pending, unexplained })
}

/// Whether every compared column's type has an equality operator (the query plans).
async fn typed_comparison_works(client: &Client, spec: &Spec) -> bool {
    client.prepare(&queries(spec, Comparison::Typed, false).compare[3]).await.is_ok()
}

impl Report {
    fn add(&mut self, r: RangeResult) {
        self.ranges += 1;
        self.rows += r.rows;
        self.pending += r.pending;
        self.unexplained.extend(r.unexplained);
    }

    /// Adds up the reports of several workers.
    pub fn merge(&mut self, other: Report) {
        self.ranges += other.ranges;
        self.rows += other.rows;
        self.pending += other.pending;
        self.unexplained.extend(other.unexplained);
    }
}

/// Hands out the ranges of one verification to any number of workers, each with a session
/// of its own: `check_next` checks the next range not yet taken.
pub struct Verifier {
    spec: Spec,
    queries: Queries,
    cursor: tokio::sync::Mutex<Cursor>,
    every: i64,
    /// A sampled rehearsal: one range in this many is checked (rows the shadow has only).
    sample_every: Option<u64>,
    handed_out: std::sync::atomic::AtomicU64,
}

impl Verifier {
    /// Prepares a verification of `spec` in ranges of `range_rows` rows; with
    /// `sample_every`, of one range in that many, comparing the rows the shadow has.
    pub async fn new(
        client: &Client,
        spec: &Spec,
        range_rows: i64,
        sample_every: Option<u64>,
    ) -> Result<Verifier, tokio_postgres::Error> {
        let stepper = match spec.integer_key() {
            true => super::copy::key_bounds(client, spec).await?.map(|(min, max)| {
                let estimate = spec.table.estimated_rows.max(1);
                super::copy::Stepper::new(min, max, estimate)
            }),
            false => None,
        };
        let comparison = if typed_comparison_works(client, spec).await { Comparison::Typed } else { Comparison::Text };
        Ok(Verifier {
            spec: spec.clone(),
            queries: queries(spec, comparison, sample_every.is_some()),
            cursor: tokio::sync::Mutex::new(Cursor { lower: None, finished: false, stepper }),
            every: range_rows.max(1),
            sample_every,
            handed_out: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Checks the next range on `client` and adds it to `report`; false once every range is
    /// taken.
    pub async fn check_next(&self, client: &Client, report: &mut Report) -> Result<bool, tokio_postgres::Error> {
        let (lo, hi) = loop {
            let Some(range) = next_range(client, &self.spec, &self.cursor, self.every).await? else {
                return Ok(false);
            };
            let n = self.handed_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.sample_every.is_none_or(|k| n % k == 0) {
                break range;
            }
        };
        let r = check_range(client, &self.spec, &self.queries, &lo, &hi).await?;
        crate::failpoint::hit("verify.range");
        report.add(r);
        Ok(true)
    }

    /// What a report on this verification starts from.
    pub fn empty_report(&self) -> Report {
        Report { matched_by_key: !self.spec.key_order_preserved(), ..Report::default() }
    }
}

/// Of `keys` (as a report shows them), those with no change-log entry now. With logical
/// capture the log lags the table by the stream's delay: a row a verification found
/// different may have been written just before its snapshot, its entry still on the way.
/// Asked once the stream is fenced (and before any catch-up), this is exact: a key with an
/// entry is applied again by the catch-up; one without would stay wrong.
pub async fn still_unexplained(
    client: &Client,
    spec: &Spec,
    keys: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let orig_key_text = spec.key.iter().map(|k| format!("({})::text", k.to_shadow)).collect::<Vec<_>>().join(", ");
    let log = spec.log_table().sql();
    let sql = format!(
        "SELECT k FROM unnest($1::text[]) AS k
          WHERE NOT EXISTS (SELECT 1 FROM {log} WHERE ghostwire_truncated)
            AND k NOT IN (SELECT '(' || array_to_string(ARRAY[{orig_key_text}], ', ') || ')'
                            FROM {log} AS {alias} WHERE NOT ghostwire_truncated)",
        alias = ident(&spec.original.name),
    );
    let rows = client.query(&sql, &[&keys]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
