//! Documentation and repository rules that must not drift.

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn readme_configuration_reference_matches_help() {
    let readme = read("README.md");
    let start = "<!-- config-reference:start -->\n";
    let end = "<!-- config-reference:end -->";
    let from = readme.find(start).expect("start marker") + start.len();
    let to = readme.find(end).expect("end marker");
    let expected = session_manager::config::markdown_reference();
    assert_eq!(
        &readme[from..to],
        expected,
        "README.md's configuration reference is stale: regenerate it with `cargo run -q -- config --markdown`"
    );
}

/// Variables the documents may name that are not settings of the bot: the test suite's and
/// the scripts' own.
const NOT_SETTINGS: [&str; 5] = [
    "SM_TEST_DATABASE_URL",
    "SM_TEST_DRY_RUN",
    "SM_TEST_PRETEND_MISSING",
    "SM_TESTBED_DIR",
    "SM_DEPLOY_TOOLS_DIR",
];

#[test]
fn the_documents_name_only_real_settings() {
    let known: Vec<String> = session_manager::config::setting_docs()
        .into_iter()
        .map(|d| d.env)
        .collect();
    for doc in [
        "README.md",
        "docs/operations.md",
        "docs/architecture.md",
        "deploy/k8s/README.md",
        ".env.example",
    ] {
        let text = read(doc);
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("SM_") && word.len() > 3 && !NOT_SETTINGS.contains(&word) {
                assert!(
                    known.iter().any(|k| k == word),
                    "{doc} mentions {word}, which is not a setting"
                );
            }
        }
    }
}

#[test]
fn the_readme_and_the_runbook_list_every_endpoint() {
    let readme = read("README.md");
    let runbook = read("docs/operations.md");
    for (method, path) in session_manager::http::ENDPOINTS {
        assert!(
            readme.contains(&format!("| `{method} {path}`")),
            "README.md's HTTP endpoints table lacks {method} {path}"
        );
        assert!(
            runbook.contains(&format!("`{path}")) || runbook.contains(&format!("`{method} {path}")),
            "docs/operations.md never mentions {path}"
        );
    }
    // And lists no other.
    let table = &readme[readme.find("### HTTP endpoints").expect("section")..];
    let table = &table[..table.find("\n\n").unwrap_or(table.len())];
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        assert!(
            session_manager::http::ENDPOINTS
                .iter()
                .any(|(method, path)| row.starts_with(&format!("| `{method} {path}`"))),
            "README.md lists an endpoint the bot does not serve: {row}"
        );
    }
}

/// `NAME=value` of a shell assignment at the start of a line in a script.
fn script_value(script: &str, name: &str) -> String {
    read(script)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{script} sets no {name}"))
        .trim()
        .to_owned()
}

#[test]
fn the_documents_pin_the_versions_the_testbed_runs() {
    let claude = script_value("scripts/testbed", "CLAUDE_VERSION");
    let devcontainer = script_value("scripts/testbed", "DEVCONTAINER_VERSION");
    let runbook = read("docs/operations.md");
    assert!(
        runbook.contains(&format!("@anthropic-ai/claude-code@{claude}")),
        "docs/operations.md should install Claude Code {claude}"
    );
    assert!(
        runbook.contains(&format!("@devcontainers/cli@{devcontainer}")),
        "docs/operations.md should install the devcontainer CLI {devcontainer}"
    );
    assert!(
        !runbook.contains("@<version>"),
        "a version placeholder is left"
    );
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("Claude Code CLI {claude}"))
            && readme.contains(&format!("devcontainer CLI {devcontainer}")),
        "README.md's list of what the tests install names other versions"
    );
}

#[test]
fn no_markdown_table_is_split_by_a_blank_line() {
    for doc in [
        "README.md",
        "docs/operations.md",
        "docs/architecture.md",
        "deploy/k8s/README.md",
        "devcontainer/README.md",
    ] {
        let text = read(doc);
        let lines: Vec<&str> = text.lines().collect();
        for i in 2..lines.len() {
            let row = |l: &str| l.trim_start().starts_with('|');
            let header_next = lines.get(i + 1).is_some_and(|l| {
                l.trim_start().starts_with("|--") || l.trim_start().starts_with("| --")
            });
            assert!(
                !(row(lines[i])
                    && lines[i - 1].trim().is_empty()
                    && row(lines[i - 2])
                    && !header_next),
                "{doc}:{}: a blank line splits a table (the rows after it render as text)",
                i + 1
            );
        }
    }
}

#[test]
fn the_two_commands_are_documented_and_ci_runs_the_test_command() {
    let readme = read("README.md");
    assert!(readme.contains("cargo run --release -- serve"));
    assert!(readme.contains("\nscripts/test\n"));
    let ci = read(".ci/run");
    let commands: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('#') && !l.starts_with("set ") && !l.starts_with("cd ")
        })
        .collect();
    assert_eq!(
        commands,
        vec!["exec scripts/test"],
        ".ci/run must call scripts/test and nothing else"
    );
}

/// Tables a migration rebuilds (`DROP TABLE t;` where `t_new` is renamed to `t`).
fn rebuilt_tables(code: &str) -> Vec<String> {
    code.split("DROP TABLE ")
        .skip(1)
        .filter_map(|rest| rest.split(';').next())
        .map(|name| name.trim().to_owned())
        .filter(|name| code.contains(&format!("ALTER TABLE {name}_NEW RENAME TO {name};")))
        .collect()
}

#[test]
fn migrations_are_never_destructive_and_exist_for_both_backends() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut names = Vec::new();
    for backend in ["postgres", "sqlite"] {
        let mut files: Vec<String> = std::fs::read_dir(root.join(backend))
            .expect("migration folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert!(!files.is_empty());
        for file in &files {
            let sql = std::fs::read_to_string(root.join(backend).join(file)).expect("read");
            let code: String = sql
                .lines()
                .map(|l| l.split("--").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
                .to_uppercase();
            // SQLite cannot change a CHECK constraint: the one non-destructive way is to
            // rebuild the table, copying every row. Allowed only in exactly that form.
            let mut code = code;
            for rebuilt in rebuilt_tables(&code) {
                for (what, needed) in [
                    ("copies every row", format!("INSERT INTO {rebuilt}_NEW")),
                    ("reads the old table", format!("FROM {rebuilt};")),
                    (
                        "renames the copy",
                        format!("ALTER TABLE {rebuilt}_NEW RENAME TO {rebuilt};"),
                    ),
                ] {
                    assert!(
                        code.contains(&needed),
                        "{backend}/{file} drops {rebuilt} but never {what} ({needed})"
                    );
                }
                code = code.replace(&format!("DROP TABLE {rebuilt};"), "").replace(
                    &format!("ALTER TABLE {rebuilt}_NEW RENAME TO {rebuilt};"),
                    "",
                );
            }
            // Dropping a CHECK constraint to widen it loses no data.
            let code = code.replace("DROP CONSTRAINT APPROVAL_STATE_CHECK", "");
            for forbidden in ["DROP ", "TRUNCATE", "DELETE ", "RENAME "] {
                assert!(
                    !code.contains(forbidden),
                    "{backend}/{file} contains {forbidden:?}"
                );
            }
        }
        names.push(files);
    }
    assert_eq!(
        names[0], names[1],
        "each migration exists for both backends"
    );
}

#[test]
fn the_layout_is_complete() {
    for entry in [
        "Cargo.toml",
        "src/lib.rs",
        "sql",
        "deploy/k8s",
        "devcontainer",
        "tests",
        "README.md",
        "scripts/test",
        "scripts/bench",
        "docs/benchmarks.md",
        ".ci/run",
    ] {
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(entry).exists(),
            "{entry} missing"
        );
    }
    assert!(
        read("src/lib.rs").starts_with("//! # session-manager"),
        "lib.rs opens with the layout doc"
    );
}

#[test]
fn the_runbook_lists_every_metric() {
    let runbook = read("docs/operations.md");
    for name in session_manager::telemetry::ALL_METRICS {
        assert!(
            runbook.contains(&format!("| `{name}` |")),
            "docs/operations.md does not describe {name}"
        );
    }
}

#[test]
fn the_devcontainer_template_is_what_the_bot_generates() {
    // JSONC: drop whole-line comments (the template has no trailing ones).
    let text: String = read("devcontainer/devcontainer.json")
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let template: serde_json::Value =
        serde_json::from_str(&text).expect("the template is JSON once comments are gone");
    let ctx = session_manager::runtime::vetting::VetContext {
        network: "isolated".into(),
        session_dir: "/session-dir".into(),
        neutral_home: "/neutral".into(),
        path: "/usr/bin:/bin".into(),
    };
    let generated = session_manager::runtime::vetting::fallback_config("claude-code:latest", &ctx);
    assert_eq!(
        template, generated,
        "devcontainer/devcontainer.json and fallback_config() differ"
    );
}

/// The uncommented `NAME=value` lines of `.env.example` (quotes removed as dotenvy does).
fn env_example() -> Vec<(String, String)> {
    read(".env.example")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l
                .split_once('=')
                .unwrap_or_else(|| panic!(".env.example: not NAME=value: {l}"));
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            (name.trim().to_owned(), value.to_owned())
        })
        .collect()
}

/// The problems of a configuration made of `pairs` (variable, value) alone: the process's own
/// environment is not read.
fn problems_of(pairs: &[(String, String)]) -> Vec<session_manager::config::ConfigProblem> {
    let docs = session_manager::config::setting_docs();
    let mut argv = vec!["session-manager".to_owned(), "serve".to_owned()];
    for (name, value) in pairs {
        let doc = docs
            .iter()
            .find(|d| &d.env == name)
            .unwrap_or_else(|| panic!("{name} is not a setting"));
        argv.push(format!("--{}={value}", doc.flag));
    }
    let matches = session_manager::config::Cli::raw_command()
        .mut_args(|arg| arg.env(None))
        .try_get_matches_from(argv)
        .expect("clap accepts any text");
    match session_manager::config::Settings::from_matches(&matches) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0,
    }
}

#[test]
fn env_example_lists_every_required_setting_with_a_placeholder_that_is_refused() {
    let docs = session_manager::config::setting_docs();
    let example = env_example();
    // Every line is a setting of `--help` (and so of the README's table), once; the commented
    // examples too.
    let mentioned: Vec<String> = read(".env.example")
        .lines()
        .map(|l| l.trim_start_matches(['#', ' ']))
        .filter_map(|l| l.split_once('=').map(|(name, _)| name.to_owned()))
        .filter(|name| name.starts_with("SM_"))
        .collect();
    for name in &mentioned {
        assert!(
            docs.iter().any(|d| &d.env == name),
            ".env.example names {name}, which is not a setting"
        );
    }
    for (name, _) in &example {
        assert_eq!(
            example.iter().filter(|(n, _)| n == name).count(),
            1,
            "{name} is set twice in .env.example"
        );
    }
    // The required settings of a chat deployment (the example's): what a configuration that
    // names only its Mattermost server is refused for. (With no chat platform at all, the
    // web console is the chat surface and fewer settings are needed: see the README.)
    let chat = [(
        "SM_MATTERMOST_URL".to_owned(),
        "https://chat.example.com".to_owned(),
    )];
    let required: Vec<&'static str> = problems_of(&chat).iter().map(|p| p.var).collect();
    for var in [
        "SM_MATTERMOST_TOKEN",
        "SM_VM_HOST",
        "SM_VM_KNOWN_HOSTS",
        "SM_VM_SSH_KEY_PATH",
        "SM_CALLBACK_SECRET",
    ] {
        assert!(
            required.contains(&var),
            "{var} should be required: {required:?}"
        );
    }
    for var in &required {
        assert!(
            example.iter().any(|(name, _)| name == var),
            ".env.example lacks the required {var}"
        );
        let help = &docs.iter().find(|d| d.env == *var).expect("doc").help;
        assert!(
            help.to_lowercase().contains("required"),
            "--help (and the README) should say {var} is required: {help}"
        );
    }
    // As it is, every required setting is refused, each for its placeholder.
    let problems = problems_of(&example);
    for var in &required {
        let problem = problems
            .iter()
            .find(|p| p.var == *var)
            .unwrap_or_else(|| panic!("{var}'s placeholder passes validation: {problems:?}"));
        assert!(
            problem.message.contains("placeholder"),
            "{var} is refused for its placeholder: {problem}"
        );
    }
    // With the placeholders replaced, nothing else is wrong.
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("id_ed25519");
    std::fs::write(
        &key,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .expect("key");
    let filled: Vec<(String, String)> = example
        .iter()
        .map(|(name, value)| {
            let is_placeholder = session_manager::config::PLACEHOLDERS
                .iter()
                .any(|m| value.contains(m));
            if !is_placeholder {
                return (name.clone(), value.clone());
            }
            let real = match name.as_str() {
                "SM_MATTERMOST_URL" => "https://chat.example.com".to_owned(),
                "SM_MATTERMOST_TEAM_ID" => "abcdefghijklmnopqrstuvwxyz".to_owned(),
                "SM_VM_HOST" => "vm.example.internal".to_owned(),
                "SM_VM_SSH_KEY_PATH" => key.display().to_string(),
                "SM_VM_KNOWN_HOSTS" => {
                    "vm.example.internal ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPrDGLMQkvA".to_owned()
                }
                "SM_OPNSENSE_URL" => "https://fw.example.internal".to_owned(),
                "SM_CALLBACK_SECRET" => "0123456789abcdef0123456789abcdef".to_owned(),
                "SM_MATTERMOST_TOKEN" | "SM_OPNSENSE_KEY" | "SM_OPNSENSE_SECRET" => {
                    "a-real-looking-token".to_owned()
                }
                other => panic!("add a real value for {other} to this test"),
            };
            (name.clone(), real)
        })
        .collect();
    let problems = problems_of(&filled);
    assert!(
        problems.is_empty(),
        "with real values .env.example is a valid configuration: {problems:?}"
    );
}
