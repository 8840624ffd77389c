//! Connecting to the target database.

use thiserror::Error;
use tokio_postgres::{Client, Config, NoTls};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("no database given: pass --database-url postgres://user@host:port/dbname or set DATABASE_URL")]
    Missing,
    #[error("invalid database URL: {0}")]
    Invalid(tokio_postgres::Error),
    #[error("could not connect to the database: {0}")]
    Connect(tokio_postgres::Error),
}

/// Parses a libpq URL or keyword/value string and names the session `ghostwire` (or `name`).
pub fn config(url: Option<&str>, application_name: &str) -> Result<Config, ConnectError> {
    let url = url.filter(|u| !u.is_empty()).ok_or(ConnectError::Missing)?;
    let mut config: Config = url.parse().map_err(ConnectError::Invalid)?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    Ok(config)
}

/// Connects; the connection is driven by a spawned task until the client is dropped.
pub async fn connect(config: &Config) -> Result<Client, ConnectError> {
    let (client, connection) = config.connect(NoTls).await.map_err(ConnectError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("database connection closed: {e}");
        }
    });
    Ok(client)
}
