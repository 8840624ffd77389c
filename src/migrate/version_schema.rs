//! `migrate --version-schema SCHEMA`: a rename or drop that old and new application code
//! can run beside each other (expand, then contract).
//!
//! Expand: the table is left as it is; `SCHEMA` gets one view per relation of the table's
//! schema, the changed table's showing its new shape (renamed columns under their new
//! names, dropped ones left out), each a plain `SELECT` of the columns, so PostgreSQL makes
//! it automatically updatable (INSERT, UPDATE, DELETE, RETURNING, ON CONFLICT; a column left
//! out of an INSERT gets the table's own default, identity included), `security_invoker`
//! where the server has it (15+), with the relation's grants and comments. New code puts
//! `SCHEMA` first in its search_path; old code keeps using the table. The migration waits
//! in phase `swapped` (strategy `version`).
//!
//! Contract (`finish`): in one transaction under a short lock_timeout, with retries, the
//! changed table's view goes and the statement runs on the table: from then on the new
//! names resolve in the table's own schema, with the same names, types and defaults the
//! view showed; then the other views (plain pass-throughs) and the schema go, one at a
//! time. Abort: the views and the schema go, the table as it was.

use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;
use tokio_postgres::Client;

use super::error::MigrateError;
use super::retry::{self, RetryPolicy};
use crate::catalog::TableDef;
use crate::plan::Plan;
use crate::plan::parse::Action;
use crate::sql::{QualifiedName, ident};
use crate::state::{self, Migration, Phase};

/// A change a version schema shows before it is made.
pub struct Change {
    pub table: QualifiedName,
    pub def: TableDef,
    pub statement: String,
    /// The changed table's columns in the view: (column, its name there), in order.
    columns: Vec<(String, String)>,
    /// The changed table's name in the version schema (its new name, for a RENAME TO).
    view_name: String,
    /// `ALTER COLUMN c SET DEFAULT …` of a column the statement drops: run on the table at
    /// expand (inserts through the version schema leave the column out, and a NOT NULL one
    /// needs a value), undone by abort, left out of the statement `finish` runs.
    /// (column, the subcommand's text, the column's default before).
    defaults: Vec<(String, String, Option<String>)>,
}

impl Change {
    /// A RENAME COLUMN or DROP COLUMN statement, as planned.
    pub fn from_plan(plan: &Plan) -> Result<Change, MigrateError> {
        let defaults = expand_defaults(plan)?;
        let statement = if defaults.is_empty() {
            plan.statement.clone()
        } else {
            // The dropped columns' defaults are set at expand; finish drops the columns.
            let rest: Vec<&str> = (0..plan.parsed.subcommands.len())
                .filter(|&i| !matches!(plan.parsed.subcommands[i].action, Action::SetDefault { .. }))
                .map(|i| plan.parsed.subcommand_text(i).trim())
                .collect();
            format!("ALTER TABLE {} {}", plan.table.sql(), rest.join(", "))
        };
        Ok(Change {
            table: plan.table.clone(),
            def: plan.table_def.clone(),
            statement,
            columns: view_columns(plan, &defaults)?,
            view_name: plan.table.name.clone(),
            defaults,
        })
    }

    /// `ALTER TABLE … RENAME TO …` (which `plan` does not take), or None for another statement.
    pub async fn table_rename(client: &mut Client, sql: &str) -> Result<Option<Change>, MigrateError> {
        let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else { return Ok(None) };
        let [raw] = &parsed.protobuf.stmts[..] else { return Ok(None) };
        let Some(NodeEnum::RenameStmt(stmt)) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else { return Ok(None) };
        let Some(rel) = stmt.relation.as_ref().filter(|_| stmt.rename_type == ObjectType::ObjectTable as i32) else {
            return Ok(None);
        };
        let schema = Some(rel.schemaname.as_str()).filter(|s| !s.is_empty());
        let refused = |e: crate::catalog::CatalogError| MigrateError::Refused(e.to_string());
        let (oid, _) = crate::catalog::resolve(&*client, schema, &rel.relname).await.map_err(refused)?;
        let def = crate::catalog::inspect(client, oid).await.map_err(refused)?;
        let taken: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&QualifiedName::new(&def.name.schema, &stmt.newname).sql()],
            )
            .await
            .map_err(|e| MigrateError::Refused(crate::connect::describe(&e)))?
            .get(0);
        if taken {
            return Err(MigrateError::Refused(format!("relation {} exists already", ident(&stmt.newname))));
        }
        Ok(Some(Change {
            table: def.name.clone(),
            columns: def.columns.iter().map(|c| (c.name.clone(), c.name.clone())).collect(),
            statement: sql.trim().trim_end_matches(';').trim().to_owned(),
            view_name: stmt.newname.clone(),
            def,
            defaults: Vec::new(),
        }))
    }
}

/// The statement's `SET DEFAULT`s, each of a column it drops (anything else is refused).
fn expand_defaults(plan: &Plan) -> Result<Vec<(String, String, Option<String>)>, MigrateError> {
    let dropped = |name: &str| {
        plan.parsed.subcommands.iter().any(|s| matches!(&s.action, Action::DropColumn { column, .. } if column == name))
    };
    let mut defaults = Vec::new();
    for (i, sub) in plan.parsed.subcommands.iter().enumerate() {
        let Action::SetDefault { column } = &sub.action else { continue };
        let text = plan.parsed.subcommand_text(i).trim();
        if !dropped(column) {
            return Err(MigrateError::Refused(format!(
                "`{text}` cannot go through a version schema: a SET DEFAULT can only go with a DROP COLUMN of the \
                 same column (run it without --version-schema)"
            )));
        }
        let before = plan.table_def.columns.iter().find(|c| &c.name == column).and_then(|c| c.default.clone());
        defaults.push((column.clone(), text.to_owned(), before));
    }
    Ok(defaults)
}

/// What the new shape of the changed table is: (column, its name in the view), in order.
fn view_columns(
    plan: &Plan,
    defaults: &[(String, String, Option<String>)],
) -> Result<Vec<(String, String)>, MigrateError> {
    let mut columns: Vec<(String, String)> =
        plan.table_def.columns.iter().map(|c| (c.name.clone(), c.name.clone())).collect();
    for sub in &plan.parsed.subcommands {
        match &sub.action {
            Action::RenameColumn { from, to } => match columns.iter_mut().find(|(_, shown)| shown == from) {
                Some(c) => c.1 = to.clone(),
                None => return Err(MigrateError::Refused(format!("column {} does not exist", ident(from)))),
            },
            Action::SetDefault { .. } => {}
            Action::DropColumn { column, .. } => {
                let def = plan.table_def.columns.iter().find(|c| &c.name == column);
                let given = defaults.iter().any(|(c, _, _)| c == column);
                if let Some(c) = def.filter(|c| c.not_null && c.default.is_none() && c.identity.is_none() && !given) {
                    return Err(MigrateError::Refused(format!(
                        "column {c} is NOT NULL without a default: inserts through the version schema (which \
                         leaves it out) would fail. Give it a default as part of the expand, in the same statement: \
                         `ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT <value>, DROP COLUMN {c}` (abort takes the \
                         default away again); or drop the NOT NULL first",
                        c = ident(&c.name),
                        t = plan.table.sql(),
                    )));
                }
                columns.retain(|(_, shown)| shown != column);
            }
            _ => {
                return Err(MigrateError::Refused(format!(
                    "`{}` cannot go through a version schema: only RENAME COLUMN and DROP COLUMN can (run it \
                     without --version-schema)",
                    plan.parsed.text[sub.span.clone()].trim()
                )));
            }
        }
    }
    Ok(columns)
}

/// The statements that build `schema` (in one transaction).
async fn expand_sql(client: &Client, change: &Change, schema: &str) -> Result<String, MigrateError> {
    let db = |e: tokio_postgres::Error| {
        MigrateError::Refused(format!("reading the schema: {}", crate::connect::describe(&e)))
    };
    let table = &change.table;
    let server: i32 =
        client.query_one("SHOW server_version_num", &[]).await.map_err(db)?.get::<_, String>(0).parse().unwrap_or(0);
    let with = if server >= 150000 { " WITH (security_invoker = true)" } else { "" };
    let mut sql: Vec<String> =
        change.defaults.iter().map(|(_, text, _)| format!("ALTER TABLE {} {text}", table.sql())).collect();
    sql.push(format!("CREATE SCHEMA {}", ident(schema)));
    // USAGE on the version schema for whoever has it on the table's.
    let usage = client
        .query(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
               FROM pg_namespace n, aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
              WHERE n.nspname = $1 AND a.privilege_type = 'USAGE'",
            &[&table.schema],
        )
        .await
        .map_err(db)?;
    for r in usage {
        sql.push(format!("GRANT USAGE ON SCHEMA {} TO {}", ident(schema), r.get::<_, String>(0)));
    }
    // Every relation with what its view carries over, in one query: (privilege, grantee)
    // pairs and (column, comment) pairs as parallel arrays.
    let relations = client
        .query(
            "SELECT c.relname::text,
                    array(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
                    obj_description(c.oid, 'pg_class'),
                    array(SELECT g.privilege_type FROM aclexplode(c.relacl) g WHERE g.privilege_type IN {PRIVILEGES}
                           ORDER BY g.grantee, g.privilege_type),
                    array(SELECT CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(g.grantee)) END
                            FROM aclexplode(c.relacl) g WHERE g.privilege_type IN {PRIVILEGES}
                           ORDER BY g.grantee, g.privilege_type),
                    array(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                             AND col_description(c.oid, a.attnum) IS NOT NULL ORDER BY a.attnum),
                    array(SELECT col_description(c.oid, a.attnum) FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                             AND col_description(c.oid, a.attnum) IS NOT NULL ORDER BY a.attnum)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
              ORDER BY c.relname"
                .replace(
                    "{PRIVILEGES}",
                    "('SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER')",
                )
                .as_str(),
            &[&table.schema],
        )
        .await
        .map_err(db)?;
    for r in relations {
        let (name, attnames, comment): (String, Vec<String>, Option<String>) = (r.get(0), r.get(1), r.get(2));
        let (privileges, grantees): (Vec<String>, Vec<String>) = (r.get(3), r.get(4));
        let (described, texts): (Vec<String>, Vec<String>) = (r.get(5), r.get(6));
        let source = QualifiedName::new(&table.schema, &name);
        let changed = name == table.name;
        let view = QualifiedName::new(schema, if changed { &change.view_name } else { &name });
        let columns: Vec<(String, String)> =
            if changed { change.columns.clone() } else { attnames.iter().map(|a| (a.clone(), a.clone())).collect() };
        let list: Vec<String> = columns
            .iter()
            .map(|(c, shown)| if c == shown { ident(c) } else { format!("{} AS {}", ident(c), ident(shown)) })
            .collect();
        sql.push(format!("CREATE VIEW {}{with} AS SELECT {} FROM {}", view.sql(), list.join(", "), source.sql()));
        if let Some(c) = comment {
            sql.push(format!("COMMENT ON VIEW {} IS {}", view.sql(), crate::sql::literal(&c)));
        }
        for (privilege, grantee) in privileges.iter().zip(&grantees) {
            sql.push(format!("GRANT {privilege} ON {} TO {grantee}", view.sql()));
        }
        for (col, text) in described.iter().zip(&texts) {
            if let Some((_, shown)) = columns.iter().find(|(name, _)| name == col) {
                let target = format!("{}.{}", view.sql(), ident(shown));
                sql.push(format!("COMMENT ON COLUMN {target} IS {}", crate::sql::literal(text)));
            }
        }
    }
    Ok(sql.join(";\n"))
}

/// Expands: builds `schema` and records the migration, waiting for `finish`.
pub async fn expand(control: &Client, change: &Change, schema: &str, retry: &RetryPolicy) -> Result<i64, MigrateError> {
    let exists: bool = control
        .query_one("SELECT to_regnamespace($1) IS NOT NULL", &[&ident(schema)])
        .await
        .map_err(|e| MigrateError::Refused(crate::connect::describe(&e)))?
        .get(0);
    if exists {
        return Err(MigrateError::Refused(format!(
            "schema {} exists already: name a new one for the version schema",
            ident(schema)
        )));
    }
    let sql = expand_sql(control, change, schema).await?;
    let def = &change.def;
    let defaults: Vec<_> =
        change.defaults.iter().map(|(c, _, before)| serde_json::json!({ "column": c, "before": before })).collect();
    let settings = serde_json::json!({ "version_schema": schema, "view": change.view_name, "defaults": defaults });
    let database =
        |phase, context: &str, source| MigrateError::Database { id: 0, phase, context: context.into(), source };
    let id = state::insert_migration(
        control,
        &def.name,
        def.oid,
        &change.statement,
        "version",
        def.estimated_rows,
        &settings,
    )
    .await
    .map_err(|e| database(Phase::Planned, "recording the migration", e))?;
    retry::ddl(control, retry, "creating the version schema", &sql).await.map_err(|e| MigrateError::Database {
        id,
        phase: Phase::Planned,
        context: "creating the version schema".into(),
        source: e,
    })?;
    let message = format!(
        "version schema {} open: new code uses search_path={},{}; `ghostwire finish {}` applies the change once no \
         old code runs",
        ident(schema),
        ident(schema),
        ident(&change.table.schema),
        change.table
    );
    state::set_phase(control, id, Phase::Swapped, &message).await.map_err(|e| MigrateError::Database {
        id,
        phase: Phase::Swapped,
        context: "recording the phase".into(),
        source: e,
    })?;
    Ok(id)
}

/// The version schema of a migration, when it went through one.
pub fn of(m: &Migration) -> Option<String> {
    (m.strategy == "version").then(|| m.settings["version_schema"].as_str().map(str::to_owned)).flatten()
}

/// The views in `schema`, qualified and quoted.
async fn views(client: &Client, schema: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind = 'v' ORDER BY c.relname",
            &[&schema],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Drops the views left in `schema`, one transaction each (so that none waits on two
/// relations at once, in an order an application transaction may take the other way),
/// then the schema (RESTRICT: an object someone else put there stops it, with the error).
async fn drop_schema(client: &Client, schema: &str, retry: &RetryPolicy) -> Result<(), tokio_postgres::Error> {
    for view in views(client, schema).await? {
        retry::ddl(client, retry, &format!("dropping {view}"), &format!("DROP VIEW IF EXISTS {view}")).await?;
    }
    retry::ddl(client, retry, "dropping the version schema", &format!("DROP SCHEMA IF EXISTS {}", ident(schema))).await
}

/// Contract: the changed table's view goes and the statement runs, in one transaction (the
/// view's lock first, then the table's, as a statement through the view takes them); from
/// then on new code finds the table itself. Then the other views and the schema go.
pub async fn contract(
    client: &Client,
    m: &Migration,
    schema: &str,
    retry: &RetryPolicy,
) -> Result<(), tokio_postgres::Error> {
    let view = QualifiedName::new(schema, m.settings["view"].as_str().unwrap_or(&m.table.name));
    let sql = format!("DROP VIEW IF EXISTS {};\n{}", view.sql(), m.statement);
    retry::ddl(client, retry, "applying the change", &sql).await?;
    drop_schema(client, schema, retry).await
}

/// Abort: the views and the schema go, and the defaults the expand set are put back as
/// they were; the table is as it was.
pub async fn remove(
    client: &Client,
    m: &Migration,
    schema: &str,
    retry: &RetryPolicy,
) -> Result<(), tokio_postgres::Error> {
    drop_schema(client, schema, retry).await?;
    for d in m.settings["defaults"].as_array().into_iter().flatten() {
        let Some(column) = d["column"].as_str() else { continue };
        let restore = match d["before"].as_str() {
            Some(expr) => format!("SET DEFAULT {expr}"),
            None => "DROP DEFAULT".to_owned(),
        };
        let sql = format!("ALTER TABLE {} ALTER COLUMN {} {restore}", m.table.sql(), ident(column));
        retry::ddl(client, retry, &format!("restoring the default of {}", ident(column)), &sql).await?;
    }
    Ok(())
}
