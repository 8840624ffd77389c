//! `ghostwire apply FILE.sql…`: a migration file run statement by statement, each the safe
//! way (DESIGN.md §5): `ALTER TABLE` and the index statements through `migrate` (instant, in
//! place or a copy, finished at once so the next statement may change the table again),
//! `UPDATE`/`DELETE` through `backfill`, anything else directly in its own transaction under
//! a short `lock_timeout` with retries (outside a transaction where PostgreSQL requires it).
//!
//! `ghostwire.applied` is the migration log: one row per attempt, with the file's name (not
//! its path) and the statement's md5.
//! A rerun skips what finished and resumes a migration or backfill that stopped midway; a
//! statement run directly records its end in its own transaction, so it is never run twice.
//! `BEGIN`/`COMMIT` in a file are refused (they would hold every lock to the end) unless
//! `--single-transaction` asks for exactly that.

mod file;
mod log;
mod run;

pub use file::{FileError, Piece, Way, pieces};
pub use log::Finished;
pub use run::{Done, apply};

/// How a file is applied.
#[derive(Debug, Clone)]
pub struct Options {
    pub migrate: crate::migrate::Options,
    pub backfill: crate::backfill::Options,
    pub single_transaction: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("{what}: {}", crate::connect::describe(.cause))]
    Database { what: String, cause: tokio_postgres::Error },
    #[error(
        "{file}: statement {number} (line {line}) stopped: {cause}\n  {statement}\n{}",
        next_step(*done_before, file)
    )]
    Statement {
        file: String,
        number: usize,
        line: usize,
        statement: String,
        cause: String,
        /// Refused before anything changed, and nothing before it ran in this invocation.
        refused: bool,
        done_before: usize,
    },
}

fn next_step(done_before: usize, file: &str) -> String {
    let before = match done_before {
        0 => "No statement before it ran.".to_owned(),
        n => format!("The {n} statement(s) before it are done and recorded in ghostwire.applied."),
    };
    format!(
        "{before} Fix the cause (or the statement) and run `ghostwire apply {file}` again: what is done is skipped, \
         and a migration or backfill that stopped midway goes on where it stopped."
    )
}

impl ApplyError {
    pub fn is_refusal(&self) -> bool {
        match self {
            ApplyError::File(_) => true,
            ApplyError::Statement { refused, .. } => *refused,
            _ => false,
        }
    }

    fn db(what: &str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + '_ {
        move |cause| ApplyError::Database { what: what.to_owned(), cause }
    }
}
