//! Validating the foreign keys a swap (or a swap back) added `NOT VALID`.
//!
//! `VALIDATE CONSTRAINT` takes SHARE UPDATE EXCLUSIVE on the table it alters and ROW SHARE on
//! the table referenced: reads and writes go on. The lock conflicts with itself, so the
//! validations of one table run one after another; those of different tables (the table's own
//! foreign keys, and each table that references it) run at once, each on its own session, up
//! to `jobs` at a time. A child table as large as the table itself takes as long to check as
//! the table's own keys: side by side, the run ends when the longest one does.
//!
//! The check is one anti-join of the whole referencing table against the referenced one. On
//! the new table, just built and vacuumed (its visibility map set: `post_copy`), a merge of
//! two index-only scans does it in well under half the time of a hash join over the heaps,
//! but with the default `random_page_cost` of 4 the planner does not take it (measured on
//! PostgreSQL 15: a child of 1M rows against 2M, 1.19 s hashed, 0.47 s merged). A freshly
//! built index is read in physical order, close to sequentially, so the validation's own
//! transaction plans with `random_page_cost` at most 1.1 (the usual value for SSDs); a
//! server set lower keeps its value.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::Client;

use super::retry::{self, RetryPolicy};
use crate::connect::{self, Params as Config};

/// One `VALIDATE CONSTRAINT`.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// For messages: `foreign key orders_customer_fk on public.orders`.
    pub what: String,
    /// The table altered (quoted), which decides what may run at once.
    pub table: String,
    pub sql: String,
}

impl Validation {
    pub fn new(what: String, table: String, constraint: &str) -> Validation {
        let sql = format!("ALTER TABLE {table} VALIDATE CONSTRAINT {}", crate::sql::ident(constraint));
        Validation { what, table, sql }
    }
}

/// How one validation ended.
#[derive(Debug)]
pub struct Validated {
    pub validation: Validation,
    pub took: Duration,
    /// Why it failed (the constraint stays NOT VALID).
    pub error: Option<String>,
}

impl Validated {
    /// What happened, for the events and the operator.
    pub fn message(&self) -> String {
        let what = &self.validation.what;
        match &self.error {
            None => format!("validated {what}"),
            Some(e) => format!("could not validate {what} ({e}); it stays NOT VALID"),
        }
    }
}

/// The validations grouped by the table they alter, in their order.
fn by_table(list: Vec<Validation>) -> Vec<Vec<Validation>> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<Validation>> = BTreeMap::new();
    for v in list {
        if !groups.contains_key(&v.table) {
            order.push(v.table.clone());
        }
        groups.entry(v.table.clone()).or_default().push(v);
    }
    order.into_iter().filter_map(|t| groups.remove(&t)).collect()
}

/// Inside the validation's transaction, before it: the planner's cost of a random page read
/// at most 1.1 (see the module's note).
const PLAN_FOR_FRESH_INDEXES: &str = "SELECT pg_catalog.set_config('random_page_cost', '1.1', true) \
     WHERE pg_catalog.current_setting('random_page_cost')::float8 > 1.1";

/// Runs `group` one after the other on `client`, each in its own transaction under the
/// policy's lock_timeout, retried.
pub async fn in_order(client: &Client, policy: &RetryPolicy, group: Vec<Validation>) -> Vec<Validated> {
    let mut out = Vec::with_capacity(group.len());
    for v in group {
        let t = Instant::now();
        let sql = format!("{PLAN_FOR_FRESH_INDEXES}; {}", v.sql);
        let result = retry::ddl(client, policy, &format!("validating {}", v.what), &sql).await;
        out.push(Validated { took: t.elapsed(), error: result.err().map(|e| connect::describe(&e)), validation: v });
    }
    out
}

/// Runs every validation: the first table's on `first`, the others' on sessions of their
/// own (`first` again, one after the other, when no other session can be opened).
pub async fn all(
    config: &Config,
    first: &Client,
    policy: &RetryPolicy,
    jobs: usize,
    list: Vec<Validation>,
) -> Vec<Validated> {
    let mut groups = by_table(list).into_iter();
    let Some(head) = groups.next() else { return Vec::new() };
    let rest: Vec<Vec<Validation>> = groups.collect();
    let others = futures_util::stream::iter(rest)
        .map(|group| async move {
            match connect::connect(config).await {
                Ok(client) => Ok(in_order(&client, policy, group).await),
                Err(e) => {
                    tracing::info!("validating on the control session: no other session ({e})");
                    Err(group)
                }
            }
        })
        .buffer_unordered(jobs.saturating_sub(1).max(1));
    let (mut done, others) = tokio::join!(in_order(first, policy, head), others.collect::<Vec<_>>());
    for result in others {
        match result {
            Ok(validated) => done.extend(validated),
            Err(group) => done.extend(in_order(first, policy, group).await),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_in_order_others_apart() {
        let v = |what: &str, table: &str| Validation::new(what.into(), table.into(), what);
        let groups = by_table(vec![v("a", "t"), v("b", "c1"), v("c", "t"), v("d", "c2")]);
        let names: Vec<Vec<&str>> = groups.iter().map(|g| g.iter().map(|v| v.what.as_str()).collect()).collect();
        assert_eq!(names, vec![vec!["a", "c"], vec!["b"], vec!["d"]]);
        assert_eq!(groups[0][0].sql, "ALTER TABLE t VALIDATE CONSTRAINT \"a\"");
    }
}
