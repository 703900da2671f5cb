//! The SSH pool against the testbed's real sshd (127.0.0.1:2222).

mod support;

use std::sync::Arc;
use std::time::Duration;

use session_manager::runtime::shell::Script;
use session_manager::runtime::ssh::{HostKeyPolicy, SshConfig, SshError, SshKey, SshPool};
use support::testbed::Testbed;

fn config(tb: &Testbed) -> SshConfig {
    SshConfig {
        host: tb.get("SM_TEST_VM_HOST"),
        port: tb.port(),
        user: tb.get("SM_TEST_VM_USER"),
        key: SshKey::Path(tb.get("SM_TEST_VM_KEY_PATH").into()),
        host_key: HostKeyPolicy::Pinned(tb.known_hosts()),
        timeout: Duration::from_secs(10),
        max_channels_per_master: 4,
    }
}

fn script(line: &'static str) -> Script {
    let mut s = Script::new();
    s.raw(line);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_in_a_login_shell_with_quoted_values() {
    let tb = Testbed::load();
    let pool = SshPool::new(config(&tb)).expect("pool");
    let out = pool
        .run(&script("printf '%s\\n' \"$PATH\"; id -un"))
        .await
        .expect("run");
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains(".local/bin"),
        "the login PATH applies: {}",
        out.stdout
    );
    assert!(out.stdout.trim_end().ends_with(&tb.get("SM_TEST_VM_USER")));

    let canary = format!("/tmp/sm-canary-{}", uuid::Uuid::new_v4().simple());
    for hostile in [
        format!("x; touch {canary}"),
        format!("$(touch {canary})"),
        format!("`touch {canary}`"),
        format!("'; touch {canary}; '"),
        format!("a\ntouch {canary}"),
    ] {
        let mut s = Script::new();
        s.command("printf", &["%s", hostile.as_str()])
            .expect("quotable");
        let out = pool.run(&s).await.expect("run");
        assert_eq!(out.stdout, hostile, "arrives as one literal word");
    }
    let check = pool
        .run(
            &Script::new()
                .command("test", &["-e", canary.as_str()])
                .expect("q")
                .clone(),
        )
        .await
        .expect("run");
    assert_eq!(check.status, Some(1), "nothing ran on the VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_command_is_killed_on_the_vm_too() {
    let tb = Testbed::load();
    let mut cfg = config(&tb);
    cfg.timeout = Duration::from_secs(2);
    let pool = SshPool::new(cfg).expect("pool");
    let marker = format!("sm-sleep-{}", uuid::Uuid::new_v4().simple());
    let mut s = Script::new();
    s.raw_then("exec -a", &[marker.as_str(), "sleep", "60"])
        .expect("q");
    let started = std::time::Instant::now();
    let err = pool.run(&s).await.expect_err("must time out");
    assert!(matches!(err, SshError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let mut probe = Script::new();
    // Anchored, so the probe's own command line (which contains the marker) does not match.
    probe
        .raw_then("pgrep -f", &[format!("^{marker}").as_str()])
        .expect("q");
    let out = pool.run(&probe).await.expect("run");
    assert_eq!(out.status, Some(1), "the remote process is gone: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_key_is_pinned() {
    let tb = Testbed::load();
    let mut cfg = config(&tb);
    // Another host's key for the same address.
    cfg.host_key = HostKeyPolicy::Pinned(
        "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnx0uTrNn8wQJrOuxHm1HCQeH6V1qPoF3DXS/a84MpB\n".to_owned(),
    );
    let pool = SshPool::new(cfg).expect("pool");
    let err = pool
        .run(&script("true"))
        .await
        .expect_err("wrong key refused");
    assert!(matches!(err, SshError::Connect { .. }), "{err}");

    let mut cfg = config(&tb);
    cfg.host_key = HostKeyPolicy::AcceptNew;
    let pool = SshPool::new(cfg).expect("pool");
    assert!(pool
        .run(&script("true"))
        .await
        .expect("accept-new connects")
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_channels_open_more_masters() {
    let tb = Testbed::load();
    let pool = Arc::new(SshPool::new(config(&tb)).expect("pool"));
    let mut handles = Vec::new();
    for i in 0..16 {
        let pool = Arc::clone(&pool);
        handles.push(tokio::spawn(async move {
            let mut s = Script::new();
            s.raw("sleep 1");
            s.command("echo", &[i.to_string()]).expect("q");
            pool.run(&s).await
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.await.expect("join").expect("run");
        assert_eq!(out.stdout.trim(), i.to_string());
    }
    let masters = pool.masters().await;
    assert!(
        masters >= 2,
        "16 concurrent channels at 4 per master need several masters, got {masters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_is_replaced() {
    let tb = Testbed::load();
    let pool = SshPool::new(config(&tb)).expect("pool");
    assert!(pool.run(&script("true")).await.expect("first").success());
    // Kill our own master ssh process (found by the pool's private control directory).
    let killed = kill_masters_of(&pool);
    assert!(killed > 0, "found the master to kill");
    let out = pool.run(&script("echo back")).await.expect("recovered");
    assert_eq!(out.stdout.trim(), "back");
}

/// A frozen master (SIGSTOP: its control socket accepts but never answers) costs one bounded
/// check: concurrent commands all finish, on a healthy or a new master, and the frozen one is
/// dropped from the pool. The pool's lock is never held across that check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_master_never_blocks_the_pool() {
    let tb = Testbed::load();
    let pool = Arc::new(
        SshPool::new(SshConfig {
            max_channels_per_master: 1,
            ..config(&tb)
        })
        .expect("pool"),
    );
    // Two masters: two commands at once with one channel each.
    let (sa, sb) = (script("sleep 1; echo a"), script("sleep 1; echo b"));
    let (a, b) = tokio::join!(pool.run(&sa), pool.run(&sb));
    assert!(a.expect("a").success() && b.expect("b").success());
    assert_eq!(pool.masters().await, 2);
    let pids = master_pids(&pool);
    assert_eq!(pids.len(), 2, "{pids:?}");
    // SAFETY: stopping one of the pool's own master processes by its pid.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    // Let the masters' last checks go stale, so the next leases check them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = std::time::Instant::now();
    let mut runs = Vec::new();
    for i in 0..4 {
        let pool = Arc::clone(&pool);
        runs.push(tokio::spawn(async move {
            let mut s = Script::new();
            s.command("echo", &[i.to_string()]).expect("q");
            pool.run(&s).await
        }));
    }
    for (i, run) in runs.into_iter().enumerate() {
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("a frozen master blocked the pool")
            .expect("join")
            .expect("run");
        assert_eq!(out.stdout.trim(), i.to_string());
    }
    let took = started.elapsed();
    eprintln!("4 commands with a frozen master: {took:?}");
    assert!(
        !master_pids(&pool).is_empty() && pool.masters().await >= 1,
        "healthy masters serve on"
    );
    // SAFETY: ending the stopped master the test froze.
    unsafe {
        libc::kill(pids[0], libc::SIGKILL);
    }
    pool.close().await;
}

/// The pids of `pool`'s ssh master processes, oldest first.
fn master_pids(pool: &SshPool) -> Vec<i32> {
    let dir = pool.private_dir().display().to_string();
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.starts_with("ssh ") && cmd.contains(&dir)).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Kills the `ssh` master processes of `pool` (identified by its private directory).
fn kill_masters_of(pool: &SshPool) -> usize {
    let dir = pool.private_dir().display().to_string();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmd.starts_with("ssh ") && cmd.contains(&dir) {
            // SAFETY: signalling the pool's own master process by its pid.
            unsafe { libc::kill(pid.parse().expect("pid"), libc::SIGKILL) };
            killed += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_or_closing_the_pool_ends_its_masters() {
    let tb = Testbed::load();
    for close in [true, false] {
        let pool = SshPool::new(config(&tb)).expect("pool");
        assert!(pool.run(&script("true")).await.expect("run").success());
        let dir = pool.private_dir().display().to_string();
        assert_eq!(masters_using(&dir), 1);
        if close {
            pool.close().await;
        }
        drop(pool);
        let mut left = usize::MAX;
        for _ in 0..50 {
            left = masters_using(&dir);
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, 0, "no ssh master outlives its pool (close: {close})");
    }
}

fn masters_using(dir: &str) -> usize {
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("ssh ") && c.contains(dir))
        .count()
}
