//! Chat command parsing.
//!
//! Users drive the session manager by writing messages in Mattermost. This
//! module decides whether a message is addressed to the bot and, if it is,
//! turns it into a typed [`Command`] or a specific [`CommandError`] that can be
//! posted back to the user with [`CommandError::reply`].
//!
//! # Addressing
//!
//! * Leading and trailing whitespace is ignored.
//! * A message is a command when it starts with the trigger (for example
//!   `@claude`, compared ASCII case-insensitively) followed by whitespace, by
//!   the end of the text, or by `:` / `,` and then whitespace or the end of
//!   the text (`@claude: status`, `@claude, help`). Anything else after the
//!   trigger (`@claudette hi`, `@claude:status`) means the message is not a
//!   command. A bare trigger is [`Command::Help`].
//! * In a session thread only, `!word ...` is also a command (mobile clients
//!   swallow `/`). The word must follow `!` immediately. If the word is not a
//!   known command (`!important note`, `!!`, `! wow`) the message is ordinary
//!   text for the session and [`parse`] returns `None`; a lone `!` is
//!   [`CommandError::Empty`]. Outside threads `!` has no meaning.
//! * After the trigger, an unknown command word is always an error
//!   ([`CommandError::UnknownCommand`]): the user clearly meant to talk to the
//!   bot.
//! * The command word and option names are ASCII case-insensitive. Arguments
//!   are separated by any amount of whitespace, including newlines and tabs.
//! * Options start with `--`. Because phone keyboards often turn `--` into a
//!   dash, a leading `—` (em dash) or `–` (en dash) is accepted in its place.
//!   An argument starting with a single `-` is not an option; it is checked
//!   as a value (and rejected, since no value may start with `-`).
//!
//! # Commands
//!
//! | text | value |
//! |------|-------|
//! | `start org/repo[@branch] [--worktree[=name]] [--profile=name]` | [`Command::Start`] |
//! | `orchestrate org/repo[@branch] [--profile=name]` | [`Command::Orchestrate`] |
//! | `profile` (in a session thread: that session's) | [`Command::Profile`] |
//! | `stop <id-prefix>` (bare `stop` in a session thread) | [`Command::Stop`] |
//! | `status [all]`, `help` | [`Command::Status`], [`Command::Help`] |
//! | `invite @user`, `kick @user` (session thread only) | [`Command::Invite`], [`Command::Kick`] |
//! | `join <id-prefix>` (bare `join` in a session thread) | [`Command::Join`] |
//! | `compact`, `clear`, `restart`, `context` (session thread only) | unit variants |
//!
//! `org/` may be left out when a default organisation is configured.
//!
//! # One definition
//!
//! The commands are one table in this module's source (`SPECS`): per command
//! its word and aliases, where it may be written (anywhere or only in a
//! session thread), its positional arguments (the kind of value, whether a
//! session thread may leave it out, the errors for a missing or an extra one),
//! its options (`--name`, `--name=value`) and its help line. [`parse`],
//! [`CommandKind`]'s methods, [`help_text`] and the usage part of
//! [`CommandError::reply`] are all derived from that table.
//!
//! # Validated values
//!
//! Every value taken from the user ([`OrgName`], [`RepoName`], [`BranchName`],
//! [`WorktreeName`], [`IdPrefix`]) is a newtype that can only be built through
//! its validating `parse` / [`FromStr`] implementation. All of them accept only
//! a small ASCII alphabet, so quotes, `;`, `$`, backticks, `|`, `&`, `<`, `>`,
//! whitespace, NUL, other control characters and non-ASCII text are rejected
//! by construction, and none of them can start with `-` (so they can never be
//! mistaken for a command-line option).

use std::fmt;
use std::str::FromStr;

use strum::EnumCount as _;

use crate::permission::PermissionMode;

/// Longest rendering (in characters) of a user-supplied value inside an error
/// message, including the `…` that marks a truncation.
const MAX_QUOTED_CHARS: usize = 60;

// ---------------------------------------------------------------------------
// Parse context and entry point
// ---------------------------------------------------------------------------

/// Where a message was written and how the bot is configured; input to
/// [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseContext<'a> {
    /// The mention that addresses the bot, e.g. `"@claude"` (from
    /// `SM_BOT_TRIGGER`). Matched ASCII case-insensitively; surrounding
    /// whitespace is ignored. An empty trigger disables trigger addressing
    /// (only `!` commands in threads remain).
    pub trigger: &'a str,
    /// `SM_DEFAULT_ORG`: lets `start repo` mean `start <default_org>/repo`.
    /// Surrounding whitespace is ignored and an empty value counts as not
    /// configured. An invalid value yields [`CommandError::BadDefaultOrg`]
    /// when it is needed.
    pub default_org: Option<&'a str>,
    /// `true` when the message is a reply in a session's thread.
    pub in_session_thread: bool,
}

/// Parses a chat message.
///
/// Returns:
/// * `None` when the text is not addressed to the bot (it is an ordinary
///   message for the session), see the module documentation for the rules;
/// * `Some(Ok(command))` for a well-formed command;
/// * `Some(Err(error))` for a message addressed to the bot that is not a
///   valid command. Post [`CommandError::reply`] back to the user.
///
/// Never panics, whatever the input.
#[must_use]
pub fn parse(text: &str, ctx: &ParseContext<'_>) -> Option<Result<Command, CommandError>> {
    Some(read(&SPECS, text, ctx)?.and_then(|request| match request {
        Request::BareTrigger => Ok(Command::Help),
        Request::Command(spec, values) => spec.build(*values),
    }))
}

/// What a message addressed to the bot asks for.
enum Request<'s> {
    /// The trigger alone.
    BareTrigger,
    /// A command of the table and the values read from its arguments.
    Command(&'s CommandSpec, Box<Values>),
}

/// [`parse`] against any command table (tests use a second one).
fn read<'s>(
    specs: &'s [CommandSpec],
    text: &str,
    ctx: &ParseContext<'_>,
) -> Option<Result<Request<'s>, CommandError>> {
    let text = text.trim();

    if let Some(rest) = strip_trigger(text, ctx.trigger) {
        let mut tokens = rest.split_whitespace();
        let Some(word) = tokens.next() else {
            return Some(Ok(Request::BareTrigger));
        };
        return Some(match find_spec(specs, word) {
            Some(spec) => spec
                .read(specs, tokens, ctx)
                .map(|values| Request::Command(spec, Box::new(values))),
            None => Err(CommandError::UnknownCommand {
                word: word.to_owned(),
            }),
        });
    }

    if ctx.in_session_thread {
        if let Some(rest) = text.strip_prefix('!') {
            if rest.is_empty() {
                return Some(Err(CommandError::Empty));
            }
            if rest.starts_with(char::is_whitespace) {
                // "! something": punctuation, not a command.
                return None;
            }
            let mut tokens = rest.split_whitespace();
            let spec = find_spec(specs, tokens.next()?)?;
            return Some(
                spec.read(specs, tokens, ctx)
                    .map(|values| Request::Command(spec, Box::new(values))),
            );
        }
    }

    None
}

/// If `text` starts with the trigger followed by a valid boundary, returns
/// what follows the boundary.
fn strip_trigger<'t>(text: &'t str, trigger: &str) -> Option<&'t str> {
    let trigger = trigger.trim();
    if trigger.is_empty() {
        return None;
    }
    let head = text.get(..trigger.len())?;
    if !head.eq_ignore_ascii_case(trigger) {
        return None;
    }
    let rest = text.get(trigger.len()..)?;
    let mut chars = rest.chars();
    match chars.next() {
        None => Some(""),
        Some(c) if c.is_whitespace() => Some(rest),
        Some(':' | ',') => {
            let after = chars.as_str();
            match after.chars().next() {
                None => Some(""),
                Some(c) if c.is_whitespace() => Some(after),
                Some(_) => None,
            }
        }
        Some(_) => None,
    }
}

/// The command whose word or alias is `word` (ASCII case-insensitive).
fn find_spec<'s>(specs: &'s [CommandSpec], word: &str) -> Option<&'s CommandSpec> {
    specs.iter().find(|spec| {
        std::iter::once(&spec.word)
            .chain(spec.aliases)
            .any(|name| name.eq_ignore_ascii_case(word))
    })
}

// ---------------------------------------------------------------------------
// The grammar: one table
// ---------------------------------------------------------------------------

/// Every command, in [`CommandKind`] order (which is also the order of help
/// texts). The parser, [`CommandKind`]'s methods, the help text and the usage
/// part of error replies are all read from here, so a new command is one
/// entry plus its [`Command`] and [`CommandKind`] variants.
static SPECS: [CommandSpec; CommandKind::COUNT] = [
    CommandSpec {
        kind: CommandKind::Start,
        word: "start",
        args: &[REPO_ARG],
        options: &[WORKTREE, PROFILE],
        summary: "start a Claude Code session on a repository; `@branch` picks the branch, \
                  `--worktree` runs it in its own git worktree (`--worktree=name` names it), \
                  `--profile=name` picks one of the operator's profiles",
        build: |values| {
            Some(Command::Start {
                repo: values.repo?,
                worktree: values.worktree,
                profile: values.profile,
            })
        },
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Orchestrate,
        word: "orchestrate",
        args: &[REPO_ARG],
        options: &[PROFILE],
        summary: "start an orchestrator session on a repository (`--profile=name` picks a profile)",
        build: |values| {
            Some(Command::Orchestrate {
                repo: values.repo?,
                profile: values.profile,
            })
        },
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Stop,
        word: "stop",
        args: &[ID_ARG],
        summary: "stop the session whose id starts with the given prefix",
        thread_summary: Some("stop this thread's session (add an id prefix to stop another one)"),
        build: |values| {
            Some(Command::Stop {
                target: values.id_prefix,
            })
        },
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Status,
        word: "status",
        args: &[ArgSpec {
            value: ALL,
            presence: Presence::Optional,
            missing: |command| CommandError::UnexpectedArgument {
                command,
                arg: String::new(),
            },
            surplus: ArgSpec::UNEXPECTED,
        }],
        summary: "list your sessions and those you were invited to (`status all`: every session, for admins)",
        thread_summary: Some("show this session's state (`status all`: every session, for admins)"),
        build: |values| Some(Command::Status { all: values.all }),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Help,
        word: "help",
        summary: "show this help",
        build: |_| Some(Command::Help),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Compact,
        word: "compact",
        scope: Scope::ThreadOnly,
        summary: "compact this session's conversation context",
        build: |_| Some(Command::Compact),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Clear,
        word: "clear",
        scope: Scope::ThreadOnly,
        summary: "clear this session's conversation",
        build: |_| Some(Command::Clear),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Restart,
        word: "restart",
        scope: Scope::ThreadOnly,
        summary: "restart this session",
        build: |_| Some(Command::Restart),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Context,
        word: "context",
        scope: Scope::ThreadOnly,
        summary: "show this session's context usage",
        build: |_| Some(Command::Context),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Invite,
        word: "invite",
        scope: Scope::ThreadOnly,
        args: &[USER_ARG],
        summary: "let a user talk to this session (its owner or an admin)",
        build: |values| Some(Command::Invite { user: values.user? }),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Kick,
        word: "kick",
        scope: Scope::ThreadOnly,
        args: &[USER_ARG],
        summary: "take back an invitation (its owner or an admin)",
        build: |values| Some(Command::Kick { user: values.user? }),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Join,
        word: "join",
        args: &[ID_ARG],
        summary: "join the channel of the session whose id starts with the given prefix and follow \
                  its thread (its owner, the people they invited and admins)",
        thread_summary: Some("follow this thread (add an id prefix to join another session)"),
        build: |values| {
            Some(Command::Join {
                target: values.id_prefix,
            })
        },
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Interrupt,
        word: "interrupt",
        aliases: &["escape"],
        scope: Scope::ThreadOnly,
        summary: "stop the turn Claude is working on (its owner, the people they invited and admins)",
        build: |_| Some(Command::Interrupt),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Grants,
        word: "grants",
        summary: "list the live network grants of your sessions (admins: of every session)",
        thread_summary: Some("list this session's network grants and when they end"),
        build: |_| Some(Command::Grants),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Revoke,
        word: "revoke",
        scope: Scope::ThreadOnly,
        args: &[DOMAIN_ARG],
        summary: "end this session's network grant for a domain (its owner or an admin)",
        build: |values| {
            Some(Command::Revoke {
                domain: values.domain?,
            })
        },
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Cost,
        word: "cost",
        scope: Scope::ThreadOnly,
        summary: "show what this session spent, against its budget and its orchestrator's",
        build: |_| Some(Command::Cost),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Mode,
        word: "mode",
        scope: Scope::ThreadOnly,
        args: &[MODE_ARG],
        summary: "switch Claude's permission mode: default (asks before edits and commands), \
                  acceptEdits (edits allowed, commands ask), plan (changes nothing) or \
                  bypassPermissions (never asks); without a mode, show it",
        build: |values| Some(Command::Mode { mode: values.mode }),
        ..CommandSpec::DEFAULT
    },
    CommandSpec {
        kind: CommandKind::Profile,
        word: "profile",
        aliases: &["profiles"],
        summary: "list the profiles you may pick with `start … --profile=name`",
        thread_summary: Some("show the profile this session runs with"),
        build: |_| Some(Command::Profile),
        ..CommandSpec::DEFAULT
    },
];

/// The argument of `mode`: a permission mode, or none to show the current one.
const MODE_ARG: ArgSpec = ArgSpec {
    value: ValueKind {
        placeholder: "<default|acceptEdits|plan|bypassPermissions>",
        noun: "mode",
        parse: |text, _, values| match text.parse::<PermissionMode>() {
            Ok(mode) => {
                values.mode = Some(mode);
                Ok(())
            }
            Err(_) => Err(CommandError::BadMode {
                value: text.to_owned(),
            }),
        },
    },
    presence: Presence::Optional,
    missing: |command| CommandError::MissingDomain { command },
    surplus: ArgSpec::UNEXPECTED,
};

/// The domain argument of `revoke`, normalised like a network request.
const DOMAIN_ARG: ArgSpec = ArgSpec {
    value: ValueKind {
        placeholder: "<domain>",
        noun: "domain",
        parse: |text, _, values| match crate::firewall::domain::parse_domain(text) {
            Ok(domain) => {
                values.domain = Some(domain.as_str().to_owned());
                Ok(())
            }
            Err(e) => Err(CommandError::BadDomain {
                value: text.to_owned(),
                reason: e.to_string(),
            }),
        },
    },
    presence: Presence::Required,
    missing: |command| CommandError::MissingDomain { command },
    surplus: ArgSpec::UNEXPECTED,
};

/// The session argument of `stop` and `join`: an id prefix, or this thread's session.
const ID_ARG: ArgSpec = ArgSpec {
    value: ValueKind {
        placeholder: "<id-prefix>",
        noun: "id prefix",
        parse: |text, _, values| {
            values.id_prefix = Some(IdPrefix::parse(text)?);
            Ok(())
        },
    },
    presence: Presence::ThreadDefault,
    missing: |command| CommandError::MissingIdPrefix { command },
    surplus: ArgSpec::UNEXPECTED,
};

/// The user argument of `invite` and `kick`.
const USER_ARG: ArgSpec = ArgSpec {
    value: ValueKind {
        placeholder: "@user",
        noun: "user",
        parse: |text, _, values| {
            values.user = Some(UserName::parse(text)?);
            Ok(())
        },
    },
    presence: Presence::Required,
    missing: |command| CommandError::MissingUser { command },
    surplus: ArgSpec::UNEXPECTED,
};

/// The optional `all` of `status`.
const ALL: ValueKind = ValueKind {
    placeholder: "all",
    noun: "`all`",
    parse: |text, _, values| {
        if text.eq_ignore_ascii_case("all") {
            values.all = true;
            Ok(())
        } else {
            Err(CommandError::UnexpectedArgument {
                command: CommandKind::Status,
                arg: text.to_owned(),
            })
        }
    },
};

/// The repository argument of `start` and `orchestrate`.
const REPO_ARG: ArgSpec = ArgSpec {
    value: REPO,
    presence: Presence::Required,
    missing: |command| CommandError::MissingRepository { command },
    surplus: |command, extra| CommandError::TooManyRepositories { command, extra },
};

/// `--worktree` / `--worktree=name` of `start`.
const WORKTREE: OptionSpec = OptionSpec {
    flag: WORKTREE_FLAG,
    value: ValueKind {
        placeholder: "name",
        noun: "worktree name",
        parse: |text, _, values| {
            values.worktree = Some(WorktreeChoice::Named(WorktreeName::parse(text)?));
            Ok(())
        },
    },
    bare: Bare::Means {
        store: |values| values.worktree = Some(WorktreeChoice::Auto),
        detached: |value| CommandError::WorktreeNameNeedsEquals { value },
    },
};

/// `org/repo[@branch]`, or `repo[@branch]` with a default organisation.
const REPO: ValueKind = ValueKind {
    placeholder: "org/repo[@branch]",
    noun: "repository",
    parse: |text, ctx, values| {
        values.repo = Some(RepoRef::parse_with_default_org(text, ctx.default_org)?);
        Ok(())
    },
};

/// `--profile=name` of `start` and `orchestrate`.
const PROFILE: OptionSpec = OptionSpec {
    flag: PROFILE_FLAG,
    value: ValueKind {
        placeholder: "name",
        noun: "profile name",
        parse: |text, _, values| {
            values.profile = Some(ProfileName::parse(text)?);
            Ok(())
        },
    },
    bare: Bare::Error(|command| CommandError::MissingProfileName { command }),
};

/// The `--profile` option as written in usage texts and errors.
const PROFILE_FLAG: &str = "--profile";

/// The `--worktree` option as written in usage texts and errors.
const WORKTREE_FLAG: &str = "--worktree";

// Every discriminant of `CommandKind` indexes its own entry of `SPECS`.
const _: () = {
    let mut i = 0;
    while i < SPECS.len() {
        assert!(
            SPECS[i].kind as usize == i,
            "SPECS is not in CommandKind order"
        );
        i += 1;
    }
};

/// One command of the chat grammar.
struct CommandSpec {
    /// Which command this is.
    kind: CommandKind,
    /// The command word, lowercase (matched ASCII case-insensitively).
    word: &'static str,
    /// Other words for the same command.
    aliases: &'static [&'static str],
    /// Where the command may be written.
    scope: Scope,
    /// Positional arguments, in order; required ones come first.
    args: &'static [ArgSpec],
    /// Named options, written anywhere among the arguments.
    options: &'static [OptionSpec],
    /// One line for the help text.
    summary: &'static str,
    /// Replaces `summary` in a session thread's help text.
    thread_summary: Option<&'static str>,
    /// Assembles the command; `None` only when a required value is missing,
    /// which [`CommandSpec::read`] has already ruled out.
    build: fn(Values) -> Option<Command>,
}

/// Where a command may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// At the top level and in session threads.
    Anywhere,
    /// In a session's thread only ([`CommandError::ThreadOnly`] elsewhere).
    ThreadOnly,
}

/// A positional argument.
struct ArgSpec {
    /// What it holds.
    value: ValueKind,
    /// Whether it may be left out.
    presence: Presence,
    /// The error when it is required but missing.
    missing: fn(CommandKind) -> CommandError,
    /// The error when this is the last argument and another one follows it
    /// (the first extra argument as typed).
    surplus: fn(CommandKind, String) -> CommandError,
}

/// Whether a positional argument may be left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// Never.
    Required,
    /// Always (e.g. `all` in a `status [all]`).
    Optional,
    /// In a session thread, where leaving it out means the thread's own
    /// session (`stop`); required elsewhere.
    ThreadDefault,
}

impl Presence {
    /// Whether the argument must be given.
    fn required(self, in_session_thread: bool) -> bool {
        match self {
            Presence::Required => true,
            Presence::Optional => false,
            Presence::ThreadDefault => !in_session_thread,
        }
    }
}

/// A named option: `--name` or `--name=value`, with a leading `—` or `–`
/// accepted in place of `--`.
struct OptionSpec {
    /// `--name` as shown in texts and errors; the name is matched ASCII
    /// case-insensitively.
    flag: &'static str,
    /// The value after `=`.
    value: ValueKind,
    /// What the option means without `=value`.
    bare: Bare,
}

impl OptionSpec {
    /// Whether `name` (without the dashes) names this option.
    fn is_named(&self, name: &str) -> bool {
        self.flag
            .strip_prefix("--")
            .is_some_and(|own| own.eq_ignore_ascii_case(name))
    }
}

/// The meaning of an option written without `=value`.
#[derive(Clone, Copy)]
enum Bare {
    /// A value of its own (`--worktree`: a generated name). A value must then
    /// be attached with `=`: if the argument right after the bare option
    /// turns out to be one too many, `detached` reports it (as typed).
    Means {
        /// Records the bare meaning.
        store: fn(&mut Values),
        /// The error for `--option value` written with a space.
        detached: DetachedError,
    },
    /// Nothing: the option needs `=value` (e.g. `--profile=name`).
    Error(fn(CommandKind) -> CommandError),
}

/// Builds the error for a value written after a bare option with a space
/// (given the value as typed).
type DetachedError = fn(String) -> CommandError;

/// A kind of value taken from the user.
#[derive(Clone, Copy)]
struct ValueKind {
    /// How usage texts show it, e.g. `org/repo[@branch]`.
    placeholder: &'static str,
    /// What error texts call it, e.g. `repository`.
    noun: &'static str,
    /// Validates the text as typed and stores the value.
    parse: fn(&str, &ParseContext<'_>, &mut Values) -> Result<(), CommandError>,
}

/// The values read from one command, filled in by the [`ValueKind`]s and
/// turned into a [`Command`] by [`CommandSpec::build`].
#[derive(Debug, Default)]
struct Values {
    /// A repository argument.
    repo: Option<RepoRef>,
    /// An id prefix argument.
    id_prefix: Option<IdPrefix>,
    /// The `--worktree` option.
    worktree: Option<WorktreeChoice>,
    /// The `--profile` option.
    profile: Option<ProfileName>,
    /// A user argument.
    user: Option<UserName>,
    /// A domain argument, normalised.
    domain: Option<String>,
    /// A permission mode argument.
    mode: Option<PermissionMode>,
    /// `all` was given.
    all: bool,
    /// Values of the test-only table.
    #[cfg(test)]
    words: Vec<String>,
}

impl CommandSpec {
    /// The fields most entries leave as they are: no aliases, allowed
    /// anywhere, no arguments or options, the same summary in threads. Every
    /// entry sets `kind`, `word`, `summary` and `build`.
    const DEFAULT: CommandSpec = CommandSpec {
        kind: CommandKind::Help,
        word: "",
        aliases: &[],
        scope: Scope::Anywhere,
        args: &[],
        options: &[],
        summary: "",
        thread_summary: None,
        build: |_| None,
    };
}

impl ArgSpec {
    /// [`CommandError::UnexpectedArgument`], the usual [`ArgSpec::surplus`].
    const UNEXPECTED: fn(CommandKind, String) -> CommandError =
        |command, arg| CommandError::UnexpectedArgument { command, arg };
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// A well-formed command.
///
/// [`fmt::Display`] renders the canonical text without the trigger (e.g.
/// `start acme/api@main --worktree=fix`); prefixing it with the trigger and a
/// space and parsing it in the same kind of context gives the same value back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Command {
    /// `start org/repo[@branch] [--worktree[=name]] [--profile=name]`: start a Claude Code
    /// session on a repository.
    Start {
        /// The repository (organisation filled in from the default if omitted).
        repo: RepoRef,
        /// `None`: work in the main checkout; otherwise use a git worktree.
        worktree: Option<WorktreeChoice>,
        /// `--profile=name`; `None`: the `default` profile, if there is one.
        profile: Option<ProfileName>,
    },
    /// `orchestrate org/repo[@branch] [--profile=name]`: start an orchestrator session.
    Orchestrate {
        /// The repository (organisation filled in from the default if omitted).
        repo: RepoRef,
        /// `--profile=name`; `None`: the `default` profile, if there is one.
        profile: Option<ProfileName>,
    },
    /// `stop <id-prefix>`, or bare `stop` in a session thread.
    Stop {
        /// `None`: the session that owns the thread the command was written in.
        target: Option<IdPrefix>,
    },
    /// `status [all]`: list the asker's sessions (every session with `all`, for admins).
    Status {
        /// `status all`.
        all: bool,
    },
    /// `help`, or the bare trigger.
    Help,
    /// `compact` (session thread only): compact the session's context.
    Compact,
    /// `clear` (session thread only): clear the session's conversation.
    Clear,
    /// `restart` (session thread only): restart the session.
    Restart,
    /// `context` (session thread only): show the session's context usage.
    Context,
    /// `invite @user` (session thread only): let a user talk to the session.
    Invite {
        /// Who.
        user: UserName,
    },
    /// `kick @user` (session thread only): take back an invitation.
    Kick {
        /// Who.
        user: UserName,
    },
    /// `join <id-prefix>`, or bare `join` in a session thread: become a member of the
    /// session's project channel and follow its thread.
    Join {
        /// `None`: the session that owns the thread the command was written in.
        target: Option<IdPrefix>,
    },
    /// `interrupt` (also `escape`; session thread only): stop the turn in flight.
    Interrupt,
    /// `grants`: the live network grants of this thread's session, or (top level) of the
    /// asker's sessions, or every session's for admins.
    Grants,
    /// `revoke <domain>` (session thread only): end this session's grant for a domain.
    Revoke {
        /// The domain, normalised (lowercase, IDNA ASCII).
        domain: String,
    },
    /// `cost` (session thread only): spending against the budgets.
    Cost,
    /// `mode [<mode>]` (session thread only): switch the permission mode, or show it.
    Mode {
        /// The new mode; `None` shows the current one.
        mode: Option<PermissionMode>,
    },
    /// `profile` (also `profiles`): in a session thread, the session's profile; elsewhere,
    /// the profiles the asker may pick.
    Profile,
}

impl Command {
    /// The kind of this command.
    #[must_use]
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::Start { .. } => CommandKind::Start,
            Command::Orchestrate { .. } => CommandKind::Orchestrate,
            Command::Stop { .. } => CommandKind::Stop,
            Command::Status { .. } => CommandKind::Status,
            Command::Help => CommandKind::Help,
            Command::Compact => CommandKind::Compact,
            Command::Clear => CommandKind::Clear,
            Command::Restart => CommandKind::Restart,
            Command::Context => CommandKind::Context,
            Command::Invite { .. } => CommandKind::Invite,
            Command::Kick { .. } => CommandKind::Kick,
            Command::Join { .. } => CommandKind::Join,
            Command::Interrupt => CommandKind::Interrupt,
            Command::Grants => CommandKind::Grants,
            Command::Revoke { .. } => CommandKind::Revoke,
            Command::Mode { .. } => CommandKind::Mode,
            Command::Cost => CommandKind::Cost,
            Command::Profile => CommandKind::Profile,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Start {
                repo,
                worktree,
                profile,
            } => {
                write!(f, "start {repo}")?;
                match worktree {
                    None => {}
                    Some(WorktreeChoice::Auto) => write!(f, " {WORKTREE_FLAG}")?,
                    Some(WorktreeChoice::Named(name)) => write!(f, " {WORKTREE_FLAG}={name}")?,
                }
                match profile {
                    None => Ok(()),
                    Some(name) => write!(f, " {PROFILE_FLAG}={name}"),
                }
            }
            Command::Orchestrate { repo, profile } => {
                write!(f, "orchestrate {repo}")?;
                match profile {
                    None => Ok(()),
                    Some(name) => write!(f, " {PROFILE_FLAG}={name}"),
                }
            }
            Command::Stop { target: Some(id) } => write!(f, "stop {id}"),
            Command::Status { all: true } => f.write_str("status all"),
            Command::Invite { user } => write!(f, "invite {user}"),
            Command::Kick { user } => write!(f, "kick {user}"),
            Command::Join { target: Some(id) } => write!(f, "join {id}"),
            Command::Revoke { domain } => write!(f, "revoke {domain}"),
            Command::Mode { mode: Some(mode) } => write!(f, "mode {mode}"),
            other => f.write_str(other.kind().as_str()),
        }
    }
}

/// Whether and how a session gets its own git worktree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WorktreeChoice {
    /// `--worktree`: the session manager picks the name.
    Auto,
    /// `--worktree=name`.
    Named(WorktreeName),
}

/// The command words, without their arguments.
///
/// The variants are in the order of the command table, which
/// [`CommandKind::ALL`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::EnumCount)]
pub enum CommandKind {
    /// `start`
    Start,
    /// `orchestrate`
    Orchestrate,
    /// `stop`
    Stop,
    /// `status`
    Status,
    /// `help`
    Help,
    /// `compact` (session thread only)
    Compact,
    /// `clear` (session thread only)
    Clear,
    /// `restart` (session thread only)
    Restart,
    /// `context` (session thread only)
    Context,
    /// `invite` (session thread only)
    Invite,
    /// `kick` (session thread only)
    Kick,
    /// `join`
    Join,
    /// `interrupt` (session thread only)
    Interrupt,
    /// `grants`
    Grants,
    /// `revoke` (session thread only)
    Revoke,
    /// `cost` (session thread only)
    Cost,
    /// `mode` (session thread only)
    Mode,
    /// `profile`
    Profile,
}

impl CommandKind {
    /// Every command kind, in the order used by help texts.
    pub const ALL: [CommandKind; CommandKind::COUNT] = {
        let mut all = [CommandKind::Start; CommandKind::COUNT];
        let mut i = 0;
        while i < all.len() {
            all[i] = SPECS[i].kind;
            i += 1;
        }
        all
    };

    /// This command's entry in the table. Cannot fail: the table has one
    /// entry per kind, in kind order (checked when compiling).
    fn spec(self) -> &'static CommandSpec {
        &SPECS[self as usize]
    }

    /// The command word in lowercase, e.g. `"start"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        self.spec().word
    }

    /// Looks up a command word (or alias), ASCII case-insensitively. `None`
    /// if unknown.
    #[must_use]
    pub fn from_word(word: &str) -> Option<CommandKind> {
        find_spec(&SPECS, word).map(|spec| spec.kind)
    }

    /// `true` for commands that only make sense in a session's thread.
    #[must_use]
    pub fn is_thread_only(self) -> bool {
        self.spec().scope == Scope::ThreadOnly
    }

    /// Markdown showing the accepted form(s) of the command, e.g.
    /// ``"`@claude start org/repo[@branch] [--worktree[=name]] [--profile=name]`"``.
    #[must_use]
    pub fn usage(self, trigger: &str) -> String {
        self.spec().usage(trigger)
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Reading a command's arguments
// ---------------------------------------------------------------------------

impl CommandSpec {
    /// Reads the words after the command word. `table` is the whole command
    /// table, to tell an option of another command
    /// ([`CommandError::FlagNotAllowed`]) from an unknown one.
    ///
    /// Errors come in this order: [`CommandError::ThreadOnly`]; the first
    /// bad option in the order written (unknown, not allowed, repeated,
    /// invalid value); a missing argument; one argument too many; the first
    /// invalid argument value.
    fn read<'t>(
        &self,
        table: &[CommandSpec],
        tokens: impl Iterator<Item = &'t str>,
        ctx: &ParseContext<'_>,
    ) -> Result<Values, CommandError> {
        let command = self.kind;
        if self.scope == Scope::ThreadOnly && !ctx.in_session_thread {
            return Err(CommandError::ThreadOnly { command });
        }
        let mut values = Values::default();
        let mut given: Vec<&str> = Vec::new();
        let mut positionals = Vec::new();
        // The `detached` error of a bare option that was just read, and the
        // first argument written right after such an option.
        let mut after_bare: Option<DetachedError> = None;
        let mut detached: Option<(DetachedError, &str)> = None;

        for token in tokens {
            let Some((name, value)) = split_option(token) else {
                if let Some(error) = after_bare.take() {
                    detached.get_or_insert((error, token));
                }
                positionals.push(token);
                continue;
            };
            after_bare = None;
            let Some(option) = self.options.iter().find(|option| option.is_named(name)) else {
                let known = table.iter().flat_map(|spec| spec.options);
                return Err(match known.into_iter().find(|o| o.is_named(name)) {
                    Some(other) => CommandError::FlagNotAllowed {
                        flag: other.flag,
                        command,
                    },
                    None => CommandError::UnknownFlag {
                        flag: token
                            .split_once('=')
                            .map_or(token, |(flag, _)| flag)
                            .to_owned(),
                        command,
                    },
                });
            };
            if given.contains(&option.flag) {
                return Err(CommandError::DuplicateFlag {
                    flag: option.flag,
                    command,
                });
            }
            given.push(option.flag);
            match (value, option.bare) {
                (Some(text), _) => (option.value.parse)(text, ctx, &mut values)?,
                (None, Bare::Means { store, detached }) => {
                    store(&mut values);
                    after_bare = Some(detached);
                }
                (None, Bare::Error(error)) => return Err(error(command)),
            }
        }

        if let Some(next) = self.args.get(positionals.len()) {
            if next.presence.required(ctx.in_session_thread) {
                return Err((next.missing)(command));
            }
        }
        if let Some(&extra) = positionals.get(self.args.len()) {
            if let Some((error, value)) = detached {
                return Err(error(value.to_owned()));
            }
            let surplus = self
                .args
                .last()
                .map_or(ArgSpec::UNEXPECTED, |arg| arg.surplus);
            return Err(surplus(command, extra.to_owned()));
        }
        for (arg, text) in self.args.iter().zip(positionals) {
            (arg.value.parse)(text, ctx, &mut values)?;
        }
        Ok(values)
    }

    /// Assembles the command from what [`CommandSpec::read`] returned.
    fn build(&self, values: Values) -> Result<Command, CommandError> {
        // `build` fails only on a missing required value, which `read`
        // reports first; answer the same way should the table ever disagree.
        (self.build)(values).ok_or_else(|| match self.args.first() {
            Some(arg) => (arg.missing)(self.kind),
            None => CommandError::Empty,
        })
    }
}

/// Splits an option-like token into its name and `=value`; `None` when it
/// does not start with `--`, `—` (em dash) or `–` (en dash), which phone
/// keyboards make of `--`.
fn split_option(token: &str) -> Option<(&str, Option<&str>)> {
    let body = token
        .strip_prefix("--")
        .or_else(|| token.strip_prefix('\u{2014}'))
        .or_else(|| token.strip_prefix('\u{2013}'))?;
    Some(match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    })
}

// ---------------------------------------------------------------------------
// Usage and help texts
// ---------------------------------------------------------------------------

impl CommandSpec {
    /// The form of the command without the trigger, e.g.
    /// `start org/repo[@branch] [--worktree[=name]] [--profile=name]`. Arguments a session
    /// thread may leave out are in brackets when `in_session_thread`.
    fn synopsis(&self, in_session_thread: bool) -> String {
        let mut out = self.word.to_owned();
        for arg in self.args {
            let placeholder = arg.value.placeholder;
            if arg.presence.required(in_session_thread) {
                out.push_str(&format!(" {placeholder}"));
            } else {
                out.push_str(&format!(" [{placeholder}]"));
            }
        }
        for option in self.options {
            let (flag, placeholder) = (option.flag, option.value.placeholder);
            match option.bare {
                Bare::Means { .. } => out.push_str(&format!(" [{flag}[={placeholder}]]")),
                Bare::Error(_) => out.push_str(&format!(" [{flag}={placeholder}]")),
            }
        }
        out
    }

    /// Markdown for [`CommandKind::usage`].
    fn usage(&self, trigger: &str) -> String {
        let call = |rest: &str| code_call(trigger, rest);
        if self.scope == Scope::ThreadOnly {
            let form = self.synopsis(true);
            return format!("`!{form}` or {}, in a session's thread", call(&form));
        }
        let form = self.synopsis(false);
        if !self.has_thread_default() {
            return call(&form);
        }
        // The short form a session thread allows: the required arguments only.
        let mut short = self.word.to_owned();
        for arg in self.args.iter().filter(|arg| arg.presence.required(true)) {
            short.push_str(&format!(" {}", arg.value.placeholder));
        }
        format!(
            "{}, or in the session's thread `!{short}` / {}",
            call(&form),
            call(&short)
        )
    }

    /// Whether a session thread may leave out an argument that is required
    /// elsewhere.
    fn has_thread_default(&self) -> bool {
        self.args
            .iter()
            .any(|arg| arg.presence == Presence::ThreadDefault)
    }

    /// The help text's line for this command.
    fn help_line(&self, trigger: &str, in_session_thread: bool) -> String {
        let form = self.synopsis(in_session_thread);
        let summary = match self.thread_summary {
            Some(summary) if in_session_thread => summary,
            _ => self.summary,
        };
        let aliases = if self.aliases.is_empty() {
            String::new()
        } else {
            let words: Vec<String> = self.aliases.iter().map(|a| format!("`{a}`")).collect();
            format!(" (also {})", join_and(&words))
        };
        if in_session_thread {
            format!(
                "- `!{form}` or {} — {summary}{aliases}\n",
                code_call(trigger, &form)
            )
        } else {
            format!("- {} — {summary}{aliases}\n", code_call(trigger, &form))
        }
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// [`help_text`] for any command table.
fn render_help(specs: &[CommandSpec], trigger: &str, in_session_thread: bool) -> String {
    let mut out = String::new();
    if in_session_thread {
        out.push_str(&format!(
            "**Commands in this session thread.** Start a message with {} or `!`, \
             e.g. `!status`. Anything else you write here goes to the session.\n",
            code(&trigger_text(trigger)),
        ));
        for spec in specs {
            out.push_str(&spec.help_line(trigger, true));
        }
    } else {
        out.push_str("**Commands**\n");
        for spec in specs.iter().filter(|spec| spec.scope != Scope::ThreadOnly) {
            out.push_str(&spec.help_line(trigger, false));
        }
        let quoted = |spec: &CommandSpec| format!("`{}`", spec.word);
        let thread_only: Vec<String> = specs
            .iter()
            .filter(|spec| spec.scope == Scope::ThreadOnly)
            .map(quoted)
            .collect();
        let bare: Vec<String> = specs
            .iter()
            .filter(|spec| spec.has_thread_default())
            .map(quoted)
            .collect();
        let mut also = Vec::new();
        if !thread_only.is_empty() {
            also.push(join_and(&thread_only));
        }
        if !bare.is_empty() {
            also.push(format!("bare {}", join_and(&bare)));
        }
        let example = specs
            .iter()
            .find(|spec| spec.has_thread_default())
            .map_or("status", |spec| spec.word);
        let short = format!("the short `!` forms (e.g. `!{example}`)");
        let also = if also.is_empty() {
            short
        } else {
            format!("{}, and {short}", also.join(", "))
        };
        out.push_str(&format!(
            "\nIn a session's thread you can also use {also}.\n"
        ));
    }
    out.push_str(
        "\n`org/` may be left out when a default organisation is configured. \
         Command words are case-insensitive.",
    );
    out
}

/// Markdown help listing the commands available in the given context, using
/// `trigger` in the examples (and the `!` forms inside a session thread).
#[must_use]
pub fn help_text(trigger: &str, in_session_thread: bool) -> String {
    render_help(&SPECS, trigger, in_session_thread)
}

// ---------------------------------------------------------------------------
// Validated values
// ---------------------------------------------------------------------------

/// Why a name was rejected; carried by the `Bad*` variants of
/// [`CommandError`]. Its [`fmt::Display`] is a Markdown fragment such as
/// ``"`;` is not allowed"``.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// The value is empty.
    Empty,
    /// Fewer than `min` characters (`len` were given).
    TooShort {
        /// Characters given.
        len: usize,
        /// Minimum accepted.
        min: usize,
    },
    /// More than `max` characters (`len` were given).
    TooLong {
        /// Characters given.
        len: usize,
        /// Maximum accepted.
        max: usize,
    },
    /// `ch` (the first offending character) is outside the allowed alphabet.
    BadChar {
        /// The offending character, as typed.
        ch: char,
    },
    /// The value must not start with `ch`.
    BadStart {
        /// The offending first character.
        ch: char,
    },
    /// The value must not end with `ch`.
    BadEnd {
        /// The offending last character.
        ch: char,
    },
    /// The value, or one of its `/`-separated parts, ends with `suffix`.
    BadSuffix {
        /// The forbidden suffix, e.g. `".lock"`.
        suffix: &'static str,
    },
    /// The value contains the forbidden `sequence` (e.g. `".."`, `"--"`).
    Contains {
        /// The forbidden sequence.
        sequence: &'static str,
    },
    /// A `/`-separated part of a branch name starts with `.`.
    DotComponent,
    /// The whole value is reserved (`.`, `..`, `@`, `HEAD`).
    Reserved,
    /// A repository name ends in `.git`; `suggestion` is the name without it.
    GitSuffix {
        /// The name without the `.git` suffix.
        suggestion: String,
    },
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidReason::Empty => f.write_str("it is empty"),
            InvalidReason::TooShort { len, min } => {
                write!(f, "it is {len} characters long, at least {min} are needed")
            }
            InvalidReason::TooLong { len, max } => {
                write!(f, "it is {len} characters long, at most {max} are allowed")
            }
            InvalidReason::BadChar { ch } => write!(f, "{} is not allowed", describe_char(*ch)),
            InvalidReason::BadStart { ch } => {
                write!(f, "it must not start with {}", describe_char(*ch))
            }
            InvalidReason::BadEnd { ch } => {
                write!(f, "it must not end with {}", describe_char(*ch))
            }
            InvalidReason::BadSuffix { suffix } => write!(
                f,
                "neither it nor any `/`-separated part of it may end with {}",
                quote(suffix)
            ),
            InvalidReason::Contains { sequence } => {
                write!(f, "it must not contain {}", quote(sequence))
            }
            InvalidReason::DotComponent => {
                f.write_str("no `/`-separated part of it may start with `.`")
            }
            InvalidReason::Reserved => f.write_str("that name is reserved"),
            InvalidReason::GitSuffix { suggestion } => write!(
                f,
                "leave out the `.git` suffix and write {}",
                quote(suggestion)
            ),
        }
    }
}

/// Checks emptiness and maximum length (in characters).
fn check_length(value: &str, max: usize) -> Result<(), InvalidReason> {
    if value.is_empty() {
        return Err(InvalidReason::Empty);
    }
    let len = value.chars().count();
    if len > max {
        return Err(InvalidReason::TooLong { len, max });
    }
    Ok(())
}

/// Fails on the first character for which `allowed` is false.
fn check_alphabet(value: &str, allowed: impl Fn(char) -> bool) -> Result<(), InvalidReason> {
    match value.chars().find(|&ch| !allowed(ch)) {
        Some(ch) => Err(InvalidReason::BadChar { ch }),
        None => Ok(()),
    }
}

/// Fails if the value starts with one of `forbidden`.
fn check_start(value: &str, forbidden: &[char]) -> Result<(), InvalidReason> {
    match value.chars().next() {
        Some(ch) if forbidden.contains(&ch) => Err(InvalidReason::BadStart { ch }),
        _ => Ok(()),
    }
}

/// Fails if the value ends with one of `forbidden`.
fn check_end(value: &str, forbidden: &[char]) -> Result<(), InvalidReason> {
    match value.chars().next_back() {
        Some(ch) if forbidden.contains(&ch) => Err(InvalidReason::BadEnd { ch }),
        _ => Ok(()),
    }
}

/// Fails if the value contains any of `sequences`.
fn check_contains(value: &str, sequences: &[&'static str]) -> Result<(), InvalidReason> {
    match sequences.iter().copied().find(|seq| value.contains(seq)) {
        Some(sequence) => Err(InvalidReason::Contains { sequence }),
        None => Ok(()),
    }
}

/// `value` without `suffix` (ASCII case-insensitive), if it ends with it.
fn strip_suffix_ignore_case<'v>(value: &'v str, suffix: &str) -> Option<&'v str> {
    let cut = value.len().checked_sub(suffix.len())?;
    let tail = value.get(cut..)?;
    if tail.eq_ignore_ascii_case(suffix) {
        value.get(..cut)
    } else {
        None
    }
}

/// Generates a validated string newtype's shared impls.
macro_rules! validated_string {
    ($name:ident, $variant:ident, $validate:ident) => {
        impl $name {
            /// Validates `value` and wraps it.
            ///
            /// # Errors
            ///
            /// A value that breaks one of the rules in the type's documentation
            /// is reported as
            #[doc = concat!("[`CommandError::", stringify!($variant), "`]")]
            /// holding the value as typed and an [`InvalidReason`].
            pub fn parse(value: &str) -> Result<Self, CommandError> {
                match $validate(value) {
                    Ok(()) => Ok($name(value.to_owned())),
                    Err(reason) => Err(CommandError::$variant {
                        value: value.to_owned(),
                        reason,
                    }),
                }
            }

            /// The validated value.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = CommandError;

            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Self::parse(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// A GitHub user or organisation name: 1–39 ASCII letters, digits and single
/// hyphens, not starting or ending with a hyphen. Case is kept as typed.
///
/// Built only by [`OrgName::parse`] / [`FromStr`]; errors are
/// [`CommandError::BadOrg`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgName(String);

impl OrgName {
    /// Maximum length in characters.
    pub const MAX_LEN: usize = 39;
}

fn validate_org(value: &str) -> Result<(), InvalidReason> {
    check_length(value, OrgName::MAX_LEN)?;
    check_alphabet(value, |c| c.is_ascii_alphanumeric() || c == '-')?;
    check_start(value, &['-'])?;
    check_end(value, &['-'])?;
    check_contains(value, &["--"])
}

validated_string!(OrgName, BadOrg, validate_org);

/// A GitHub repository name: 1–100 ASCII letters, digits, `.`, `_` and `-`,
/// not starting with `.` or `-`, not `.`/`..`, and without a trailing `.git`
/// (the error suggests the name without it).
///
/// Built only by [`RepoName::parse`] / [`FromStr`]; errors are
/// [`CommandError::BadRepo`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// Maximum length in characters.
    pub const MAX_LEN: usize = 100;
}

fn validate_repo(value: &str) -> Result<(), InvalidReason> {
    check_length(value, RepoName::MAX_LEN)?;
    check_alphabet(value, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })?;
    if value == "." || value == ".." {
        return Err(InvalidReason::Reserved);
    }
    check_start(value, &['.', '-'])?;
    match strip_suffix_ignore_case(value, ".git") {
        Some(stem) => Err(InvalidReason::GitSuffix {
            suggestion: stem.to_owned(),
        }),
        None => Ok(()),
    }
}

validated_string!(RepoName, BadRepo, validate_repo);

/// A git branch name, following `git check-ref-format --branch` but stricter:
/// 1–200 ASCII letters, digits, `.`, `_`, `/` and `-`; not starting with `-`,
/// `/` or `.`; not ending with `/` or `.`; no `..` or `//`; no `/`-separated
/// part starting with `.` or ending with `.lock`; not `@` or `HEAD`; no `@{`.
///
/// Built only by [`BranchName::parse`] / [`FromStr`]; errors are
/// [`CommandError::BadBranch`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchName(String);

impl BranchName {
    /// Maximum length in characters.
    pub const MAX_LEN: usize = 200;
}

fn validate_branch(value: &str) -> Result<(), InvalidReason> {
    check_length(value, BranchName::MAX_LEN)?;
    if value == "@" || value == "HEAD" {
        return Err(InvalidReason::Reserved);
    }
    check_contains(value, &["@{"])?;
    check_alphabet(value, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')
    })?;
    check_start(value, &['-', '/', '.'])?;
    check_end(value, &['/', '.'])?;
    check_contains(value, &["..", "//"])?;
    for part in value.split('/') {
        if part.starts_with('.') {
            return Err(InvalidReason::DotComponent);
        }
        if strip_suffix_ignore_case(part, ".lock").is_some() {
            return Err(InvalidReason::BadSuffix { suffix: ".lock" });
        }
    }
    Ok(())
}

validated_string!(BranchName, BadBranch, validate_branch);

/// A git worktree name: 1–100 ASCII letters, digits, `_`, `.` and `-`, not
/// starting with `.` or `-`, and without `..` anywhere.
///
/// Built only by [`WorktreeName::parse`] / [`FromStr`]; errors are
/// [`CommandError::BadWorktree`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorktreeName(String);

impl WorktreeName {
    /// Maximum length in characters.
    pub const MAX_LEN: usize = 100;
}

fn validate_worktree(value: &str) -> Result<(), InvalidReason> {
    check_length(value, WorktreeName::MAX_LEN)?;
    check_alphabet(value, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
    })?;
    check_start(value, &['.', '-'])?;
    check_contains(value, &[".."])
}

validated_string!(WorktreeName, BadWorktree, validate_worktree);

/// A profile name (`--profile=name`, a `[profile.<name>]` of `SM_PROFILES_FILE`): 1–64
/// ASCII letters, digits, `_` and `-`, not starting with `-`.
///
/// Built only by [`ProfileName::parse`] / [`FromStr`]; errors are
/// [`CommandError::BadProfile`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileName(String);

fn validate_profile(value: &str) -> Result<(), InvalidReason> {
    check_length(value, crate::profile::MAX_NAME_LEN)?;
    check_alphabet(value, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
    })?;
    check_start(value, &['-'])
}

validated_string!(ProfileName, BadProfile, validate_profile);

/// A chat user as named in a command: `@name` or `name`, 1–64 ASCII letters,
/// digits, `.`, `_` and `-` after the optional `@`, not starting with `-`
/// (Mattermost usernames are a subset). The `@` is not part of the value.
///
/// Built only by [`UserName::parse`] / [`FromStr`]; errors are
/// [`CommandError::BadUser`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserName(String);

impl UserName {
    /// Maximum length in characters (without the `@`).
    pub const MAX_LEN: usize = 64;

    /// Validates `value` (with or without a leading `@`).
    ///
    /// # Errors
    ///
    /// [`CommandError::BadUser`] holding the value as typed and an
    /// [`InvalidReason`].
    pub fn parse(value: &str) -> Result<Self, CommandError> {
        let name = value.strip_prefix('@').unwrap_or(value);
        let valid = check_length(name, Self::MAX_LEN)
            .and_then(|()| {
                check_alphabet(name, |c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
                })
            })
            .and_then(|()| check_start(name, &['-', '.']));
        match valid {
            Ok(()) => Ok(UserName(name.to_owned())),
            Err(reason) => Err(CommandError::BadUser {
                value: value.to_owned(),
                reason,
            }),
        }
    }

    /// The name, without `@`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UserName {
    type Err = CommandError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::parse(value)
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// The start of a session id (session ids are lowercase UUIDs): 4–36
/// characters from `0-9`, `a-f` and `-`, not starting with `-`. Input is
/// lowercased (ASCII) first, so `AB12` is accepted as `ab12`.
///
/// Built only by [`IdPrefix::parse`] / [`FromStr`]; errors are
/// [`CommandError::BadIdPrefix`] naming the first bad character or the length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdPrefix(String);

impl IdPrefix {
    /// Minimum length in characters.
    pub const MIN_LEN: usize = 4;
    /// Maximum length in characters (a full hyphenated UUID).
    pub const MAX_LEN: usize = 36;

    /// Validates and lowercases `value`.
    ///
    /// # Errors
    ///
    /// [`CommandError::BadIdPrefix`] holding the value as typed and an
    /// [`InvalidReason`] naming the first bad character or the length.
    pub fn parse(value: &str) -> Result<Self, CommandError> {
        match validate_id_prefix(value) {
            Ok(()) => Ok(IdPrefix(value.to_ascii_lowercase())),
            Err(reason) => Err(CommandError::BadIdPrefix {
                value: value.to_owned(),
                reason,
            }),
        }
    }

    /// The lowercased prefix.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `true` if the session id `id` starts with this prefix (ASCII
    /// case-insensitively).
    #[must_use]
    pub fn matches(&self, id: &str) -> bool {
        id.get(..self.0.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(&self.0))
    }
}

fn validate_id_prefix(value: &str) -> Result<(), InvalidReason> {
    if value.is_empty() {
        return Err(InvalidReason::Empty);
    }
    check_alphabet(value, |c| {
        let c = c.to_ascii_lowercase();
        c.is_ascii_digit() || matches!(c, 'a'..='f' | '-')
    })?;
    check_start(value, &['-'])?;
    // Only ASCII is left, so bytes are characters.
    let len = value.len();
    if len < IdPrefix::MIN_LEN {
        return Err(InvalidReason::TooShort {
            len,
            min: IdPrefix::MIN_LEN,
        });
    }
    if len > IdPrefix::MAX_LEN {
        return Err(InvalidReason::TooLong {
            len,
            max: IdPrefix::MAX_LEN,
        });
    }
    Ok(())
}

impl FromStr for IdPrefix {
    type Err = CommandError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::parse(value)
    }
}

impl fmt::Display for IdPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IdPrefix {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A repository, optionally with a branch: `org/repo` or `org/repo@branch`.
///
/// [`fmt::Display`] gives that form, and parsing it with [`FromStr`] returns
/// an equal value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoRef {
    org: OrgName,
    repo: RepoName,
    branch: Option<BranchName>,
}

impl RepoRef {
    /// Assembles a reference from already validated parts.
    #[must_use]
    pub fn new(org: OrgName, repo: RepoName, branch: Option<BranchName>) -> Self {
        RepoRef { org, repo, branch }
    }

    /// Parses `org/repo[@branch]`, or `repo[@branch]` using `default_org`
    /// (trimmed; empty counts as `None`).
    ///
    /// # Errors
    ///
    /// Parts are checked left to right: [`CommandError::RepositoryUrl`] for
    /// something that looks like a URL or SSH address,
    /// [`CommandError::BadOrg`], [`CommandError::BadRepo`] (also for a second
    /// `/`), [`CommandError::BadBranch`], then [`CommandError::NoDefaultOrg`] or
    /// [`CommandError::BadDefaultOrg`] when the organisation is left out.
    pub fn parse_with_default_org(
        value: &str,
        default_org: Option<&str>,
    ) -> Result<Self, CommandError> {
        let lower = value.to_ascii_lowercase();
        if lower.contains("://")
            || lower.starts_with("git@")
            || lower.starts_with("github.com/")
            || lower.starts_with("www.github.com/")
        {
            return Err(CommandError::RepositoryUrl {
                value: value.to_owned(),
            });
        }

        let (path, branch_text) = match value.split_once('@') {
            Some((path, branch)) => (path, Some(branch)),
            None => (value, None),
        };
        let (org_text, repo_text) = match path.split_once('/') {
            Some((org, repo)) => (Some(org), repo),
            None => (None, path),
        };

        let org = org_text.map(OrgName::parse).transpose()?;
        let repo = RepoName::parse(repo_text)?;
        let branch = branch_text.map(BranchName::parse).transpose()?;

        let org = if let Some(org) = org {
            org
        } else {
            let default = default_org.map(str::trim).filter(|d| !d.is_empty());
            let Some(default) = default else {
                return Err(CommandError::NoDefaultOrg {
                    repo: value.to_owned(),
                });
            };
            validate_org(default).map_err(|reason| CommandError::BadDefaultOrg {
                value: default.to_owned(),
                reason,
            })?;
            OrgName(default.to_owned())
        };

        Ok(RepoRef { org, repo, branch })
    }

    /// The organisation (or user).
    #[must_use]
    pub fn org(&self) -> &OrgName {
        &self.org
    }

    /// The repository name.
    #[must_use]
    pub fn repo(&self) -> &RepoName {
        &self.repo
    }

    /// The branch, if one was given.
    #[must_use]
    pub fn branch(&self) -> Option<&BranchName> {
        self.branch.as_ref()
    }

    /// `org/repo`, without the branch.
    #[must_use]
    pub fn slug(&self) -> String {
        format!("{}/{}", self.org, self.repo)
    }
}

impl FromStr for RepoRef {
    type Err = CommandError;

    /// Parses `org/repo[@branch]` (no default organisation).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::parse_with_default_org(value, None)
    }
}

impl fmt::Display for RepoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.repo)?;
        match &self.branch {
            Some(branch) => write!(f, "@{branch}"),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A message addressed to the bot that is not a valid command.
///
/// [`fmt::Display`] is one Markdown sentence saying precisely what was wrong.
/// User-supplied values are shown in code spans (so mentions such as
/// `@channel` and Markdown do not take effect), truncated to
/// 60 characters, with control, invisible and backtick characters escaped
/// (`\n`, `\u{60}`, ...). [`CommandError::reply`] adds the correct form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// A lone `!` in a session thread.
    #[error("Empty command: write a command word right after `!`, e.g. `!status`.")]
    Empty,
    /// The word after the trigger is not a command.
    #[error("Unknown command {}.", quote(.word))]
    UnknownCommand {
        /// The word as typed.
        word: String,
    },
    /// `start` / `orchestrate` without a repository.
    #[error("`{command}` needs a repository.")]
    MissingRepository {
        /// The command.
        command: CommandKind,
    },
    /// `start` / `orchestrate` with more than one repository.
    #[error("`{command}` takes a single repository, but {} was given as well.", quote(.extra))]
    TooManyRepositories {
        /// The command.
        command: CommandKind,
        /// The first extra argument.
        extra: String,
    },
    /// `--worktree name` (with a space): the name was read as an extra
    /// argument.
    #[error(
        "A worktree name must be attached with `=` (`--worktree=name`); {} was read as a separate argument.",
        quote(.value)
    )]
    WorktreeNameNeedsEquals {
        /// The argument that followed `--worktree`.
        value: String,
    },
    /// Bare `stop` or `join` outside a session thread.
    #[error("`{command}` needs the id prefix of a session, or write it in the session's thread.")]
    MissingIdPrefix {
        /// The command.
        command: CommandKind,
    },
    /// Invalid organisation name.
    #[error("Invalid organisation name {}: {reason}.", quote(.value))]
    BadOrg {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// The configured default organisation (`SM_DEFAULT_ORG`) is invalid.
    #[error(
        "The configured default organisation (`SM_DEFAULT_ORG`) {} is invalid: {reason}.",
        quote(.value)
    )]
    BadDefaultOrg {
        /// The configured value (trimmed).
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// Invalid repository name.
    #[error("Invalid repository name {}: {reason}.", quote(.value))]
    BadRepo {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// Invalid branch name.
    #[error("Invalid branch name {}: {reason}.", quote(.value))]
    BadBranch {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// Invalid worktree name.
    #[error("Invalid worktree name {}: {reason}.", quote(.value))]
    BadWorktree {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// Invalid profile name.
    #[error("Invalid profile name {}: {reason}.", quote(.value))]
    BadProfile {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// `--profile` without `=name`.
    #[error("`--profile` needs a name: write `--profile=name`.")]
    MissingProfileName {
        /// The command.
        command: CommandKind,
    },
    /// `invite` / `kick` without a user.
    #[error("`{command}` needs a user, e.g. `@alice`.")]
    MissingUser {
        /// The command.
        command: CommandKind,
    },
    /// `revoke` without a domain.
    #[error("`{command}` needs a domain, e.g. `pypi.org`.")]
    MissingDomain {
        /// The command.
        command: CommandKind,
    },
    /// A `mode` argument that is not a permission mode.
    #[error("Unknown permission mode {}: use default, acceptEdits, plan or bypassPermissions.", quote(.value))]
    BadMode {
        /// The value as typed.
        value: String,
    },
    /// A domain argument that is not a valid domain.
    #[error("Invalid domain {}: {reason}.", quote(.value))]
    BadDomain {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Invalid user name.
    #[error("Invalid user name {}: {reason}.", quote(.value))]
    BadUser {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// Invalid session id prefix.
    #[error("Invalid session id prefix {}: {reason}.", quote(.value))]
    BadIdPrefix {
        /// The value as typed.
        value: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// A URL or SSH address was given instead of `org/repo`.
    #[error("Give the repository as `org/repo`, not as a URL ({}).", quote(.value))]
    RepositoryUrl {
        /// The value as typed.
        value: String,
    },
    /// `repo` without `org/`, and no default organisation is configured.
    #[error(
        "No default organisation is configured, so {} must be written as `org/repo`.",
        quote(.repo)
    )]
    NoDefaultOrg {
        /// The repository argument as typed.
        repo: String,
    },
    /// An option the command does not know.
    #[error("Unknown option {} for `{command}`.", quote(.flag))]
    UnknownFlag {
        /// The option as typed, without any `=value`.
        flag: String,
        /// The command.
        command: CommandKind,
    },
    /// An option given more than once.
    #[error("Option `{flag}` was given more than once.")]
    DuplicateFlag {
        /// The option, e.g. `"--worktree"`.
        flag: &'static str,
        /// The command.
        command: CommandKind,
    },
    /// A known option that this command does not accept (e.g. `--worktree`
    /// on `orchestrate`).
    #[error("`{command}` does not accept `{flag}`.")]
    FlagNotAllowed {
        /// The option, e.g. `"--worktree"`.
        flag: &'static str,
        /// The command.
        command: CommandKind,
    },
    /// An argument the command does not take.
    #[error("{}", unexpected_argument(*.command, .arg))]
    UnexpectedArgument {
        /// The command.
        command: CommandKind,
        /// The first unexpected argument.
        arg: String,
    },
    /// A session-thread command written outside a session thread.
    #[error("`{command}` only works in a session's thread.")]
    ThreadOnly {
        /// The command.
        command: CommandKind,
    },
}

/// The text of [`CommandError::UnexpectedArgument`].
fn unexpected_argument(command: CommandKind, arg: &str) -> String {
    match command.spec().args.last() {
        Some(last) => format!(
            "`{command}` takes a single {}, but {} was given as well.",
            last.value.noun,
            quote(arg)
        ),
        None => format!("`{command}` takes no arguments, but got {}.", quote(arg)),
    }
}

impl CommandError {
    /// A Markdown reply for the chat: the problem (the [`fmt::Display`] text)
    /// in bold-prefixed form, a blank line, and the correct form(s) of the
    /// command using `trigger`, e.g.
    /// ``"Usage: `@claude start org/repo[@branch] [--worktree[=name]] [--profile=name]`"``.
    ///
    /// Never empty; the only control character it contains is `\n`.
    #[must_use]
    pub fn reply(&self, trigger: &str) -> String {
        const ORG_RULES: &str = "Organisation names use letters, digits and single hyphens \
             (at most 39 characters, no hyphen at either end).";
        const REPO_RULES: &str = "Repository names use letters, digits, `.`, `_` and `-` \
             (at most 100 characters, not starting with `.` or `-`).";
        const BRANCH_RULES: &str = "Branch names use letters, digits, `.`, `_`, `/` and `-` \
             (at most 200 characters).";
        const WORKTREE_RULES: &str = "Worktree names use letters, digits, `.`, `_` and `-` \
             (at most 100 characters, not starting with `.` or `-`).";

        let usage = |kind: CommandKind| format!("Usage: {}", kind.usage(trigger));
        let repo_form = format!(
            "Write the repository as `org/repo` or `org/repo@branch`, e.g. {}.",
            code_call(trigger, "start acme/api@main")
        );
        let id_help = format!(
            "An id prefix is the first 4 to 36 characters of a session id (`0-9`, `a-f`, `-`); \
             {} lists the sessions. {}",
            code_call(trigger, "status"),
            usage(match self {
                CommandError::MissingIdPrefix { command } => *command,
                _ => CommandKind::Stop,
            })
        );

        let help = match self {
            CommandError::Empty | CommandError::UnknownCommand { .. } => format!(
                "Commands: {}. Send {} for details.",
                CommandKind::ALL
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                code_call(trigger, "help")
            ),
            CommandError::MissingRepository { command }
            | CommandError::TooManyRepositories { command, .. }
            | CommandError::UnknownFlag { command, .. }
            | CommandError::DuplicateFlag { command, .. }
            | CommandError::FlagNotAllowed { command, .. }
            | CommandError::UnexpectedArgument { command, .. }
            | CommandError::ThreadOnly { command }
            | CommandError::MissingUser { command }
            | CommandError::MissingDomain { command }
            | CommandError::MissingProfileName { command } => usage(*command),
            CommandError::BadProfile { .. } => format!(
                "Profile names use letters, digits, `_` and `-`; {} lists the ones you may pick. {}",
                code_call(trigger, "profile"),
                usage(CommandKind::Start)
            ),
            CommandError::BadDomain { .. } => usage(CommandKind::Revoke),
            CommandError::BadMode { .. } => usage(CommandKind::Mode),
            CommandError::BadUser { .. } => format!(
                "User names use letters, digits, `.`, `_` and `-`. {}",
                usage(CommandKind::Invite)
            ),
            CommandError::WorktreeNameNeedsEquals { .. } => usage(CommandKind::Start),
            CommandError::MissingIdPrefix { .. } | CommandError::BadIdPrefix { .. } => id_help,
            CommandError::BadOrg { .. } => format!("{ORG_RULES} {repo_form}"),
            CommandError::BadRepo { .. } => format!("{REPO_RULES} {repo_form}"),
            CommandError::BadBranch { .. } => format!("{BRANCH_RULES} {repo_form}"),
            CommandError::BadWorktree { .. } => {
                format!("{WORKTREE_RULES} {}", usage(CommandKind::Start))
            }
            CommandError::RepositoryUrl { .. } | CommandError::NoDefaultOrg { .. } => repo_form,
            CommandError::BadDefaultOrg { .. } => format!(
                "Write the full `org/repo` for now, and ask an administrator to fix \
                 `SM_DEFAULT_ORG`. {ORG_RULES}"
            ),
        };
        format!("**Error:** {self}\n\n{help}")
    }
}

// ---------------------------------------------------------------------------
// Safe rendering of untrusted text
// ---------------------------------------------------------------------------

/// `true` for characters that must not appear raw in a chat message: control
/// characters, whitespace other than a plain space, and invisible formatting
/// characters ([`crate::text::is_invisible`]: bidi overrides, zero-width
/// characters, ...).
fn needs_escape(ch: char) -> bool {
    ch.is_control() || (ch.is_whitespace() && ch != ' ') || crate::text::is_invisible(ch)
}

/// Appends `ch`, escaped if needed so that the result contains no control
/// characters, invisible characters or backticks.
fn push_escaped(out: &mut String, ch: char) {
    match ch {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\0' => out.push_str("\\0"),
        '`' => out.push_str("\\u{60}"),
        c if needs_escape(c) => out.extend(c.escape_unicode()),
        c => out.push(c),
    }
}

/// Number of characters `ch` takes once escaped.
fn escaped_len(ch: char) -> usize {
    let mut buf = String::new();
    push_escaped(&mut buf, ch);
    buf.chars().count()
}

/// Escapes `value` and truncates the result to at most `max` characters
/// (`max` >= 1), ending with `…` when something was cut. Cuts only between
/// whole escaped characters.
fn escape_truncated(value: &str, max: usize) -> String {
    let fits = value
        .chars()
        .try_fold(0usize, |used, ch| {
            let used = used + escaped_len(ch);
            (used <= max).then_some(used)
        })
        .is_some();
    let budget = if fits { max } else { max.saturating_sub(1) };
    let mut out = String::new();
    let mut used = 0;
    let mut buf = String::new();
    for ch in value.chars() {
        buf.clear();
        push_escaped(&mut buf, ch);
        let len = buf.chars().count();
        if used + len > budget {
            break;
        }
        out.push_str(&buf);
        used += len;
    }
    if !fits {
        out.push('…');
    }
    out
}

/// A user-supplied value as a Markdown code span that is safe to post.
fn quote(value: &str) -> String {
    if value.is_empty() {
        return "`\"\"`".to_owned();
    }
    code(&escape_truncated(value, MAX_QUOTED_CHARS))
}

/// Wraps already escaped text (no backticks) in a code span.
fn code(escaped: &str) -> String {
    format!("`{escaped}`")
}

/// The trigger, trimmed and escaped for use inside a code span.
fn trigger_text(trigger: &str) -> String {
    escape_truncated(trigger.trim(), MAX_QUOTED_CHARS)
}

/// A code span showing `trigger rest` (just `rest` if the trigger is empty).
fn code_call(trigger: &str, rest: &str) -> String {
    let trigger = trigger_text(trigger);
    if trigger.is_empty() {
        code(rest)
    } else {
        code(&format!("{trigger} {rest}"))
    }
}

/// Names a character for an error message without posting it raw.
fn describe_char(ch: char) -> String {
    match ch {
        ' ' => "a space".to_owned(),
        '\n' | '\r' => "a line break".to_owned(),
        '\t' => "a tab".to_owned(),
        '`' => "a backtick".to_owned(),
        c if c.is_ascii_graphic() => format!("`{c}`"),
        c if c.is_control() => format!("the control character U+{:04X}", u32::from(c)),
        c if !c.is_ascii() && !needs_escape(c) => {
            format!("the non-ASCII character `{c}` (U+{:04X})", u32::from(c))
        }
        c => format!("the character U+{:04X}", u32::from(c)),
    }
}

#[cfg(test)]
mod tests {
    //! The table mechanics, with a test-only table of commands the grammar
    //! will need next (`invite @user`, `revoke <domain>`, `interrupt` alias
    //! `escape`, `mode <…>`, `status [all]`, `--profile=name`). Their kinds
    //! and errors are stand-ins: real entries bring their own variants.

    use super::*;

    /// Stand-in for an invalid value's error.
    fn bad(value: &str) -> CommandError {
        CommandError::UnknownCommand {
            word: value.to_owned(),
        }
    }

    /// Stores `text` as the matching word of `words` (ASCII case-insensitive).
    fn one_of(words: &[&str], text: &str, values: &mut Values) -> Result<(), CommandError> {
        let word = words
            .iter()
            .find(|word| word.eq_ignore_ascii_case(text))
            .ok_or_else(|| bad(text))?;
        values.words.push((*word).to_owned());
        Ok(())
    }

    const fn arg(value: ValueKind, presence: Presence) -> ArgSpec {
        ArgSpec {
            value,
            presence,
            missing: |command| CommandError::MissingRepository { command },
            surplus: ArgSpec::UNEXPECTED,
        }
    }

    const MENTION: ValueKind = ValueKind {
        placeholder: "@user",
        noun: "user",
        parse: |text, _, values| {
            let name = text
                .strip_prefix('@')
                .filter(|name| !name.is_empty())
                .filter(|name| {
                    name.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                })
                .ok_or_else(|| bad(text))?;
            values.words.push(name.to_owned());
            Ok(())
        },
    };

    const DOMAIN: ValueKind = ValueKind {
        placeholder: "<domain>",
        noun: "domain",
        parse: |text, _, values| {
            let domain = crate::firewall::domain::parse_domain(text).map_err(|_| bad(text))?;
            values.words.push(domain.into_string());
            Ok(())
        },
    };

    const MODE: ValueKind = ValueKind {
        placeholder: "<plan|default|acceptEdits>",
        noun: "mode",
        parse: |text, _, values| one_of(&["plan", "default", "acceptEdits"], text, values),
    };

    const ALL: ValueKind = ValueKind {
        placeholder: "all",
        noun: "`all`",
        parse: |text, _, values| one_of(&["all"], text, values),
    };

    const PROFILE: OptionSpec = OptionSpec {
        flag: "--profile",
        value: ValueKind {
            placeholder: "name",
            noun: "profile",
            parse: |text, _, values| {
                values.words.push(format!("profile={text}"));
                Ok(())
            },
        },
        bare: Bare::Error(|command| CommandError::UnknownFlag {
            flag: "--profile".to_owned(),
            command,
        }),
    };

    static FUTURE: [CommandSpec; 6] = [
        CommandSpec {
            kind: CommandKind::Compact,
            word: "invite",
            scope: Scope::ThreadOnly,
            args: &[arg(MENTION, Presence::Required)],
            summary: "let a user drive this session",
            ..CommandSpec::DEFAULT
        },
        CommandSpec {
            kind: CommandKind::Stop,
            word: "revoke",
            args: &[arg(DOMAIN, Presence::Required)],
            summary: "take back network access to a domain",
            ..CommandSpec::DEFAULT
        },
        CommandSpec {
            kind: CommandKind::Restart,
            word: "interrupt",
            aliases: &["escape"],
            scope: Scope::ThreadOnly,
            summary: "interrupt the agent",
            ..CommandSpec::DEFAULT
        },
        CommandSpec {
            kind: CommandKind::Clear,
            word: "mode",
            scope: Scope::ThreadOnly,
            args: &[arg(MODE, Presence::Required)],
            summary: "switch the permission mode",
            ..CommandSpec::DEFAULT
        },
        CommandSpec {
            kind: CommandKind::Status,
            word: "status",
            args: &[arg(ALL, Presence::Optional)],
            summary: "list the sessions",
            ..CommandSpec::DEFAULT
        },
        CommandSpec {
            kind: CommandKind::Start,
            word: "start",
            args: &[REPO_ARG],
            options: &[WORKTREE, PROFILE],
            summary: "start a session",
            ..CommandSpec::DEFAULT
        },
    ];

    /// Reads `text` against [`FUTURE`]: the command word and the values.
    fn future(text: &str, in_session_thread: bool) -> Result<(&'static str, Values), CommandError> {
        let ctx = ParseContext {
            trigger: "@claude",
            default_org: Some("acme"),
            in_session_thread,
        };
        match read(&FUTURE, text, &ctx) {
            Some(Ok(Request::Command(spec, values))) => Ok((spec.word, *values)),
            Some(Err(error)) => Err(error),
            Some(Ok(Request::BareTrigger)) | None => panic!("{text:?} is not a command"),
        }
    }

    /// The command word and the test values of a well-formed `text`.
    fn words(text: &str, in_session_thread: bool) -> (&'static str, Vec<String>) {
        match future(text, in_session_thread) {
            Ok((word, values)) => (word, values.words),
            Err(error) => panic!("{text:?}: {error:?}"),
        }
    }

    fn error(text: &str, in_session_thread: bool) -> CommandError {
        match future(text, in_session_thread) {
            Ok((word, values)) => panic!("{text:?} gave {word} {values:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn mention_argument_in_a_thread_only_command() {
        assert_eq!(
            words("!invite @alice", true),
            ("invite", vec!["alice".to_owned()])
        );
        assert_eq!(
            error("@claude invite @alice", false),
            CommandError::ThreadOnly {
                command: CommandKind::Compact
            }
        );
        assert_eq!(
            error("!invite", true),
            CommandError::MissingRepository {
                command: CommandKind::Compact
            }
        );
        assert_eq!(error("!invite bob", true), bad("bob"));
        assert_eq!(
            error("!invite @a @b", true),
            CommandError::UnexpectedArgument {
                command: CommandKind::Compact,
                arg: "@b".to_owned()
            }
        );
    }

    #[test]
    fn domain_argument() {
        assert_eq!(
            words("@claude revoke PyPI.org", false),
            ("revoke", vec!["pypi.org".to_owned()])
        );
        assert_eq!(error("@claude revoke 127.0.0.1", false), bad("127.0.0.1"));
    }

    #[test]
    fn alias_and_word_list() {
        assert_eq!(words("!ESCAPE", true), ("interrupt", vec![]));
        assert_eq!(words("@claude: escape", true), ("interrupt", vec![]));
        assert_eq!(words("!mode PLAN", true), ("mode", vec!["plan".to_owned()]));
        assert_eq!(error("!mode fast", true), bad("fast"));
    }

    #[test]
    fn optional_positional() {
        assert_eq!(words("@claude status", false), ("status", vec![]));
        assert_eq!(
            words("!status all", true),
            ("status", vec!["all".to_owned()])
        );
        assert_eq!(error("@claude status some", false), bad("some"));
        assert_eq!(
            error("@claude status all x", false),
            CommandError::UnexpectedArgument {
                command: CommandKind::Status,
                arg: "x".to_owned()
            }
        );
    }

    #[test]
    fn option_with_a_required_value() {
        let (word, values) = match future("@claude start api \u{2014}PROFILE=dev --worktree", false)
        {
            Ok(read) => read,
            Err(error) => panic!("{error:?}"),
        };
        assert_eq!(word, "start");
        assert_eq!(values.words, vec!["profile=dev".to_owned()]);
        assert_eq!(
            values.repo.map(|repo| repo.to_string()),
            Some("acme/api".to_owned())
        );
        assert_eq!(values.worktree, Some(WorktreeChoice::Auto));
        assert_eq!(
            error("@claude start api --profile", false),
            CommandError::UnknownFlag {
                flag: "--profile".to_owned(),
                command: CommandKind::Start
            }
        );
        assert_eq!(
            error("@claude start --profile=a api --profile=b", false),
            CommandError::DuplicateFlag {
                flag: "--profile",
                command: CommandKind::Start
            }
        );
        assert_eq!(
            error("@claude revoke x.org --profile=a", false),
            CommandError::FlagNotAllowed {
                flag: "--profile",
                command: CommandKind::Stop
            }
        );
    }

    #[test]
    fn texts_of_the_future_table() {
        let top = render_help(&FUTURE, "@claude", false);
        for line in [
            "- `@claude revoke <domain>` — take back network access to a domain\n",
            "- `@claude status [all]` — list the sessions\n",
            "- `@claude start org/repo[@branch] [--worktree[=name]] [--profile=name]` — start a session\n",
            "\nIn a session's thread you can also use `invite`, `interrupt` and `mode`, \
             and the short `!` forms (e.g. `!status`).\n",
        ] {
            assert!(top.contains(line), "{line:?} not in {top}");
        }
        assert!(!top.contains("invite @user"), "{top}");
        let thread = render_help(&FUTURE, "@claude", true);
        for line in [
            "- `!invite @user` or `@claude invite @user` — let a user drive this session\n",
            "- `!interrupt` or `@claude interrupt` — interrupt the agent (also `escape`)\n",
            "- `!mode <plan|default|acceptEdits>` or `@claude mode <plan|default|acceptEdits>`",
        ] {
            assert!(thread.contains(line), "{line:?} not in {thread}");
        }
        assert_eq!(
            FUTURE[0].usage("@claude"),
            "`!invite @user` or `@claude invite @user`, in a session's thread"
        );
    }

    /// Rules every command table must follow.
    fn check_table(specs: &[CommandSpec]) {
        let mut words = Vec::new();
        for spec in specs {
            for word in std::iter::once(&spec.word).chain(spec.aliases) {
                assert!(
                    !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase()),
                    "{word:?}"
                );
                assert!(!words.contains(word), "{word:?} is used twice");
                words.push(*word);
            }
            assert!(!spec.summary.is_empty(), "{}", spec.word);
            for in_thread in [false, true] {
                let required: Vec<bool> = spec
                    .args
                    .iter()
                    .map(|a| a.presence.required(in_thread))
                    .collect();
                assert!(
                    required.windows(2).all(|w| w[0] || !w[1]),
                    "{}: required after optional",
                    spec.word
                );
            }
            let mut flags = Vec::new();
            for option in spec.options {
                let name = option.flag.strip_prefix("--").unwrap_or_default();
                assert!(!name.is_empty() && !name.contains('='), "{}", option.flag);
                assert!(!flags.contains(&name), "{} twice", option.flag);
                flags.push(name);
            }
            for placeholder in spec.args.iter().map(|a| a.value.placeholder) {
                assert!(!placeholder.contains('`'), "{placeholder}");
            }
        }
    }

    #[test]
    fn tables_are_well_formed() {
        check_table(&SPECS);
        check_table(&FUTURE);
    }

    #[test]
    fn all_follows_the_table() {
        for (kind, spec) in CommandKind::ALL.into_iter().zip(&SPECS) {
            assert_eq!(kind, spec.kind);
            assert_eq!(kind.spec().word, spec.word);
            assert_eq!(CommandKind::from_word(spec.word), Some(kind));
        }
    }
}
