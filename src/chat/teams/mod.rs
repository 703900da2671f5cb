//! Microsoft Teams, through the Bot Framework (see `shared/reference/wire-formats.md`, section
//! 3, for the shapes and their sources).
//!
//! - [`auth`]: the inbound token check (OpenID metadata, JWKS, RS256, claims, endorsements).
//! - [`model`]: the JSON objects (Activity, ChannelAccount, ConversationAccount, …).
//! - [`card`]: [`ActionCard`](crate::chat::ActionCard)s as Adaptive Cards 1.5, and clicks back.
//! - [`inbound`]: activities → [`ChatEvent`](crate::chat::ChatEvent)s and clicks; the
//!   `POST /api/messages` route.
//! - [`rest`]: the bot's token (client credentials) and the Connector REST client.
//! - [`pacer`]: at most one Connector operation per conversation every [`PACE_INTERVAL`].
//! - [`adapter`]: [`ChatOutbound`](crate::chat::ChatOutbound) for Teams, conversation
//!   references.
//!
//! # Ids
//!
//! A Teams channel thread is the conversation `<channel id>;messageid=<root message id>`
//! (`19:…@thread.tacv2;messageid=1611060744833`): the channel's id followed by the id of the
//! thread's first message. The platform-neutral ids are:
//!
//! | neutral | channel thread | personal or group chat (flat) |
//! |---|---|---|
//! | `channel_id` | the conversation id up to `;messageid=` (the channel) | the conversation id |
//! | `post_id` | the activity id (the message) | the activity id |
//! | `root_id` | the `messageid` part, `None` on the thread's first message | the thread of the session started in that chat while one is active, else `None` |
//!
//! So a session's `thread_id` is the id of its thread's first message, and a reply in that
//! thread arrives with `root_id` equal to it: the dispatcher's "reply in a thread finds its
//! session" works unchanged. Going back, [`conversation_id`] rebuilds the conversation of a
//! thread from `channel_id` and the root. A chat has no threads: while a session started there
//! is active, the chat *is* its thread.
//!
//! User ids are AAD object ids (lowercase GUIDs; `SM_ALLOWED_USERS` and
//! `SM_ALLOWED_APPROVERS` name people by them), or the Teams account id (`29:…`) when Teams
//! sends no AAD object id.

pub mod adapter;
pub mod auth;
pub mod card;
pub mod inbound;
pub mod model;
pub mod pacer;
pub mod rest;

use std::time::Duration;

pub use adapter::{TeamsAdapter, TeamsConfig};
pub use inbound::{routes, MESSAGES_PATH};

/// Longest text the adapter puts into one Teams message, in Unicode scalar values. Teams
/// refuses messages over about 28 KB (TDOCS limits, "Channel conversation post size"; error
/// 413 `MessageSizeTooBig`); 6,000 characters stay under it even when every character takes
/// four bytes in UTF-8, leaving room for the activity's JSON and Markdown rendering.
pub const MAX_POST_CHARS: usize = 6_000;

/// Least time between two operations (post, reply, update) in one conversation: Teams
/// throttles bots per conversation (about one operation a second sustained, with bursts;
/// error 429 `Throttled`), and this stays well under it.
pub const PACE_INTERVAL: Duration = Duration::from_secs(2);

/// What separates a channel from a thread's root in a conversation id.
pub const MESSAGE_ID_MARKER: &str = ";messageid=";

/// Splits a conversation id into the channel (or chat) and the thread root:
/// `19:a@thread.tacv2;messageid=42` → (`19:a@thread.tacv2`, `Some("42")`), `a:1xyz` → (`a:1xyz`,
/// `None`). An empty root counts as none.
pub fn split_conversation_id(id: &str) -> (&str, Option<&str>) {
    match id.split_once(MESSAGE_ID_MARKER) {
        Some((channel, root)) if !root.is_empty() => (channel, Some(root)),
        Some((channel, _)) => (channel, None),
        None => (id, None),
    }
}

/// The conversation of a thread: `<channel>;messageid=<root>` in a channel, the chat itself
/// in a flat conversation (`channel == false`) or without a root.
pub fn conversation_id(channel_id: &str, root: Option<&str>, channel: bool) -> String {
    match root {
        Some(root) if channel => format!("{channel_id}{MESSAGE_ID_MARKER}{root}"),
        _ => channel_id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_split_and_join() {
        let thread = "19:6decf54d86d945e4b3924b63a9161a78@thread.tacv2;messageid=1611060744833";
        let (channel, root) = split_conversation_id(thread);
        assert_eq!(channel, "19:6decf54d86d945e4b3924b63a9161a78@thread.tacv2");
        assert_eq!(root, Some("1611060744833"));
        assert_eq!(conversation_id(channel, root, true), thread);
        assert_eq!(split_conversation_id("a:1xyz"), ("a:1xyz", None));
        assert_eq!(split_conversation_id("19:x;messageid="), ("19:x", None));
        assert_eq!(conversation_id("a:1xyz", Some("5"), false), "a:1xyz");
        assert_eq!(conversation_id("19:c", None, true), "19:c");
    }
}
