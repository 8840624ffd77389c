//! Planning `CREATE [UNIQUE] INDEX`, `DROP INDEX` and `REINDEX INDEX`: the table they
//! concern, what a plain run would lock against what ghostwire's concurrent run locks, and
//! the refusals (an index name taken by another relation, an index a constraint needs). A
//! `CREATE INDEX` is tried first on an empty probe table, so a wrong column or operator
//! class is refused before anything runs.

use tokio_postgres::Client;

use super::parse::{Action, ParsedStatement};
use super::{Plan, PlanError, ProbeOutcome, Strategy, classify, privileges};
use crate::catalog::{self, TableDef};
use crate::sql::{QualifiedName, display_ident, ident};

/// The index a `DROP INDEX` or `REINDEX INDEX` names, if it exists.
struct NamedIndex {
    table_oid: u32,
    name: QualifiedName,
    valid: bool,
    constraint: Option<String>,
}

async fn named_index(client: &Client, schema: Option<&str>, name: &str) -> Result<Option<NamedIndex>, PlanError> {
    let text = match schema {
        Some(s) => format!("{}.{}", ident(s), ident(name)),
        None => ident(name),
    };
    let row = client
        .query_opt(
            "SELECT i.indrelid, n.nspname::text, c.relname::text, i.indisvalid,
                    (SELECT conname::text FROM pg_catalog.pg_constraint WHERE conindid = i.indexrelid AND contype IN ('p', 'u', 'x'))
               FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE i.indexrelid = pg_catalog.to_regclass($1)",
            &[&text],
        )
        .await?;
    Ok(row.map(|r| NamedIndex {
        table_oid: r.get(0),
        name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
        valid: r.get(3),
        constraint: r.get(4),
    }))
}

/// Plans an index statement (see the module).
/// `resuming`: the statement of a migration that stopped, whose index may exist already.
pub(super) async fn plan(client: &mut Client, parsed: ParsedStatement, resuming: bool) -> Result<Plan, PlanError> {
    let action = parsed.subcommands[0].action.clone();
    let mut warnings = Vec::new();
    let oid = match &action {
        Action::CreateIndex { .. } => {
            catalog::resolve(client, parsed.table.schema.as_deref(), &parsed.table.name).await?.0
        }
        Action::DropIndex { schema, name, .. } | Action::Reindex { schema, name } => {
            let if_exists = matches!(action, Action::DropIndex { if_exists: true, .. });
            let shown = match schema {
                Some(s) => QualifiedName::new(s, name).to_string(),
                None => display_ident(name),
            };
            let Some(index) = named_index(client, schema.as_deref(), name).await? else {
                let nothing = if if_exists { " (IF EXISTS: there is nothing to do)" } else { "" };
                return Err(PlanError::Refused(format!("index {shown} does not exist{nothing}")));
            };
            if let (Action::DropIndex { .. }, Some(constraint)) = (&action, &index.constraint) {
                return Err(PlanError::Refused(format!(
                    "index {} belongs to constraint {}: drop the constraint instead (`ALTER TABLE … DROP CONSTRAINT {}`), \
                     and the index goes with it",
                    index.name,
                    display_ident(constraint),
                    ident(constraint)
                )));
            }
            if matches!(action, Action::Reindex { .. }) && !index.valid {
                warnings.push(format!(
                    "index {} is invalid: REINDEX CONCURRENTLY builds it valid (where the data allows)",
                    index.name
                ));
            }
            index.table_oid
        }
        _ => return Err(PlanError::Refused("not an index statement".into())),
    };
    let def = catalog::inspect(client, oid).await?;
    super::check_version(&def, &mut warnings)?;
    super::refuse_table(&def)?;
    if let Action::CreateIndex { name: Some(name), if_not_exists, .. } = &action {
        match def.indexes.iter().find(|i| &i.name == name) {
            Some(i) if !i.is_valid => warnings.push(format!(
                "index {} already exists and is invalid (a failed build): `migrate` replaces it only with --yes",
                display_ident(name)
            )),
            Some(_) if *if_not_exists => {
                warnings.push(format!("index {} already exists: there is nothing to do", display_ident(name)))
            }
            Some(_) if resuming => {}
            _ => {
                let taken: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                         WHERE n.nspname = $1 AND c.relname = $2)",
                        &[&def.name.schema, name],
                    )
                    .await?
                    .get(0);
                if taken {
                    return Err(PlanError::Refused(format!(
                        "relation {} already exists in schema {}",
                        display_ident(name),
                        display_ident(&def.name.schema)
                    )));
                }
            }
        }
    }
    if let Some(message) = probe_create(client, &def, &parsed).await? {
        return Err(PlanError::Refused(format!("PostgreSQL rejects `{}`: {message}", parsed.text)));
    }
    let step = classify::classify(&def, &parsed.text, &action, &ProbeOutcome::Skipped, None);
    let summary = match &action {
        Action::CreateIndex { unique, .. } => format!(
            "build the index concurrently on {} (reads and writes go on); a failed build{} is dropped again, leaving \
             no invalid index",
            def.name,
            if *unique { " (a duplicate, say)" } else { "" }
        ),
        Action::DropIndex { .. } => format!("drop the index concurrently from {}", def.name),
        _ => format!("rebuild the index concurrently on {}, then swap it in", def.name),
    };
    let privileges = privileges::check(client, &def, Strategy::Online).await?;
    Ok(Plan {
        capture: Vec::new(),
        statement: parsed.text.clone(),
        table: def.name.clone(),
        strategy: Strategy::Online,
        summary,
        revertible: true,
        revert_notes: Vec::new(),
        key: None,
        estimated_rows: def.estimated_rows,
        table_bytes: def.table_bytes,
        index_bytes: def.index_bytes,
        total_bytes: def.total_bytes,
        disk_needed_bytes: 0,
        carried_over: Vec::new(),
        warnings,
        privileges,
        steps: vec![step],
        parsed,
        table_def: def,
    })
}

/// Builds the index on an empty temporary table shaped like the original, in a transaction
/// that is rolled back: PostgreSQL's message if it refuses.
async fn probe_create(
    client: &mut Client,
    def: &TableDef,
    parsed: &ParsedStatement,
) -> Result<Option<String>, tokio_postgres::Error> {
    let Action::CreateIndex { unique, .. } = &parsed.subcommands[0].action else { return Ok(None) };
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'; SET LOCAL statement_timeout = '30s'").await?;
    let probe = format!("pg_temp.{}", ident(&def.name.name));
    tx.batch_execute(&format!(
        "CREATE TEMPORARY TABLE {probe} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED)",
        def.name.sql()
    ))
    .await?;
    let unique = if *unique { "UNIQUE " } else { "" };
    let sql = format!("CREATE {unique}INDEX ON {probe}{}", &parsed.text[parsed.table.span.end..]);
    let outcome = match tx.batch_execute(&sql).await {
        Ok(()) => None,
        Err(e) => match e.as_db_error() {
            Some(db) => Some(db.message().to_owned()),
            None => return Err(e),
        },
    };
    tx.rollback().await?;
    Ok(outcome)
}
