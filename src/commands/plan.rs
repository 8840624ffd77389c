//! `ghostwire plan`.

use super::CommandError;
use crate::{connect, plan};

pub async fn run(url: Option<&str>, json: bool, statement: &str) -> Result<(), CommandError> {
    // A statement that does not parse is refused before the database is even needed.
    plan::parse::parse(statement).map_err(CommandError::refused)?;
    let config = connect::params(url, "ghostwire plan")?;
    let mut client = connect::connect(&config).await?;
    let plan = plan::plan(&mut client, statement)
        .await
        .map_err(|e| if e.is_refusal() { CommandError::refused(e) } else { CommandError::failed(e) })?;
    if json {
        let doc = serde_json::to_string_pretty(&plan).map_err(CommandError::failed)?;
        say!("{doc}");
    } else {
        say!("{}", plan::render(&plan).trim_end());
    }
    match plan::privileges::refusal(&plan.privileges) {
        Some(why) => Err(CommandError::refused(why)),
        None => Ok(()),
    }
}
