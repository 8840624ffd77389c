//! The operator's controls over work done in batches beside the application, shared by
//! `migrate` (copy, catch-up, revert) and `backfill`: the throttle ("may I go on?"), the live
//! settings and control API, being held back (`holdback`), the batch sizer, short lock waits with retries, and the
//! reporter the command prints through.

pub mod holdback;
pub mod live;
pub mod report;
pub mod retry;
pub mod sizer;
pub mod throttle;

pub use live::{Live, Progress, Settings};
pub use report::{Reporter, Silent};
pub use sizer::ChunkSizer;
