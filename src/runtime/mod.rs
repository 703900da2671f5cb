//! The VM side: what runs over SSH.
//!
//! - [`shell`]: remote scripts whose values are always quoted.
//! - [`ssh`]: the multiplexed SSH connection pool with pinned host keys and bounded commands.
//! - [`git`]: clones, branches and worktrees, with the token kept out of URLs and config.
//! - [`devcontainer`]: `devcontainer up` with the repository's or a generated configuration,
//!   and the bot's containers found by label.

pub mod devcontainer;
pub mod git;
pub mod shell;
pub mod ssh;
