//! The agent side: what Claude Code prints and what the bot reads out of it.
//!
//! - [`markers`]: the line-anchored control markers (`[NETWORK_REQUEST: …]`, orchestrator
//!   markers) recognised incrementally in the agent's text, outside code fences.

pub mod markers;
