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
    // Every SM_ name the README mentions is a real setting (or the test suite's own).
    let known: Vec<String> = session_manager::config::setting_docs()
        .into_iter()
        .map(|d| d.env)
        .collect();
    for word in readme.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("SM_") && word.len() > 3 && word != "SM_TEST_DATABASE_URL" {
            assert!(
                known.iter().any(|k| k == word),
                "README mentions unknown variable {word}"
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
