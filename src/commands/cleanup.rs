//! `ghostwire abort TABLE`, `ghostwire revert TABLE` and `ghostwire finish TABLE`.

use super::{CommandError, target};
use crate::migrate::cleanup::{self, CleanupError};
use crate::migrate::proxies::Proxies;
use crate::migrate::retry::RetryPolicy;
use crate::{connect, state};

fn classify(e: CleanupError) -> CommandError {
    match e {
        CleanupError::Database(_) | CleanupError::StillRunning { .. } => CommandError::failed(e),
        _ => CommandError::refused(e),
    }
}

/// Takes the table's advisory lock, refusing while another ghostwire process holds it.
async fn take_table(client: &tokio_postgres::Client, m: &state::Migration) -> Result<(), CommandError> {
    if state::try_lock_table(client, &m.table).await.map_err(CommandError::failed)? {
        return Ok(());
    }
    let pid = state::lock_holder(client, &m.table).await.ok().flatten().unwrap_or(0);
    Err(CommandError::refused(format!(
        "a ghostwire process (backend pid {pid}) is still working on {}; wait for it to end",
        m.table
    )))
}

pub async fn abort(url: Option<&str>, table: &str) -> Result<(), CommandError> {
    let config = connect::params(url, "ghostwire abort")?;
    let client = connect::connect(&config).await?;
    let m = target::active(&client, table).await?;
    if m.strategy == crate::backfill::STRATEGY {
        return super::backfill::abort(&client, &m).await;
    }
    cleanup::stop_runner(&client, &m).await.map_err(classify)?;
    let version = crate::migrate::version_schema::of(&m);
    cleanup::abort(&client, &m, &RetryPolicy::default()).await.map_err(classify)?;
    match version {
        Some(schema) => say!(
            "Aborted migration #{} of {}: version schema {} is dropped; the table is as it was.",
            m.id,
            m.table,
            crate::sql::display_ident(&schema)
        ),
        None => say!(
            "Aborted migration #{} of {}: the shadow table, {} and change log are removed; the table is as it was.",
            m.id,
            m.table,
            match crate::migrate::capture::Mode::of(&m) {
                crate::migrate::capture::Mode::Logical => "replication slot, publication",
                crate::migrate::capture::Mode::Trigger => "capture triggers",
            }
        ),
    }
    Ok(())
}

pub async fn finish(url: Option<&str>, table: &str, proxies: &Proxies<'_>) -> Result<(), CommandError> {
    let config = connect::params(url, "ghostwire finish")?;
    let client = connect::connect(&config).await?;
    let m = target::active(&client, table).await?;
    take_table(&client, &m).await?;
    let version = crate::migrate::version_schema::of(&m);
    // A version schema's contract runs while the proxies hold new queries (a few ms).
    let drained = match &version {
        Some(_) => proxies.drain().await.map_err(|e| {
            CommandError::failed(format!("draining the proxies failed ({e}); nothing changed, try again"))
        })?,
        None => None,
    };
    let finished = cleanup::finish(&client, &m).await;
    if drained.is_some() {
        proxies.open().await;
    }
    finished.map_err(classify)?;
    match version {
        Some(schema) => say!(
            "Finished migration #{} of {}: the change is applied to the table and version schema {} is dropped.",
            m.id,
            m.table,
            crate::sql::display_ident(&schema)
        ),
        None => say!("Finished migration #{} of {}: the old table is dropped.", m.id, m.table),
    }
    Ok(())
}

pub async fn revert(
    url: Option<&str>,
    table: &str,
    opts: &crate::migrate::revert::Options,
    proxies: &Proxies<'_>,
) -> Result<(), CommandError> {
    use crate::migrate::revert::{self, RevertError};
    let config = connect::params(url, "ghostwire revert")?;
    let client = connect::connect(&config).await?;
    let m = target::active(&client, table).await?;
    take_table(&client, &m).await?;
    if let Some(schema) = crate::migrate::version_schema::of(&m) {
        // The table never changed: reverting is dropping the version schema.
        cleanup::abort(&client, &m, &RetryPolicy::default()).await.map_err(classify)?;
        say!(
            "Reverted migration #{} of {}: version schema {} is dropped; the table never changed.",
            m.id,
            m.table,
            crate::sql::display_ident(&schema)
        );
        return Ok(());
    }
    let work = connect::connect(&config).await?;
    let outcome = revert::revert(&client, &work, &m, opts, proxies).await.map_err(|e| match e {
        RevertError::Refused(_) => CommandError::refused(e),
        _ => CommandError::failed(e),
    })?;
    say!(
        "Reverted migration #{} of {}: the old table is live again ({} reverse change(s) applied; swap attempt {}, lock waited {:.1} ms, held {:.1} ms). The new table is kept until `ghostwire finish {}`.",
        outcome.id,
        m.table,
        outcome.applied,
        outcome.attempts,
        outcome.lock_wait.as_secs_f64() * 1000.0,
        outcome.lock_hold.as_secs_f64() * 1000.0,
        m.table
    );
    for u in &outcome.unvalidated {
        say!("warning: not validated: {u}");
    }
    Ok(())
}
