//! Mattermost, on its REST API v4 and WebSocket (see `shared/reference/wire-formats.md`,
//! section 1, for the shapes and their sources in Mattermost's code).
//!
//! - [`model`]: the JSON objects (Post, PostList, Channel, User, sidebar categories, WebSocket
//!   frames).
//! - [`rest`]: the REST client with typed errors and retries.
//! - [`websocket`]: the event listener with resume and reconnect.

pub mod model;
pub mod rest;
pub mod websocket;
