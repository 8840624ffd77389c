//! Indexes built, dropped and rebuilt concurrently, with their failures cleaned up:
//!
//! - `CREATE [UNIQUE] INDEX` runs as `CREATE … INDEX CONCURRENTLY` under the name PostgreSQL
//!   would have chosen (recorded before the build starts, so a resumed or aborted run knows
//!   it). A failed build is dropped concurrently; a deadlock is retried. A duplicate for a
//!   unique index stops the run naming the key;
//! - `ADD CONSTRAINT … UNIQUE / PRIMARY KEY` builds its index the same way, then attaches
//!   the constraint `USING INDEX` (a short lock). A primary key's nullable columns are made
//!   NOT NULL first through a validated check, so the attach does not scan;
//! - `DROP INDEX` runs as `DROP INDEX CONCURRENTLY`; one that stopped halfway (the index left
//!   invalid) is driven to the end;
//! - `REINDEX INDEX` runs as `REINDEX INDEX CONCURRENTLY`; a failed rebuild's `_ccnew` (or
//!   `_ccold`) index is dropped.

use std::time::Instant;

use serde_json::json;
use tokio_postgres::Client;

use super::Done;
use super::concurrently::Failure;
use crate::migrate::error::{Context as _, MigrateError};
use crate::migrate::run::Run;
use crate::plan::Plan;
use crate::plan::index_statement::{self, ConstraintIndex};
use crate::plan::parse::Action;
use crate::sql::{QualifiedName, ident};
use crate::state::{self, Migration, Phase};

/// Whether index `index` exists, and if so whether it is valid.
pub(super) async fn exists(client: &Client, index: &QualifiedName) -> Result<Option<bool>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT i.indisvalid FROM pg_catalog.pg_index i WHERE i.indexrelid = pg_catalog.to_regclass($1)",
            &[&index.sql()],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// `DROP INDEX CONCURRENTLY IF EXISTS` (alone in its statement: it cannot run in a
/// transaction block).
pub(super) async fn drop_concurrently(client: &Client, index: &QualifiedName) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index.sql())).await
}

/// Invalid `_ccnew`/`_ccold` indexes left on the table by a `REINDEX INDEX CONCURRENTLY` of
/// migration `m` that stopped: dropped concurrently. Returns what was removed.
pub(super) async fn remove_leftovers(client: &Client, m: &Migration) -> Result<Vec<String>, tokio_postgres::Error> {
    let Ok(parsed) = crate::plan::parse::parse(&m.statement) else { return Ok(Vec::new()) };
    let Some(Action::Reindex { name, .. }) = parsed.subcommands.first().map(|s| &s.action) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for leftover in reindex_leftovers(client, &m.table, name).await? {
        drop_concurrently(client, &QualifiedName::new(&m.table.schema, &leftover)).await?;
        removed.push(format!("index {leftover}"));
    }
    Ok(removed)
}

/// The invalid indexes of `table` named as a concurrent rebuild of `index` names its
/// temporary ones (`<index>_ccnew`, `<index>_ccold`, with a number when taken).
async fn reindex_leftovers(
    client: &Client,
    table: &QualifiedName,
    index: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = $1::text::regclass AND NOT i.indisvalid",
            &[&table.sql()],
        )
        .await?;
    let stems: Vec<String> =
        ["ccnew", "ccold"].iter().map(|label| index_statement::make_object_name(index, None, label)).collect();
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|n| {
            stems
                .iter()
                .any(|s| n.strip_prefix(s.as_str()).is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit())))
        })
        .collect())
}

impl Run<'_> {
    /// Builds index `name` with `create` (a `CREATE … INDEX CONCURRENTLY`), cleaning up after
    /// a failure. An invalid index of that name left by an earlier try is dropped first; a
    /// valid one recorded as built is kept.
    async fn build(
        &mut self,
        table: &QualifiedName,
        step: &str,
        name: &str,
        create: &str,
        done: &Done,
    ) -> Result<(), MigrateError> {
        let index = QualifiedName::new(&table.schema, name);
        let what = format!("building index {}", ident(name));
        let ours = done.find("index_build_started", step).is_some();
        match exists(&self.control, &index).await.during(self.id, self.phase, "looking for the index")? {
            Some(true) if ours => return Ok(()),
            Some(true) => {
                return Err(MigrateError::Refused(format!("an index named {} already exists", ident(name))));
            }
            Some(false) if !ours && !self.opts.yes => {
                return Err(MigrateError::NeedsConsent(format!(
                    "index {} already exists and is invalid: pass --yes to drop it (concurrently) and build it again",
                    ident(name)
                )));
            }
            Some(false) => {
                self.reporter.note(&format!("dropping the invalid index {} (a failed earlier build)", ident(name)));
                drop_concurrently(&self.control, &index).await.during(
                    self.id,
                    self.phase,
                    "dropping the invalid index",
                )?;
            }
            None => {}
        }
        self.enter(Phase::Index, &format!("{what} concurrently (reads and writes go on)")).await?;
        state::event(
            &self.control,
            self.id,
            self.phase,
            "index_build_started",
            &format!("{what} concurrently"),
            None,
            Some(json!({"step": step, "index": name})),
        )
        .await
        .during(self.id, self.phase, "recording the index build")?;
        let this = &*self;
        let index = &index;
        let cleanup = |failure: &Failure| {
            // A name taken meanwhile by someone else's index: that index is not ours to drop.
            let taken = matches!(failure, Failure::Database(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_TABLE));
            async move { taken || this.drop_failed(index).await }
        };
        let details = json!({"step": step, "index": name});
        let built = format!("built index {name}");
        let Err((failure, cleaned)) = self.retried(&what, create, "index_built", &built, Some(details), cleanup).await
        else {
            return Ok(());
        };
        self.build_failed(table, name, failure, cleaned, Instant::now()).await
    }

    /// Drops the invalid index a failed build left (concurrently, watched like the build);
    /// false if that failed too.
    async fn drop_failed(&self, index: &QualifiedName) -> bool {
        let what = format!("dropping the invalid index {}", ident(&index.name));
        let sql = format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index.sql());
        match self.concurrently(&what, &sql).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("{what}: {e:?}");
                false
            }
        }
    }

    /// Ends the run after a failed concurrent statement: a duplicate is a violation; the
    /// rest name the cause and whether anything is left.
    async fn build_failed(
        &mut self,
        table: &QualifiedName,
        name: &str,
        failure: Failure,
        cleaned: bool,
        started: Instant,
    ) -> Result<(), MigrateError> {
        if let Failure::Database(e) = &failure
            && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
            && cleaned
        {
            let example = e
                .as_db_error()
                .map(|d| format!("{}{}", d.message(), d.detail().map(|x| format!(" ({x})")).unwrap_or_default()))
                .unwrap_or_else(|| e.to_string());
            return self.violated(table, &format!("unique index {}", ident(name)), example, started).await;
        }
        let reason = match failure {
            Failure::Interrupted => {
                return Err(MigrateError::Interrupted { id: self.id, table: table.to_string(), phase: self.phase });
            }
            Failure::Session(e) => return Err(e),
            f => self.reason(f),
        };
        let left = if cleaned {
            "the invalid index it left was dropped, so the table is as it was".to_owned()
        } else {
            format!(
                "the invalid index {} could not be dropped yet: `ghostwire indexes --drop-invalid {table}` removes it",
                ident(name)
            )
        };
        let message = format!("the concurrent build of {} failed: {reason}; {left}", ident(name));
        self.event("index_build_failed", &message, Some(started.elapsed()), None).await;
        if cleaned {
            state::set_phase(&self.control, self.id, Phase::Aborted, &message).await.during(
                self.id,
                self.phase,
                "recording the failure",
            )?;
        }
        Err(MigrateError::BuildFailed { id: self.id, table: table.to_string(), message })
    }

    /// `CREATE [UNIQUE] INDEX`: false when IF NOT EXISTS finds it there already.
    pub(super) async fn create_index(&mut self, plan: &Plan, step: &str, done: &Done) -> Result<bool, MigrateError> {
        let Some(Action::CreateIndex { name, unique, if_not_exists, columns, body }) =
            plan.steps.first().map(|s| &s.action)
        else {
            return Ok(true);
        };
        let table = &plan.table;
        if let Some(name) = name
            && *if_not_exists
            && done.find("index_build_started", step).is_none()
            && exists(&self.control, &QualifiedName::new(&table.schema, name)).await.during(
                self.id,
                self.phase,
                "looking for the index",
            )? == Some(true)
        {
            self.event("index_exists", &format!("index {name} already exists: nothing to do"), None, None).await;
            return Ok(false);
        }
        let name = match (name, done.name("index_build_started", step, "index")) {
            (Some(n), _) => n.clone(),
            (None, Some(n)) => n,
            (None, None) => {
                let addition = index_statement::name_addition(columns);
                index_statement::choose_relation_name(
                    &self.control,
                    &table.schema,
                    &table.name,
                    Some(&addition),
                    "idx",
                    false,
                )
                .await
                .during(self.id, self.phase, "choosing the index's name")?
            }
        };
        let create = index_statement::create_concurrently(&plan.parsed.text, *unique, &name, body);
        self.build(table, step, &name, &create, done).await?;
        Ok(true)
    }

    /// `ADD CONSTRAINT … UNIQUE / PRIMARY KEY`: the index built concurrently, then attached.
    pub(super) async fn add_index_constraint(
        &mut self,
        plan: &Plan,
        step: &str,
        index: &ConstraintIndex,
        name: Option<&str>,
        done: &Done,
    ) -> Result<(), MigrateError> {
        if done.find("constraint_attached", step).is_some() {
            return Ok(());
        }
        let table = &plan.table;
        let name = match (name, done.name("index_build_started", step, "index")) {
            (Some(n), _) => n.to_owned(),
            (None, Some(n)) => n,
            (None, None) => index.default_name(&self.control, table).await.during(
                self.id,
                self.phase,
                "choosing the constraint's name",
            )?,
        };
        if index.primary {
            for (k, column) in index.keys.iter().enumerate() {
                if plan.table_def.column(column).is_some_and(|c| !c.not_null) {
                    self.set_not_null(table, &format!("{step}.{k}"), column, done).await?;
                }
            }
        }
        self.build(table, step, &name, &index.create_sql(table, &name), done).await?;
        self.enter(Phase::Cutover, &format!("attaching constraint {} to its index", ident(&name))).await?;
        let sql = format!("ALTER TABLE {} {}", table.sql(), index.attach_sql(&name));
        let details = json!({"step": step, "constraint": name});
        let times = self
            .recorded("attaching the constraint", &sql, "constraint_attached", &format!("attached {name}"), details)
            .await?;
        self.reporter.note(&format!(
            "constraint {} attached USING INDEX (lock held {:.1} ms, {} attempt(s))",
            ident(&name),
            times.held.as_secs_f64() * 1000.0,
            times.attempts
        ));
        Ok(())
    }

    /// `DROP INDEX` concurrently, retried on a deadlock. A drop that fails may leave the
    /// index invalid: the run stays resumable, and `resume` drives the drop to its end.
    pub(super) async fn drop_index(&mut self, plan: &Plan) -> Result<(), MigrateError> {
        let Some(Action::DropIndex { name, .. }) = plan.steps.first().map(|s| &s.action) else { return Ok(()) };
        let index = QualifiedName::new(&plan.table.schema, name);
        self.enter(Phase::Cutover, &format!("dropping index {} concurrently", ident(name))).await?;
        let what = format!("dropping index {}", ident(name));
        let sql = format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index.sql());
        let Err((failure, _)) = self.retried(&what, &sql, "index_dropped", &what, None, |_| async { true }).await
        else {
            return Ok(());
        };
        let reason = match failure {
            Failure::Interrupted => {
                return Err(MigrateError::Interrupted {
                    id: self.id,
                    table: plan.table.to_string(),
                    phase: self.phase,
                });
            }
            Failure::Session(e) => return Err(e),
            f => self.reason(f),
        };
        let left = match exists(&self.control, &index).await.during(self.id, self.phase, "looking for the index")? {
            Some(false) => " (the index is left invalid: it no longer serves queries)",
            _ => "",
        };
        let message = format!(
            "the concurrent drop of {} failed: {reason}{left}; `ghostwire resume {}` drops it once the cause is gone",
            ident(name),
            plan.table
        );
        self.event("index_drop_failed", &message, None, None).await;
        Err(MigrateError::BuildFailed { id: self.id, table: plan.table.to_string(), message })
    }

    /// `REINDEX INDEX` concurrently, retried on a deadlock; a failure's temporary index is
    /// dropped, leaving the index as it was.
    pub(super) async fn reindex(&mut self, plan: &Plan) -> Result<(), MigrateError> {
        let Some(Action::Reindex { name, .. }) = plan.steps.first().map(|s| &s.action) else { return Ok(()) };
        let index = QualifiedName::new(&plan.table.schema, name);
        self.enter(Phase::Index, &format!("rebuilding index {} concurrently", ident(name))).await?;
        let what = format!("rebuilding index {}", ident(name));
        let sql = format!("REINDEX INDEX CONCURRENTLY {}", index.sql());
        let (this, table) = (&*self, &plan.table);
        let cleanup = |_: &Failure| async move {
            let mut cleaned = true;
            for leftover in reindex_leftovers(&this.control, table, name).await.unwrap_or_default() {
                cleaned &= this.drop_failed(&QualifiedName::new(&table.schema, &leftover)).await;
            }
            cleaned
        };
        let Err((failure, cleaned)) = self.retried(&what, &sql, "index_rebuilt", &what, None, cleanup).await else {
            return Ok(());
        };
        self.build_failed(&plan.table, name, failure, cleaned, Instant::now()).await
    }

    /// Runs a concurrent statement (recording the event `kind` with `message` and `details`
    /// when it succeeds), cleaning up after each failure with `cleanup` (false if that failed)
    /// and trying again after a deadlock. A failure comes back with whether it was cleaned up.
    async fn retried<F, Fut>(
        &self,
        what: &str,
        sql: &str,
        kind: &str,
        message: &str,
        details: Option<serde_json::Value>,
        mut cleanup: F,
    ) -> Result<(), (Failure, bool)>
    where
        F: FnMut(&Failure) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut attempt = 1;
        loop {
            match self.concurrently(what, sql).await {
                Ok(took) => {
                    self.event(kind, message, Some(took), details).await;
                    return Ok(());
                }
                Err(f) => {
                    let cleaned = cleanup(&f).await;
                    if !(f.is_deadlock() && cleaned && attempt < self.retry.attempts) {
                        return Err((f, cleaned));
                    }
                    attempt += 1;
                    self.reporter.note(&format!("{what}: deadlock, trying again (attempt {attempt})"));
                }
            }
        }
    }

    /// A failure's cause, for the operator.
    fn reason(&self, failure: Failure) -> String {
        match failure {
            Failure::Database(e) => crate::connect::describe(&e),
            Failure::GaveUp { waited, sessions } => format!(
                "it waited {} for {sessions} and gave up (--build-wait-timeout); end those sessions, or allow longer",
                humantime::format_duration(std::time::Duration::from_secs(waited.as_secs()))
            ),
            Failure::Interrupted => "interrupted".into(),
            Failure::Session(e) => e.to_string(),
        }
    }
}
