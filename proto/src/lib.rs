//! PostgreSQL wire protocol framing.
