//! Mattermost, on its REST API v4 and WebSocket (see `shared/reference/wire-formats.md`,
//! section 1, for the shapes and their sources in Mattermost's code).
//!
//! - [`callback`]: button clicks (interactive message actions) in, their answers out.
//! - [`adapter`]: events in, [`ChatOutbound`](crate::chat::ChatOutbound) out, catch-up after
//!   downtime, project channels.
//! - [`model`]: the JSON objects (Post, PostList, Channel, User, sidebar categories, WebSocket
//!   frames).
//! - [`rest`]: the REST client with typed errors and retries.
//! - [`websocket`]: the event listener with resume and reconnect.

pub mod adapter;
pub mod callback;
pub mod model;
pub mod rest;
pub mod websocket;

/// Largest message Mattermost accepts in one post, in Unicode scalar values
/// (`model.PostMessageMaxRunesV2`).
pub const MAX_POST_CHARS: usize = 16_383;
