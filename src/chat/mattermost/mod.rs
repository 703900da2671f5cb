//! Mattermost, on its REST API v4 and WebSocket (see `shared/reference/wire-formats.md`,
//! section 1, for the shapes and their sources in Mattermost's code).
//!
//! - [`adapter`]: events in, [`ChatOutbound`](crate::chat::ChatOutbound) out, catch-up after
//!   downtime, project channels.
//! - [`model`]: the JSON objects (Post, PostList, Channel, User, sidebar categories, WebSocket
//!   frames).
//! - [`rest`]: the REST client with typed errors and retries.
//! - [`websocket`]: the event listener with resume and reconnect.

pub mod adapter;
pub mod model;
pub mod rest;
pub mod websocket;
