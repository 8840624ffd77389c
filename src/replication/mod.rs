//! Logical replication, our own way (DESIGN.md §1): a `replication=database` client over
//! `proto/` ([`client`]), and the slots and publications ghostwire makes, reads and removes
//! ([`slot`]). pgoutput itself is decoded in `proto/`.

pub mod client;
pub mod slot;

use thiserror::Error;

pub use client::{ReplicationClient, Streamed};

#[derive(Debug, Error)]
pub enum ReplicationError {
    #[error("could not open a replication connection: {0}")]
    Connect(String),
    #[error("{0}")]
    Tls(#[from] crate::connect::tls::TlsSetupError),
    #[error("replication login failed: {0}")]
    Auth(String),
    #[error("{message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("replication protocol: {0}")]
    Decode(#[from] ghostwire_proto::ProtoError),
    #[error("replication connection: {0}")]
    Io(std::io::Error),
    #[error("the server closed the replication connection")]
    Closed,
}

impl ReplicationError {
    /// The session is gone (the server restarted, the network dropped): reconnecting may help.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            ReplicationError::Io(_) | ReplicationError::Closed | ReplicationError::Connect(_) => true,
            ReplicationError::Server { code, .. } => {
                code.starts_with("08") || matches!(code.as_str(), "57P01" | "57P02" | "57P03")
            }
            _ => false,
        }
    }
}
