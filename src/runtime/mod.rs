//! The VM side: what runs over SSH.
//!
//! - [`shell`]: remote scripts whose values are always quoted.
//! - [`ssh`]: the multiplexed SSH connection pool with pinned host keys and bounded commands.

pub mod shell;
pub mod ssh;
