//! `ghostwire migrate`: the engine, one module per phase (DESIGN.md §2, §4, §5).
//!
//! [`migrate`] plans the statement, then either runs it directly (catalog-only changes) or
//! goes through the shadow table: [`shadow`] → [`capture`] → [`copy`] → [`index`] →
//! [`catchup`] → [`verify`] → [`cutover`] (with the statements of [`swap`]). State lives in
//! the target database ([`crate::state`]); [`cleanup`] implements `abort` and `finish`.

mod attempts;
pub mod capture;
pub mod catchup;
pub mod cleanup;
pub mod copy;
pub mod cutover;
mod engine;
mod error;
pub mod index;
pub mod retry;
pub mod shadow;
pub mod spec;
pub mod swap;
pub mod verify;

pub use engine::{Options, Outcome, PhaseHook, Reporter, Silent, migrate, session_config};
pub use error::MigrateError;
