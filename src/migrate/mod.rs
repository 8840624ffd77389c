//! `ghostwire migrate`: the engine, one module per phase (DESIGN.md §2, §4, §5, §6).
//!
//! [`migrate`] plans the statement, then either runs it directly (catalog-only changes) or
//! goes through the shadow table: [`shadow`] → [`capture`] → [`copy`] → [`index`] and
//! [`verify`] together ([`post_copy`]) → [`catchup`] → [`cutover`] (with the statements of
//! [`swap`]); [`resume`] continues a stopped one. State lives in the target database
//! ([`crate::state`]); [`cleanup`] implements `abort` and `finish`; [`live`] and [`throttle`]
//! are the operator's controls.

mod attempts;
pub mod blockers;
pub mod capture;
mod capturing;
pub mod catchup;
pub mod cleanup;
pub mod copy;
pub mod cutover;
mod engine;
mod error;
mod in_place;
pub mod index;
pub use crate::operate::live;
mod options;
mod pacing;
pub mod post_copy;
pub mod proxies;
mod reconnect;
pub mod rehearsal;
pub use crate::operate::retry;
pub mod revert;
mod run;
pub mod shadow;
mod shadow_constraints;
pub mod snapshots;
pub mod spec;
pub mod swap;
pub mod validate;
pub use crate::operate::throttle;
pub mod verify;
pub mod version_schema;

pub use engine::{
    Context, InvalidIndexes, Options, Outcome, PhaseHook, Reporter, Silent, migrate, resume, session_config,
};
pub use error::MigrateError;
pub use live::{Live, Progress, Settings};
