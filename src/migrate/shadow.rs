//! Phase `shadow`: an empty copy of the table with the user's change applied.
//!
//! In one transaction (retried on lock conflicts; nothing stays behind on failure):
//! `CREATE TABLE ghostwire_<id>.<name> (LIKE original …)` with the original's storage
//! parameters, its NOT VALID checks re-added as NOT VALID, its statistics targets and its
//! indexes and index-backed constraints under their own names; then the user's own
//! statement, spliced onto the shadow (the server validates it). What PostgreSQL built is
//! then read back: the column mapping, the key, and the secondary indexes and foreign keys,
//! which are dropped now and rebuilt after the copy (indexes) or at cut-over (foreign keys).

use std::collections::HashMap;

use tokio_postgres::Client;

use super::error::MigrateError;
use super::retry::{RetryPolicy, is_lock_conflict};
use super::shadow_constraints::{defer_unvalidated_checks, foreign_keys, strip_not_valid};
use super::spec::{self, ColumnMap, DeferredIndex, KeyColumn, Spec};
use crate::catalog::{Column, ConstraintKind, Persistence, TableDef};
use crate::plan::{Action, Plan, expr, parse};
use crate::sql::{QualifiedName, ident, literal};

/// A step of the shadow transaction that failed.
enum Failure {
    Database(&'static str, tokio_postgres::Error),
    /// The user's statement, as PostgreSQL judged it on the shadow table.
    Rejected(tokio_postgres::Error),
    Refused(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Database("building the shadow table", e)
    }
}

/// A column of the shadow as PostgreSQL built it.
pub(super) struct ShadowColumn {
    pub(super) attnum: i16,
    name: String,
    type_sql: String,
    type_oid: u32,
    typmod: i32,
    /// The collation when not the type's default, as SQL.
    collation: Option<String>,
    generated: bool,
    identity_always: bool,
}

/// Builds the shadow table and returns the migration's spec. Nothing on the live table
/// changes (it is only read, under ACCESS SHARE).
/// Builds the shadow; `rebuild_invalid`: the table's invalid indexes too (else left out).
pub async fn create(
    client: &Client,
    plan: &Plan,
    id: i64,
    retry: &RetryPolicy,
    rebuild_invalid: bool,
) -> Result<Spec, MigrateError> {
    let def = &plan.table_def;
    let volatile_using =
        volatile_using_columns(client, plan).await.map_err(|e| db(id, "checking USING expressions", e))?;
    let mut attempt = 1;
    let failure = loop {
        client
            .batch_execute(&format!("BEGIN; {}", retry.set_local()))
            .await
            .map_err(|e| db(id, "starting a transaction", e))?;
        let result = build(client, plan, id, &volatile_using, rebuild_invalid).await;
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        client.batch_execute(end).await.map_err(|e| db(id, "ending the shadow transaction", e))?;
        match result {
            Ok(spec) => return Ok(spec),
            Err(Failure::Database(_, e) | Failure::Rejected(e)) if is_lock_conflict(&e) && attempt < retry.attempts => {
                tracing::info!("creating the shadow table: lock not granted (attempt {attempt}), retrying");
                super::retry::pause_unless_closed(client, retry.pause(attempt)).await;
                attempt += 1;
            }
            Err(other) => break other,
        }
    };
    Err(match failure {
        Failure::Database(what, e) => db(id, what, e),
        Failure::Rejected(e) => MigrateError::Refused(format!(
            "PostgreSQL rejects the statement on the shadow table: {}; nothing was changed on {} (`ghostwire abort {}` \
             clears the migration record)",
            e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string()),
            def.name,
            def.name
        )),
        Failure::Refused(msg) => MigrateError::Refused(msg),
    })
}

fn db(id: i64, what: &str, e: tokio_postgres::Error) -> MigrateError {
    MigrateError::Database { id, phase: crate::state::Phase::Shadow, context: what.to_owned(), source: e }
}

/// Columns whose USING expression calls a volatile function (their values cannot be
/// compared by verification).
async fn volatile_using_columns(client: &Client, plan: &Plan) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for sub in &plan.parsed.subcommands {
        if let Action::AlterType { column, using: Some(span) } = &sub.action {
            let names: Vec<String> =
                expr::functions(plan.parsed.slice(span)).unwrap_or_default().into_iter().map(|(_, n)| n).collect();
            let row = client
                .query_one("SELECT coalesce(bool_or(provolatile = 'v'), false) FROM pg_catalog.pg_proc WHERE proname = ANY($1)", &[&names])
                .await?;
            if row.get::<_, bool>(0) {
                out.push(column.clone());
            }
        }
    }
    Ok(out)
}

async fn build(
    client: &Client,
    plan: &Plan,
    id: i64,
    volatile_using: &[String],
    rebuild_invalid: bool,
) -> Result<Spec, Failure> {
    let def = &plan.table_def;
    let work = spec::work_schema(id);
    let shadow = QualifiedName::new(&work, &def.name.name);
    let shadow_sql = shadow.sql();
    client.batch_execute(&format!("CREATE SCHEMA {}", ident(&work))).await?;
    client.batch_execute(&create_table_sql(def, &shadow)).await?;

    // LIKE copies every CHECK as validated: re-add those that were NOT VALID as such.
    for c in def.constraints.iter().filter(|c| c.kind == ConstraintKind::Check && !c.validated) {
        client
            .batch_execute(&format!(
                "ALTER TABLE {shadow_sql} DROP CONSTRAINT {name}, ADD CONSTRAINT {name} {}",
                c.definition,
                name = ident(&c.name)
            ))
            .await?;
    }
    // PostgreSQL 18's NOT VALID NOT NULL constraints hold for new rows only; LIKE made them
    // validated ones: off the shadow for the copy, re-added NOT VALID at the swap.
    let mut unvalidated_not_nulls = Vec::new();
    for c in def.constraints.iter().filter(|c| c.kind == ConstraintKind::NotNull && !c.validated) {
        client.batch_execute(&format!("ALTER TABLE {shadow_sql} DROP CONSTRAINT IF EXISTS {}", ident(&c.name))).await?;
        unvalidated_not_nulls.push((c.name.clone(), strip_not_valid(&c.definition)));
    }
    // Attribute options are not copied by LIKE.
    for c in def.columns.iter().filter(|c| !c.options.is_empty()) {
        client
            .batch_execute(&format!(
                "ALTER TABLE {shadow_sql} ALTER COLUMN {} SET ({})",
                ident(&c.name),
                c.options.join(", ")
            ))
            .await?;
    }
    for c in def.columns.iter().filter(|c| c.statistics_target.is_some()) {
        client
            .batch_execute(&format!(
                "ALTER TABLE {shadow_sql} ALTER COLUMN {} SET STATISTICS {}",
                ident(&c.name),
                c.statistics_target.unwrap_or(-1)
            ))
            .await?;
    }
    // The shadow's columns before the change, by attnum: LIKE keeps the order.
    let before: HashMap<i16, String> = client
        .query(
            "SELECT attnum, attname::text FROM pg_catalog.pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&shadow_sql],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    for idx in def.indexes.iter().filter(|i| i.is_valid || rebuild_invalid) {
        let index_sql =
            || parse::retarget_index(&idx.definition, &shadow_sql).map_err(|e| Failure::Refused(e.to_string()));
        let sql = match &idx.constraint {
            Some(con) => {
                let c = def.constraint(con).ok_or_else(|| Failure::Refused(format!("constraint {con} vanished")))?;
                match c.kind {
                    // Through its index, which keeps the index's storage options (the
                    // constraint's own definition leaves them out).
                    ConstraintKind::PrimaryKey | ConstraintKind::Unique => format!(
                        "{}; {}",
                        index_sql()?,
                        attach_sql(
                            &shadow_sql,
                            con,
                            c.kind == ConstraintKind::PrimaryKey,
                            &idx.name,
                            c.deferrable,
                            c.initially_deferred
                        )
                    ),
                    _ => format!("ALTER TABLE {shadow_sql} ADD CONSTRAINT {} {}", ident(con), c.definition),
                }
            }
            None => index_sql()?,
        };
        client.batch_execute(&sql).await?;
    }
    // Foreign keys the statement names must exist on the shadow for it to run.
    for name in constraint_names_used(plan) {
        if let Some(c) = def.constraint(&name).filter(|c| c.kind == ConstraintKind::ForeignKey) {
            let not_valid = if c.validated { " NOT VALID" } else { "" };
            client
                .batch_execute(&format!(
                    "ALTER TABLE {shadow_sql} ADD CONSTRAINT {} {}{not_valid}",
                    ident(&c.name),
                    c.definition
                ))
                .await?;
        }
    }

    // The user's own statement, spliced onto the shadow.
    client.batch_execute(&plan.parsed.spliced(&shadow_sql)).await.map_err(Failure::Rejected)?;

    client.batch_execute("SET LOCAL search_path = pg_catalog").await?;
    let columns = read_columns(client, &shadow_sql).await?;
    let (key, key_index) = key_spec(plan, &before, &columns, client, &shadow_sql).await?;
    let maps = column_maps(plan, &before, &columns, volatile_using);
    let deferred = defer_indexes(client, def, &shadow, &key_index).await?;
    let foreign_keys = foreign_keys(client, def, &shadow_sql, &before, &columns, plan).await?;
    let mut deferred_checks = defer_unvalidated_checks(client, &shadow_sql).await?;
    deferred_checks.extend(unvalidated_not_nulls);

    let kept: Vec<&String> =
        before.iter().filter(|(n, _)| columns.iter().any(|c| c.attnum == **n)).map(|(_, name)| name).collect();
    let dropped_columns = def.columns.iter().filter(|c| !kept.contains(&&c.name)).map(|c| c.name.clone()).collect();
    let retyped_columns = columns
        .iter()
        .filter_map(|s| {
            let orig = def.column(before.get(&s.attnum)?)?;
            let same = orig.type_oid == s.type_oid && orig.typmod == s.typmod;
            (!same).then(|| orig.name.clone())
        })
        .collect();
    Ok(Spec {
        migration_id: id,
        original: def.name.clone(),
        original_oid: def.oid,
        work_schema: work,
        archive_schema: spec::archive_schema(id),
        statement: plan.parsed.text.clone(),
        overriding_system_value: maps
            .iter()
            .any(|m| m.source.is_some() && columns.iter().any(|c| c.name == m.shadow && c.identity_always)),
        key,
        key_index,
        columns: maps,
        deferred_indexes: deferred,
        foreign_keys,
        deferred_checks,
        dropped_columns,
        retyped_columns,
        table: def.clone(),
    })
}

/// Autovacuum is off on the shadow while it is built: a vacuum there would take cores from the
/// copy, lock out the index builds until it is cancelled (after `deadlock_timeout`), and
/// block the swap. The swap restores the original's setting (`swap::script`). Only heap
/// tables have the setting.
pub fn pauses_autovacuum(def: &TableDef) -> bool {
    def.access_method.as_deref().is_none_or(|am| am == "heap")
}

/// An entry of `reloptions` that turns autovacuum on or off.
pub fn is_autovacuum_setting(option: &str) -> bool {
    option.starts_with("autovacuum_enabled=")
}

fn create_table_sql(def: &TableDef, shadow: &QualifiedName) -> String {
    let heap = pauses_autovacuum(def);
    let own = |o: &&String| !(heap && is_autovacuum_setting(o));
    let mut options: Vec<String> = def.reloptions.iter().filter(own).cloned().collect();
    options.extend(def.toast_reloptions.iter().filter(own).map(|o| format!("toast.{o}")));
    if heap {
        options.extend(["autovacuum_enabled=false".to_owned(), "toast.autovacuum_enabled=false".to_owned()]);
    }
    let unlogged = if def.persistence == Persistence::Unlogged { "UNLOGGED " } else { "" };
    let mut sql = format!(
        "CREATE {unlogged}TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED \
         INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMPRESSION INCLUDING COMMENTS)",
        shadow.sql(),
        def.name.sql()
    );
    if let Some(am) = def.access_method.as_deref().filter(|am| *am != "heap") {
        sql.push_str(&format!(" USING {}", ident(am)));
    }
    if !options.is_empty() {
        sql.push_str(&format!(" WITH ({})", options.join(", ")));
    }
    if let Some(ts) = &def.tablespace {
        sql.push_str(&format!(" TABLESPACE {}", ident(ts)));
    }
    sql
}

/// Makes the unique index `index` of `table` its primary key or unique constraint `name`.
fn attach_sql(table: &str, name: &str, primary: bool, index: &str, deferrable: bool, deferred: bool) -> String {
    let what = if primary { "PRIMARY KEY" } else { "UNIQUE" };
    let timing = match (deferrable, deferred) {
        (false, _) => "",
        (true, false) => " DEFERRABLE",
        (true, true) => " DEFERRABLE INITIALLY DEFERRED",
    };
    format!("ALTER TABLE {table} ADD CONSTRAINT {} {what} USING INDEX {}{timing}", ident(name), ident(index))
}

/// Constraint names the statement refers to by name.
pub(super) fn constraint_names_used(plan: &Plan) -> Vec<String> {
    plan.parsed
        .subcommands
        .iter()
        .filter_map(|s| match &s.action {
            Action::DropConstraint { name, .. }
            | Action::ValidateConstraint { name }
            | Action::AlterConstraint { name } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

async fn read_columns(client: &Client, shadow_sql: &str) -> Result<Vec<ShadowColumn>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, a.atttypmod,
                    CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                         THEN quote_ident(n.nspname) || '.' || quote_ident(co.collname) END,
                    a.attgenerated <> '', a.attidentity = 'a'
               FROM pg_attribute a
               JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN pg_collation co ON co.oid = a.attcollation
               LEFT JOIN pg_namespace n ON n.oid = co.collnamespace
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&shadow_sql],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ShadowColumn {
            attnum: r.get(0),
            name: r.get(1),
            type_sql: r.get(2),
            type_oid: r.get(3),
            typmod: r.get(4),
            collation: r.get(5),
            generated: r.get(6),
            identity_always: r.get(7),
        })
        .collect())
}

/// The USING expression given for `column`, if any.
fn using_for<'a>(plan: &'a Plan, column: &str) -> Option<&'a str> {
    plan.parsed.subcommands.iter().find_map(|s| match &s.action {
        Action::AlterType { column: c, using: Some(span) } if c == column => Some(plan.parsed.slice(span)),
        _ => None,
    })
}

/// Integer and text families: a cast between members keeps the order.
fn same_order_family(a: u32, b: u32) -> bool {
    const INTEGERS: [u32; 4] = [21, 23, 20, 1700]; // int2, int4, int8, numeric
    const TEXTS: [u32; 2] = [25, 1043]; // text, varchar
    (INTEGERS.contains(&a) && INTEGERS.contains(&b)) || (TEXTS.contains(&a) && TEXTS.contains(&b))
}

async fn key_spec(
    plan: &Plan,
    before: &HashMap<i16, String>,
    columns: &[ShadowColumn],
    client: &Client,
    shadow_sql: &str,
) -> Result<(Vec<KeyColumn>, String), Failure> {
    let def = &plan.table_def;
    let key = def.key.as_ref().ok_or_else(|| Failure::Refused(format!("{} has no key to copy by", def.name)))?;
    let mut out = Vec::new();
    for name in &key.columns {
        let orig: &Column = def.column(name).ok_or_else(|| Failure::Refused(format!("key column {name} vanished")))?;
        let shadow = before
            .iter()
            .find(|(_, n)| *n == name)
            .and_then(|(attnum, _)| columns.iter().find(|c| c.attnum == *attnum))
            .ok_or_else(|| {
                Failure::Refused(format!("the change drops key column {name}; change the key separately"))
            })?;
        let using = using_for(plan, name);
        let same_type = orig.type_oid == shadow.type_oid && orig.typmod == shadow.typmod;
        let same_collation = orig.collation == shadow.collation;
        let to_shadow = match using {
            Some(expr) => {
                let refs = expr::column_refs(expr).map_err(|e| Failure::Refused(e.to_string()))?;
                if let Some(other) = refs.iter().find(|r| !key.columns.contains(r)) {
                    return Err(Failure::Refused(format!(
                        "the USING expression of key column {name} refers to column {other}: ghostwire can only \
                         convert key columns from key columns; change the key separately"
                    )));
                }
                format!("({expr})")
            }
            None if same_type => ident(name),
            None => format!("CAST({} AS {})", ident(name), shadow.type_sql),
        };
        // Compare in the shadow's collation (mixing two implicit collations is an error).
        let to_shadow = if same_collation {
            to_shadow
        } else {
            format!("({to_shadow}) COLLATE {}", shadow.collation.as_deref().unwrap_or("pg_catalog.\"default\""))
        };
        out.push(KeyColumn {
            name: name.clone(),
            type_sql: orig.type_name.clone(),
            collation: orig.collation.clone(),
            shadow_name: shadow.name.clone(),
            shadow_type_sql: shadow.type_sql.clone(),
            order_preserving: using.is_none()
                && same_collation
                && (same_type || same_order_family(orig.type_oid, shadow.type_oid)),
            to_shadow,
        });
    }
    // The key index must still be there, on the same columns.
    let row = client
        .query_opt(
            "SELECT ARRAY(SELECT a.attname::text FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = $1::text::regclass AND c.relname = $2 AND i.indisunique",
            &[&shadow_sql, &key.index_name],
        )
        .await?;
    let shadow_key: Vec<String> = out.iter().map(|k| k.shadow_name.clone()).collect();
    match row {
        Some(r) if r.get::<_, Vec<String>>(0) == shadow_key => Ok((out, key.index_name.clone())),
        _ => Err(Failure::Refused(format!(
            "the change removes or alters the key index {} that ghostwire copies by; change the key in a separate migration",
            key.index_name
        ))),
    }
}

fn column_maps(
    plan: &Plan,
    before: &HashMap<i16, String>,
    columns: &[ShadowColumn],
    volatile_using: &[String],
) -> Vec<ColumnMap> {
    columns
        .iter()
        .map(|c| {
            let original = before.get(&c.attnum);
            let source = match original {
                _ if c.generated => None,
                Some(name) => Some(using_for(plan, name).map(str::to_owned).unwrap_or_else(|| ident(name))),
                None => None,
            };
            let compare = source.is_some() && original.is_some_and(|n| !volatile_using.contains(n));
            ColumnMap { shadow: c.name.clone(), shadow_type_sql: c.type_sql.clone(), source, compare }
        })
        .collect()
}

/// Records and drops the shadow's indexes and index-backed constraints, the key's included:
/// they are built after the copy, which is several times faster than maintaining them row by
/// row (nothing reads the shadow by key until the catch-up, after the index phase; the copy's
/// exactness comes from each chunk committing with its checkpoint).
async fn defer_indexes(
    client: &Client,
    def: &TableDef,
    shadow: &QualifiedName,
    key_index: &str,
) -> Result<Vec<DeferredIndex>, tokio_postgres::Error> {
    let shadow_sql = shadow.sql();
    let rows = client
        .query(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid), con.conname::text, pg_get_constraintdef(con.oid),
                    con.contype::text, coalesce(con.condeferrable, false), coalesce(con.condeferred, false)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                          AND con.contype IN ('p', 'u', 'x')
              WHERE i.indrelid = $1::text::regclass
              ORDER BY c.relname = $2 DESC, c.relname",
            &[&shadow_sql, &key_index],
        )
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        let name: String = r.get(0);
        let index_sql: String = r.get(1);
        let drop_index = format!("DROP INDEX {}.{}", ident(&shadow.schema), ident(&name));
        let (sql, attach, drop) = match (r.get::<_, Option<String>>(2), r.get::<_, Option<String>>(4)) {
            // A primary key or unique constraint: its index is built like any other, then
            // made the constraint.
            (Some(con), Some(kind)) if kind == "p" || kind == "u" => {
                let attach = attach_sql(&shadow_sql, &con, kind == "p", &name, r.get(5), r.get(6));
                (
                    index_sql,
                    Some((con.clone(), attach)),
                    format!("ALTER TABLE {shadow_sql} DROP CONSTRAINT {}", ident(&con)),
                )
            }
            // An exclusion constraint cannot be attached to an index: built as itself.
            (Some(con), _) => (
                format!("ALTER TABLE {shadow_sql} ADD CONSTRAINT {} {}", ident(&con), r.get::<_, String>(3)),
                None,
                format!("ALTER TABLE {shadow_sql} DROP CONSTRAINT {}", ident(&con)),
            ),
            (None, _) => (index_sql, None, drop_index),
        };
        client.batch_execute(&drop).await?;
        let tablespace = def.indexes.iter().find(|i| i.name == name).and_then(|i| i.tablespace.clone());
        out.push(DeferredIndex { name, sql, attach, tablespace });
    }
    Ok(out)
}

/// `COMMENT ON … IS '…'` text for a comment (DDL takes no parameters).
pub fn comment_literal(comment: &Option<String>) -> String {
    comment.as_deref().map(literal).unwrap_or_else(|| "NULL".into())
}
