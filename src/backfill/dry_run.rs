//! `backfill --dry-run`: how many rows the statement would change and in how many batches;
//! nothing is changed (not even the ghostwire schema is created).

use super::statement::{self, Kind};
use super::target::Target;
use super::{BackfillError, Options};
use crate::connect::{self, Params as Config};

/// What a backfill would do.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DryRun {
    pub table: String,
    pub kind: Kind,
    /// The key the batches walk.
    pub key: Vec<String>,
    /// The table's rows (the planner's estimate).
    pub table_rows: i64,
    /// Rows the statement would change, as the planner estimates them (`EXPLAIN`).
    pub estimated_rows: i64,
    /// … counted exactly (`--count`).
    pub exact_rows: Option<i64>,
    /// Keys in the first batch; later ones follow `--batch-time`.
    pub first_batch_keys: i64,
    /// Batches at the first batch's size (an upper bound once batches grow).
    pub batches_at_first_size: i64,
    /// Whether rows already as the statement would make them are skipped
    /// (`col IS DISTINCT FROM (expr)`).
    pub skips_unchanged: bool,
    /// A batch, as it runs.
    pub batch_sql: String,
    pub warnings: Vec<String>,
}

/// What running `sql` in batches would do.
pub async fn dry_run(config: &Config, sql: &str, opts: &Options) -> Result<DryRun, BackfillError> {
    let parsed = statement::parse(sql)?;
    let mut client = connect::connect(&config.named("ghostwire backfill --dry-run")).await?;
    let target = Target::of(&mut client, parsed).await?;
    let s = &target.statement;
    let explain = format!("EXPLAIN (FORMAT JSON) {}", s.whole_sql());
    let plan: serde_json::Value =
        client.query_one(&explain, &[]).await.map_err(BackfillError::db("estimating the rows"))?.get(0);
    let estimated_rows = plan[0]["Plan"]["Plans"][0]["Plan Rows"].as_f64().unwrap_or(0.0) as i64;
    let exact_rows = if opts.count {
        let row = client.query_one(&s.count_sql(), &[]).await.map_err(BackfillError::db("counting the rows"))?;
        Some(row.get::<_, i64>(0))
    } else {
        None
    };
    let first = crate::operate::ChunkSizer::new(opts.settings.chunk_time(), opts.settings.chunk_rows).rows.max(1);
    let mut warnings = Vec::new();
    let again = s.self_referencing();
    if !again.is_empty() {
        warnings.push(format!(
            "SET {} reads what it sets: every run of this statement changes the rows again. `ghostwire resume` goes on \
             after the last batch and changes nothing twice; a second `backfill` of it would",
            again.join(", ")
        ));
    } else if s.kind == Kind::Update && !s.skips_unchanged() {
        warnings.push(
            "the SET list is not all plain `col = expr`, so rows already changed are not skipped: a second run writes \
             them again (resume does not)"
                .into(),
        );
    }
    Ok(DryRun {
        table: target.table.to_string(),
        kind: s.kind,
        key: target.key.clone(),
        table_rows: target.estimated_rows,
        estimated_rows,
        exact_rows,
        first_batch_keys: first,
        batches_at_first_size: (target.estimated_rows.max(1) + first - 1) / first,
        skips_unchanged: s.skips_unchanged(),
        batch_sql: target.batch_sql(true),
        warnings,
    })
}
