//! Finding the migration a command is about, from a TABLE argument.

use tokio_postgres::Client;

use super::CommandError;
use crate::plan::parse;
use crate::state::{self, Migration};

/// The unfinished migration of `table` (`orders`, `public.orders`, `"Sales"."Order Items"`).
pub async fn active(client: &Client, table: &str) -> Result<Migration, CommandError> {
    let (schema, name) = parse::table_name(table).map_err(CommandError::refused)?;
    if !state::schema_exists(client).await.map_err(CommandError::failed)? {
        return Err(CommandError::refused(format!(
            "no ghostwire migration has run in this database (looking for {table})"
        )));
    }
    state::find_active(client, schema.as_deref(), &name)
        .await
        .map_err(CommandError::failed)?
        .map_err(CommandError::refused)
}

/// The unfinished backfill of `table`, if that is what its unfinished run is (None also
/// when there is no ghostwire state or no such run: the migration path says why).
pub async fn backfill_of(url: Option<&str>, table: &str) -> Result<Option<Migration>, CommandError> {
    let config = crate::connect::params(url, "ghostwire resume")?;
    let client = crate::connect::connect(&config).await?;
    let (schema, name) = parse::table_name(table).map_err(CommandError::refused)?;
    if !state::schema_exists(&client).await.map_err(CommandError::failed)? {
        return Ok(None);
    }
    let found = state::find_active(&client, schema.as_deref(), &name).await.map_err(CommandError::failed)?;
    Ok(found.ok().filter(|m| m.strategy == crate::backfill::STRATEGY))
}
