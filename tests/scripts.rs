//! The scripts a newcomer runs: `scripts/test` installs what a fresh Debian machine lacks (its
//! install paths, shown with a dry run that treats tools as missing, since the machine running
//! the tests has them all), and `scripts/leftovers` finds what a test run left behind.

use std::path::Path;
use std::process::{Command, Output};

fn script(name: &str) -> Command {
    let mut cmd = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name),
    );
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `scripts/test --prepare-only` as a dry run, with `missing` treated as not installed.
fn prepare_dry_run(missing: &str) -> Output {
    script("test")
        .arg("--prepare-only")
        .env("SM_TEST_DRY_RUN", "1")
        .env("SM_TEST_PRETEND_MISSING", missing)
        // scripts/test exports it, and a set URL skips the PostgreSQL checks.
        .env_remove("SM_TEST_DATABASE_URL")
        .output()
        .expect("run scripts/test")
}

#[test]
fn on_a_machine_without_a_c_compiler_python3_venv_or_postgresql_scripts_test_installs_them() {
    let out = prepare_dry_run("cc ensurepip pg_isready pg_ctlcluster");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for line in [
        "would run as root: apt-get update -qq",
        "apt-get install -y -qq gcc libc6-dev",
        "apt-get install -y -qq python3 python3-venv",
        "apt-get install -y -qq postgresql",
        "main\\ start",
        "would run scripts/testbed (as root)",
    ] {
        assert!(all.contains(line), "{line:?} missing from:\n{all}");
    }
    assert_eq!(
        all.matches("apt-get update").count(),
        1,
        "the package lists are fetched once: {all}"
    );
}

#[test]
fn the_c_library_headers_count_as_part_of_the_compiler() {
    let out = prepare_dry_run("libc6-dev");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("apt-get install -y -qq gcc libc6-dev"),
        "{all}"
    );
}

#[test]
fn without_apt_get_scripts_test_says_what_to_install_by_hand() {
    let out = prepare_dry_run("cc apt-get");
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("cannot install gcc libc6-dev here: not a Debian system"),
        "{all}"
    );
}

#[test]
fn a_dry_run_is_only_for_the_preparation() {
    let out = script("test")
        .env("SM_TEST_DRY_RUN", "1")
        .output()
        .expect("run scripts/test");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn leftovers_reports_what_appeared_since_an_earlier_listing() {
    let dir = tempfile::tempdir().expect("dir");
    let run_tmp = dir.path().join("run");
    std::fs::create_dir(&run_tmp).expect("mkdir");
    let before = dir.path().join("before");
    let listing = script("leftovers")
        .args(["--tmp", run_tmp.to_str().expect("utf-8")])
        .output()
        .expect("run scripts/leftovers");
    assert!(listing.status.success(), "{}", text(&listing));
    std::fs::write(&before, &listing.stdout).expect("write");
    let since = |extra: &[&str]| {
        script("leftovers")
            .args(["--tmp", run_tmp.to_str().expect("utf-8")])
            .args(["--since", before.to_str().expect("utf-8")])
            .args(extra)
            .output()
            .expect("run scripts/leftovers")
    };
    // Something a test left in its TMPDIR.
    let forgotten = run_tmp.join(".tmpAbC123");
    std::fs::create_dir(&forgotten).expect("mkdir");
    let out = since(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let expected = format!("tmp {}", forgotten.display());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == expected),
        "{}",
        text(&out)
    );
    std::fs::remove_dir(&forgotten).expect("rmdir");
    let out = since(&[]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&expected),
        "{}",
        text(&out)
    );
}
