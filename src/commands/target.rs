//! Finding the migration a command is about, from a TABLE argument.

use tokio_postgres::Client;

use super::CommandError;
use crate::plan::parse;
use crate::sql::QualifiedName;
use crate::state::{self, Migration};

/// The unfinished migration of `table` (`orders`, `public.orders`, `"Sales"."Order Items"`):
/// by schema and name when given, else by name among the unfinished migrations (the table
/// itself may be mid-swap), else through the search_path.
pub async fn active(client: &Client, table: &str) -> Result<Migration, CommandError> {
    let (schema, name) = parse::table_name(table).map_err(CommandError::refused)?;
    if !state::schema_exists(client).await.map_err(CommandError::failed)? {
        return Err(CommandError::refused(format!(
            "no ghostwire migration has run in this database (looking for {table})"
        )));
    }
    let candidates: Vec<Migration> = state::list(client, None, 0)
        .await
        .map_err(CommandError::failed)?
        .into_iter()
        .filter(|m| m.table.name == name && schema.as_ref().is_none_or(|s| *s == m.table.schema))
        .collect();
    match candidates.len() {
        1 => return Ok(candidates.into_iter().next().unwrap_or_else(|| unreachable!())),
        0 => {}
        _ => {
            let names: Vec<String> = candidates.iter().map(|m| m.table.to_string()).collect();
            return Err(CommandError::refused(format!(
                "{table} is ambiguous: unfinished migrations exist for {}; qualify it with its schema",
                names.join(" and ")
            )));
        }
    }
    let shown = match &schema {
        Some(s) => QualifiedName::new(s, &name).to_string(),
        None => name.clone(),
    };
    Err(CommandError::refused(format!(
        "there is no unfinished migration of {shown}; `ghostwire status` lists the migrations"
    )))
}
