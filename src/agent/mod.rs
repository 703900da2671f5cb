//! The agent side: what Claude Code prints and what the bot reads out of it.
//!
//! - [`markers`]: the line-anchored control markers (`[NETWORK_REQUEST: …]`, orchestrator
//!   markers) recognised incrementally in the agent's text, outside code fences.
//! - [`stream_json`]: the CLI's stream-json protocol: stdout events decoded, stdin lines built.

pub mod markers;
pub mod stream_json;
