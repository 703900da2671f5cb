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
//! | `start org/repo[@branch] [--worktree[=name]]` | [`Command::Start`] |
//! | `orchestrate org/repo[@branch]` | [`Command::Orchestrate`] |
//! | `stop <id-prefix>` (bare `stop` in a session thread) | [`Command::Stop`] |
//! | `status`, `help` | [`Command::Status`], [`Command::Help`] |
//! | `compact`, `clear`, `restart`, `context` (session thread only) | unit variants |
//!
//! `org/` may be left out when a default organisation is configured.
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
    let text = text.trim();

    if let Some(rest) = strip_trigger(text, ctx.trigger) {
        let mut tokens = rest.split_whitespace();
        let Some(word) = tokens.next() else {
            return Some(Ok(Command::Help));
        };
        return Some(match CommandKind::from_word(word) {
            Some(kind) => parse_arguments(kind, tokens, ctx),
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
            let kind = CommandKind::from_word(tokens.next()?)?;
            return Some(parse_arguments(kind, tokens, ctx));
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

/// Parses the arguments that follow a known command word.
fn parse_arguments<'t>(
    kind: CommandKind,
    tokens: impl Iterator<Item = &'t str>,
    ctx: &ParseContext<'_>,
) -> Result<Command, CommandError> {
    match kind {
        CommandKind::Start | CommandKind::Orchestrate => parse_repo_command(kind, tokens, ctx),
        CommandKind::Stop => parse_stop(tokens, ctx),
        CommandKind::Status => no_arguments(kind, tokens).map(|()| Command::Status),
        CommandKind::Help => no_arguments(kind, tokens).map(|()| Command::Help),
        CommandKind::Compact | CommandKind::Clear | CommandKind::Restart | CommandKind::Context => {
            if !ctx.in_session_thread {
                return Err(CommandError::ThreadOnly { command: kind });
            }
            no_arguments(kind, tokens)?;
            Ok(match kind {
                CommandKind::Compact => Command::Compact,
                CommandKind::Clear => Command::Clear,
                CommandKind::Restart => Command::Restart,
                _ => Command::Context,
            })
        }
    }
}

/// The `--worktree` option as written in usage texts and errors.
const WORKTREE_FLAG: &str = "--worktree";

/// An argument that looks like an option.
enum Flag<'t> {
    /// `--worktree` (value `None`) or `--worktree=value`.
    Worktree(Option<&'t str>),
    /// Any other option-like argument; holds the part before any `=`.
    Unknown(&'t str),
}

impl<'t> Flag<'t> {
    /// Classifies `token`; `None` when it does not start with `--`, `—` or
    /// `–`.
    fn classify(token: &'t str) -> Option<Self> {
        let body = token
            .strip_prefix("--")
            .or_else(|| token.strip_prefix('\u{2014}'))
            .or_else(|| token.strip_prefix('\u{2013}'))?;
        let (name, value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (body, None),
        };
        if name.eq_ignore_ascii_case("worktree") {
            Some(Flag::Worktree(value))
        } else {
            Some(Flag::Unknown(
                token.split_once('=').map_or(token, |(name, _)| name),
            ))
        }
    }
}

/// `start` and `orchestrate`: exactly one repository plus options.
fn parse_repo_command<'t>(
    kind: CommandKind,
    tokens: impl Iterator<Item = &'t str>,
    ctx: &ParseContext<'_>,
) -> Result<Command, CommandError> {
    // (argument, directly preceded by a bare `--worktree`)
    let mut positionals: Vec<(&str, bool)> = Vec::new();
    let mut worktree: Option<WorktreeChoice> = None;
    let mut after_bare_worktree = false;

    for token in tokens {
        match Flag::classify(token) {
            Some(Flag::Worktree(value)) => {
                if kind != CommandKind::Start {
                    return Err(CommandError::FlagNotAllowed {
                        flag: WORKTREE_FLAG,
                        command: kind,
                    });
                }
                if worktree.is_some() {
                    return Err(CommandError::DuplicateFlag {
                        flag: WORKTREE_FLAG,
                        command: kind,
                    });
                }
                worktree = Some(match value {
                    None => WorktreeChoice::Auto,
                    Some(name) => WorktreeChoice::Named(WorktreeName::parse(name)?),
                });
                after_bare_worktree = value.is_none();
            }
            Some(Flag::Unknown(flag)) => {
                return Err(CommandError::UnknownFlag {
                    flag: flag.to_owned(),
                    command: kind,
                });
            }
            None => {
                positionals.push((token, after_bare_worktree));
                after_bare_worktree = false;
            }
        }
    }

    let mut iter = positionals.iter();
    let Some(&(repo_text, _)) = iter.next() else {
        return Err(CommandError::MissingRepository { command: kind });
    };
    if let Some(&(extra, _)) = iter.next() {
        if let Some(&(value, _)) = positionals.iter().find(|(_, after)| *after) {
            return Err(CommandError::WorktreeNameNeedsEquals {
                value: value.to_owned(),
            });
        }
        return Err(CommandError::TooManyRepositories {
            command: kind,
            extra: extra.to_owned(),
        });
    }

    let repo = RepoRef::parse_with_default_org(repo_text, ctx.default_org)?;
    Ok(match kind {
        CommandKind::Start => Command::Start { repo, worktree },
        _ => Command::Orchestrate { repo },
    })
}

/// `stop [id-prefix]`.
fn parse_stop<'t>(
    tokens: impl Iterator<Item = &'t str>,
    ctx: &ParseContext<'_>,
) -> Result<Command, CommandError> {
    let args = reject_flags(CommandKind::Stop, tokens)?;
    let mut iter = args.into_iter();
    let Some(first) = iter.next() else {
        return if ctx.in_session_thread {
            Ok(Command::Stop { target: None })
        } else {
            Err(CommandError::MissingIdPrefix)
        };
    };
    if let Some(extra) = iter.next() {
        return Err(CommandError::UnexpectedArgument {
            command: CommandKind::Stop,
            arg: extra.to_owned(),
        });
    }
    Ok(Command::Stop {
        target: Some(IdPrefix::parse(first)?),
    })
}

/// Commands without arguments.
fn no_arguments<'t>(
    kind: CommandKind,
    tokens: impl Iterator<Item = &'t str>,
) -> Result<(), CommandError> {
    match reject_flags(kind, tokens)?.first() {
        Some(arg) => Err(CommandError::UnexpectedArgument {
            command: kind,
            arg: (*arg).to_owned(),
        }),
        None => Ok(()),
    }
}

/// Collects the arguments of a command that has no options, failing on the
/// first option-like one.
fn reject_flags<'t>(
    kind: CommandKind,
    tokens: impl Iterator<Item = &'t str>,
) -> Result<Vec<&'t str>, CommandError> {
    let mut args = Vec::new();
    for token in tokens {
        match Flag::classify(token) {
            Some(Flag::Worktree(_)) => {
                return Err(CommandError::FlagNotAllowed {
                    flag: WORKTREE_FLAG,
                    command: kind,
                })
            }
            Some(Flag::Unknown(flag)) => {
                return Err(CommandError::UnknownFlag {
                    flag: flag.to_owned(),
                    command: kind,
                })
            }
            None => args.push(token),
        }
    }
    Ok(args)
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
    /// `start org/repo[@branch] [--worktree[=name]]`: start a Claude Code
    /// session on a repository.
    Start {
        /// The repository (organisation filled in from the default if omitted).
        repo: RepoRef,
        /// `None`: work in the main checkout; otherwise use a git worktree.
        worktree: Option<WorktreeChoice>,
    },
    /// `orchestrate org/repo[@branch]`: start an orchestrator session.
    Orchestrate {
        /// The repository (organisation filled in from the default if omitted).
        repo: RepoRef,
    },
    /// `stop <id-prefix>`, or bare `stop` in a session thread.
    Stop {
        /// `None`: the session that owns the thread the command was written in.
        target: Option<IdPrefix>,
    },
    /// `status`: list sessions.
    Status,
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
}

impl Command {
    /// The kind of this command.
    #[must_use]
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::Start { .. } => CommandKind::Start,
            Command::Orchestrate { .. } => CommandKind::Orchestrate,
            Command::Stop { .. } => CommandKind::Stop,
            Command::Status => CommandKind::Status,
            Command::Help => CommandKind::Help,
            Command::Compact => CommandKind::Compact,
            Command::Clear => CommandKind::Clear,
            Command::Restart => CommandKind::Restart,
            Command::Context => CommandKind::Context,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Start { repo, worktree } => {
                write!(f, "start {repo}")?;
                match worktree {
                    None => Ok(()),
                    Some(WorktreeChoice::Auto) => write!(f, " {WORKTREE_FLAG}"),
                    Some(WorktreeChoice::Named(name)) => write!(f, " {WORKTREE_FLAG}={name}"),
                }
            }
            Command::Orchestrate { repo } => write!(f, "orchestrate {repo}"),
            Command::Stop { target: Some(id) } => write!(f, "stop {id}"),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
}

impl CommandKind {
    /// Every command kind, in the order used by help texts.
    pub const ALL: [CommandKind; 9] = [
        CommandKind::Start,
        CommandKind::Orchestrate,
        CommandKind::Stop,
        CommandKind::Status,
        CommandKind::Help,
        CommandKind::Compact,
        CommandKind::Clear,
        CommandKind::Restart,
        CommandKind::Context,
    ];

    /// The command word in lowercase, e.g. `"start"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Start => "start",
            CommandKind::Orchestrate => "orchestrate",
            CommandKind::Stop => "stop",
            CommandKind::Status => "status",
            CommandKind::Help => "help",
            CommandKind::Compact => "compact",
            CommandKind::Clear => "clear",
            CommandKind::Restart => "restart",
            CommandKind::Context => "context",
        }
    }

    /// Looks up a command word, ASCII case-insensitively. `None` if unknown.
    #[must_use]
    pub fn from_word(word: &str) -> Option<CommandKind> {
        CommandKind::ALL
            .into_iter()
            .find(|kind| kind.as_str().eq_ignore_ascii_case(word))
    }

    /// `true` for commands that only make sense in a session's thread.
    #[must_use]
    pub fn is_thread_only(self) -> bool {
        matches!(
            self,
            CommandKind::Compact | CommandKind::Clear | CommandKind::Restart | CommandKind::Context
        )
    }

    /// Markdown showing the accepted form(s) of the command, e.g.
    /// ``"`@claude start org/repo[@branch] [--worktree[=name]]`"``.
    #[must_use]
    pub fn usage(self, trigger: &str) -> String {
        let call = |rest: &str| code_call(trigger, rest);
        match self {
            CommandKind::Start => call("start org/repo[@branch] [--worktree[=name]]"),
            CommandKind::Orchestrate => call("orchestrate org/repo[@branch]"),
            CommandKind::Stop => format!(
                "{}, or in the session's thread `!stop` / {}",
                call("stop <id-prefix>"),
                call("stop")
            ),
            CommandKind::Status | CommandKind::Help => call(self.as_str()),
            CommandKind::Compact
            | CommandKind::Clear
            | CommandKind::Restart
            | CommandKind::Context => format!(
                "`!{word}` or {}, in a session's thread",
                call(self.as_str()),
                word = self.as_str()
            ),
        }
    }

    /// One-line description used by [`help_text`].
    fn description(self, in_session_thread: bool) -> &'static str {
        match self {
            CommandKind::Start => {
                "start a Claude Code session on a repository; `@branch` picks the branch, \
                 `--worktree` runs it in its own git worktree (`--worktree=name` names it)"
            }
            CommandKind::Orchestrate => "start an orchestrator session on a repository",
            CommandKind::Stop if in_session_thread => {
                "stop this thread's session (add an id prefix to stop another one)"
            }
            CommandKind::Stop => "stop the session whose id starts with the given prefix",
            CommandKind::Status => "list the sessions",
            CommandKind::Help => "show this help",
            CommandKind::Compact => "compact this session's conversation context",
            CommandKind::Clear => "clear this session's conversation",
            CommandKind::Restart => "restart this session",
            CommandKind::Context => "show this session's context usage",
        }
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Markdown help listing the commands available in the given context, using
/// `trigger` in the examples (and the `!` forms inside a session thread).
#[must_use]
pub fn help_text(trigger: &str, in_session_thread: bool) -> String {
    let mut out = String::new();
    if in_session_thread {
        out.push_str(&format!(
            "**Commands in this session thread.** Start a message with {} or `!`, \
             e.g. `!status`. Anything else you write here goes to the session.\n",
            code(&trigger_text(trigger)),
        ));
        for kind in CommandKind::ALL {
            let form = match kind {
                CommandKind::Start => "start org/repo[@branch] [--worktree[=name]]",
                CommandKind::Orchestrate => "orchestrate org/repo[@branch]",
                CommandKind::Stop => "stop [<id-prefix>]",
                other => other.as_str(),
            };
            out.push_str(&format!(
                "- `!{form}` or {} — {}\n",
                code_call(trigger, form),
                kind.description(true)
            ));
        }
    } else {
        out.push_str("**Commands**\n");
        for kind in CommandKind::ALL.into_iter().filter(|k| !k.is_thread_only()) {
            let form = match kind {
                CommandKind::Start => "start org/repo[@branch] [--worktree[=name]]",
                CommandKind::Orchestrate => "orchestrate org/repo[@branch]",
                CommandKind::Stop => "stop <id-prefix>",
                other => other.as_str(),
            };
            out.push_str(&format!(
                "- {} — {}\n",
                code_call(trigger, form),
                kind.description(false)
            ));
        }
        out.push_str(
            "\nIn a session's thread you can also use `compact`, `clear`, `restart` and \
             `context`, bare `stop`, and the short `!` forms (e.g. `!stop`).\n",
        );
    }
    out.push_str(
        "\n`org/` may be left out when a default organisation is configured. \
         Command words are case-insensitive.",
    );
    out
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
    /// Bare `stop` outside a session thread.
    #[error(
        "`stop` needs the id prefix of the session to stop, or write it in the session's thread."
    )]
    MissingIdPrefix,
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

fn unexpected_argument(command: CommandKind, arg: &str) -> String {
    match command {
        CommandKind::Stop => format!(
            "`stop` takes a single id prefix, but {} was given as well.",
            quote(arg)
        ),
        _ => format!("`{command}` takes no arguments, but got {}.", quote(arg)),
    }
}

impl CommandError {
    /// A Markdown reply for the chat: the problem (the [`fmt::Display`] text)
    /// in bold-prefixed form, a blank line, and the correct form(s) of the
    /// command using `trigger`, e.g.
    /// ``"Usage: `@claude start org/repo[@branch] [--worktree[=name]]`"``.
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
            usage(CommandKind::Stop)
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
            | CommandError::ThreadOnly { command } => usage(*command),
            CommandError::WorktreeNameNeedsEquals { .. } => usage(CommandKind::Start),
            CommandError::MissingIdPrefix | CommandError::BadIdPrefix { .. } => id_help,
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
