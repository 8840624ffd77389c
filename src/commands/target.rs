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
