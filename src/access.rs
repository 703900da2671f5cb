//! Who may do what.
//!
//! | action | who |
//! |---|---|
//! | reply to the agent in the thread ([`Act::Talk`]) | owner, participants, admins |
//! | `compact`, `context`, `status` of this session ([`Act::Look`]) | owner, participants, admins |
//! | `stop`, `clear`, `restart`, `invite`, `kick` ([`Act::Manage`]) | owner, admins |
//! | top-level `stop <prefix>` | owner of that session or admin, from anywhere |
//! | top-level `status` | the asker's own sessions and those they participate in; admins add `status all` |
//! | start / orchestrate | allowed users, on allowed repositories |
//!
//! The **owner** of a session is whoever started it (`sessions.started_by`; an orchestrator's
//! children belong to the orchestrator's owner and inherit its participants). **Participants**
//! are the users the owner invited (`!invite @user`). **Admins** are `SM_ADMIN_USERS`.
//! `SM_ALLOWED_USERS` says who may use the bot at all (admins always may); empty means every
//! member of a channel the bot serves. Everything is decided by user id, never by name.

use std::collections::HashSet;

use crate::store::Session;

/// Who may use the bot at all (`SM_ALLOWED_USERS`, resolved to ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone in a channel the bot serves.
    Everyone,
    /// Only these user ids.
    Only(HashSet<String>),
}

impl Access {
    /// Whether `user_id` may use the bot.
    pub fn allows(&self, user_id: &str) -> bool {
        match self {
            Self::Everyone => true,
            Self::Only(ids) => ids.contains(user_id),
        }
    }
}

/// A user's part in one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Started it (or owns the orchestrator that did).
    Owner,
    /// An admin (`SM_ADMIN_USERS`).
    Admin,
    /// Invited by the owner.
    Participant,
    /// Anyone else.
    Outsider,
}

/// What someone wants to do with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Write to its agent.
    Talk,
    /// `compact`, `context`, `status`.
    Look,
    /// `stop`, `clear`, `restart`, `invite`, `kick`.
    Manage,
}

impl Role {
    /// Whether this role may do `act`.
    pub fn may(self, act: Act) -> bool {
        match self {
            Role::Owner | Role::Admin => true,
            Role::Participant => matches!(act, Act::Talk | Act::Look),
            Role::Outsider => false,
        }
    }
}

/// The roles of the bot: who may use it and who administers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roles {
    /// `SM_ALLOWED_USERS`, resolved.
    pub users: Access,
    /// `SM_ADMIN_USERS`, resolved.
    pub admins: HashSet<String>,
}

impl Roles {
    /// Everyone may use the bot; nobody administers it.
    pub fn open() -> Self {
        Self {
            users: Access::Everyone,
            admins: HashSet::new(),
        }
    }

    /// Whether `user_id` may use the bot at all.
    pub fn may_use(&self, user_id: &str) -> bool {
        self.is_admin(user_id) || self.users.allows(user_id)
    }

    /// Whether `user_id` is an admin.
    pub fn is_admin(&self, user_id: &str) -> bool {
        self.admins.contains(user_id)
    }

    /// `user_id`'s role in `session`, whose participants are `participants`. Someone who may
    /// not use the bot at all is an outsider everywhere, invited or not.
    pub fn role(&self, user_id: &str, session: &Session, participants: &[String]) -> Role {
        if !self.may_use(user_id) {
            Role::Outsider
        } else if session.started_by == user_id {
            Role::Owner
        } else if self.is_admin(user_id) {
            Role::Admin
        } else if participants.iter().any(|p| p == user_id) {
            Role::Participant
        } else {
            Role::Outsider
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Lifecycle, Platform, SessionKind, SessionStats};

    fn session(owner: &str) -> Session {
        Session {
            id: "s".into(),
            platform: Platform::Mattermost,
            channel_id: "c".into(),
            thread_id: "t".into(),
            kind: SessionKind::Standard,
            parent_id: None,
            lifecycle: Lifecycle::Idle,
            started_by: owner.into(),
            agent_session_id: None,
            repo_host: "github.com".into(),
            repo_org: "acme".into(),
            repo_name: "w".into(),
            branch: None,
            worktree: None,
            workspace_path: None,
            container_id: None,
            container: None,
            stats: SessionStats::default(),
            permission_mode: None,
            budget_added_usd: 0.0,
            profile: None,
            created_at: 0,
            updated_at: 0,
            last_activity_at: 0,
            hibernated_at: None,
        }
    }

    #[test]
    fn the_rules_table() {
        let roles = Roles {
            users: Access::Only(["alice", "bob", "carol"].map(String::from).into()),
            admins: ["root"].map(String::from).into(),
        };
        let s = session("alice");
        let invited = vec!["bob".to_owned(), "mallory".to_owned()];
        let role = |u: &str| roles.role(u, &s, &invited);
        assert_eq!(role("alice"), Role::Owner);
        assert_eq!(role("root"), Role::Admin);
        assert_eq!(role("bob"), Role::Participant);
        assert_eq!(role("carol"), Role::Outsider);
        assert_eq!(
            role("mallory"),
            Role::Outsider,
            "invited, but may not use the bot"
        );
        for act in [Act::Talk, Act::Look, Act::Manage] {
            assert!(Role::Owner.may(act) && Role::Admin.may(act));
            assert!(!Role::Outsider.may(act));
        }
        assert!(Role::Participant.may(Act::Talk) && Role::Participant.may(Act::Look));
        assert!(!Role::Participant.may(Act::Manage));
        assert!(roles.may_use("root"), "admins always may use the bot");
        assert!(!roles.may_use("dave"));
    }
}
