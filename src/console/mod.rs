//! The web console: every session in a browser, served by the bot itself at `/`.
//!
//! - [`transcript`]: the record of every thread (posts, edits, cards, what people wrote) that
//!   pages replay, and its live feed.
//! - [`platform`]: the console as a chat platform of its own ([`ConsoleChat`]): sessions started
//!   from the console live there, and it is the only platform when none is configured
//!   (one-machine mode).
//! - [`auth`]: logins (a one-time link, tokens, or an authenticating proxy), session cookies
//!   and CSRF tokens.
//! - [`web`]: the pages and their requests: the sessions list, a session's page (its thread as
//!   it streams, replayed with Server-Sent Events from `Last-Event-ID`), sending messages,
//!   starting sessions, the session commands and card buttons. Everything a page does goes
//!   through the same dispatcher and the same signed, single-use card decisions as chat, so a
//!   decision in one place updates the others, and the chat thread shows what was done from
//!   the console.
//!
//! Pages are rendered on the server (maud); a small script of our own (`static/console.js`,
//! no build step, no CDN) follows the event stream and sends requests.

pub mod auth;
pub mod platform;
pub mod transcript;
pub mod web;

pub use platform::ConsoleChat;
pub use transcript::{Recording, RecordingClicks, Transcript};
pub use web::{Console, Live};

/// What every console channel, post and message id starts with (Mattermost ids are 26
/// lowercase base-32 characters, Teams ids contain `:` or are decimal: neither has a dot).
pub const ID_PREFIX: &str = "console.";
