//! The PostgreSQL wire protocol (version 3), as pure functions over bytes: no I/O, no
//! policy. The proxy uses it to find message boundaries in both directions, to answer the
//! untagged packets that start a connection, and to read the few messages it must see
//! (ReadyForQuery, BackendKeyData, the authentication requests); the replication client
//! uses it for the streaming messages and to decode pgoutput.
//!
//! Everything here is bounds-checked and returns errors instead of panicking, whatever the
//! input; `tests/arbitrary.rs` checks that with random bytes.

mod auth;
mod extended;
mod framer;
mod messages;
pub mod pgoutput;
mod replication;
mod startup;

pub use auth::{
    AuthRequest, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, auth_request, fatal_error, sasl_initial_mechanism, sasl_request,
};
pub use extended::{
    Bind, Field, ParamFormats, Parse, Target, bind_body, bind_names, close_message, describe_message, execute_portal,
    message, parameter_description, parse_body, parse_message, row_description, sync_message, target_body,
};
pub use framer::{Framer, Item};
pub use messages::{TransactionStatus, backend_key_data, error_fields, ready_for_query};
pub use replication::{ServerCopy, format_lsn, parse_lsn, pg_timestamp, server_copy, standby_status_update};
pub use startup::{StartupPacket, parse_startup, startup_message};

use thiserror::Error;

/// PostgreSQL's own limit on a message's length (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB - 1).
pub const MAX_MESSAGE_LEN: u32 = 0x3fff_ffff;
/// PostgreSQL's limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: u32 = 10_000;

/// Codes of the untagged packets a client may send first.
pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ProtoError {
    #[error("message length {len} is below the minimum of {min}")]
    TooShort { len: u32, min: u32 },
    #[error("message length {len} is above the maximum of {max}")]
    TooLong { len: u32, max: u32 },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

pub(crate) fn be_i32(b: &[u8], at: usize) -> Option<i32> {
    be_u32(b, at).map(|v| v as i32)
}
