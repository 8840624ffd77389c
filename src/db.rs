//! Connecting to the target database.

use thiserror::Error;
use tokio_postgres::{Client, Config, NoTls};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("no database given: pass --database-url postgres://user@host:port/dbname or set DATABASE_URL")]
    Missing,
    #[error("invalid database URL: {}", describe(.0))]
    Invalid(tokio_postgres::Error),
    #[error("could not connect to the database: {}", describe(.0))]
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

/// PostgreSQL's own words for an error: message, detail and hint (tokio-postgres's
/// `Display` says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_owned();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// A database error displayed with the server's message.
#[derive(Debug)]
pub struct DbError(pub tokio_postgres::Error);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
