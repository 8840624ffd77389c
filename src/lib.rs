//! ghostwire: online schema changes for PostgreSQL.
//!
//! The binary's entry point is `src/main.rs`; this library holds everything else so that
//! integration tests and benchmarks drive the same code.

pub mod apply;
pub mod backfill;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod connect;
pub mod control;
pub mod ephemeral;
pub mod failpoint;
pub mod migrate;
pub mod operate;
pub mod plan;
pub mod proxy;
pub mod replication;
pub mod sql;
pub mod state;
