//! The VM side: what runs over SSH.
//!
//! - [`shell`]: remote scripts whose values are always quoted.
//! - [`ssh`]: the multiplexed SSH connection pool with pinned host keys and bounded commands.
//! - [`git`]: clones, branches and worktrees, with the token kept out of URLs and config.
//! - [`devcontainer`]: `devcontainer up` with a vetted, trusted or generated configuration,
//!   the check of what was created, and the bot's containers found by label.
//! - [`vetting`]: a repository's devcontainer configuration rebuilt from an allow-list.

pub mod devcontainer;
pub mod git;
pub mod shell;
pub mod ssh;
pub mod vetting;
