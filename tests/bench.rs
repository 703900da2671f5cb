//! The benchmark: relay latency, concurrency, memory, chat write load, approval round trip
//! and session start, measured end to end on the real path (fake Mattermost → the bot as its
//! own process → real SSH → real rootless podman containers → the load agent → back).
//!
//! Run it with `scripts/bench` (`--quick` for the short run the test command uses). It is a
//! `harness = false` test target so that it reuses `tests/support`; without `SM_BENCH=1` in
//! the environment (which `scripts/bench` sets) it does nothing, so `cargo test` stays fast.
//!
//! Every figure is printed as a table and written as JSON (`--out FILE`, default
//! `target/bench/<quick|full>.json`). The run fails (exit status 1) only when a message is
//! lost or a scenario breaks, never because of a time. `docs/benchmarks.md` explains the
//! method and holds the latest full run.

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use session_manager::runtime::shell::Script;
use session_manager::runtime::ssh::{HostKeyPolicy, SshConfig, SshKey, SshPool};
use session_manager::store::{Platform, SessionState, Store};
use support::dns::FakeDns;
use support::mattermost::{ClickOutcome, FakeMattermost, PostWrite, PostWriteKind};
use support::opnsense::{FakeOpnsense, ALIAS};
use support::testbed::Testbed;
use support::TestDatabase;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

/// The load agent (perl: the sandbox image has no python3 and no node).
const AGENT: &str = include_str!("support/bench_agent.pl");
/// Key and secret of the fake OPNsense.
const OPN_KEY: &str = "bench-key";
const OPN_SECRET: &str = "bench-secret";
/// How long one message may take before it counts as lost.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one session may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(600);

// ------------------------------------------------------------------------------------------
// Plan and entry point
// ------------------------------------------------------------------------------------------

/// What one run does.
#[derive(Debug, Clone)]
struct Plan {
    name: &'static str,
    /// Sessions started in all.
    sessions: usize,
    /// Sessions started first, one at a time (clean session-start figures).
    sequential_starts: usize,
    /// How many of the remaining sessions start at once.
    start_concurrency: usize,
    /// Concurrency points of the relay-latency scenario.
    latency_points: Vec<usize>,
    /// Messages per latency point.
    messages_per_point: usize,
    /// Messages of the transport baseline (no bot in the path).
    baseline_messages: usize,
    /// Streamed answer: chunks, characters per chunk, milliseconds between chunks.
    stream: (usize, usize, u64),
    /// Approvals, one after another.
    approvals: usize,
    /// Upper bound of the whole run.
    deadline: Duration,
}

impl Plan {
    fn quick() -> Self {
        Self {
            name: "quick",
            sessions: 10,
            sequential_starts: 1,
            start_concurrency: 9,
            latency_points: vec![1, 10],
            messages_per_point: 100,
            baseline_messages: 100,
            stream: (100, 100, 100),
            approvals: 20,
            deadline: Duration::from_secs(600),
        }
    }

    fn full() -> Self {
        Self {
            name: "full",
            sessions: 100,
            sequential_starts: 3,
            start_concurrency: 8,
            latency_points: vec![1, 10, 100],
            messages_per_point: 1000,
            baseline_messages: 1000,
            stream: (300, 100, 100),
            approvals: 200,
            deadline: Duration::from_secs(40 * 60),
        }
    }
}

fn main() -> ExitCode {
    if std::env::var_os("SM_BENCH").is_none() {
        println!("bench: skipped (run scripts/bench, which sets SM_BENCH=1)");
        return ExitCode::SUCCESS;
    }
    let mut plan = Plan::full();
    let mut out: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => plan = Plan::quick(),
            "--out" => out = args.next(),
            "--sessions" => match args.next().and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n >= 1 => {
                    plan.sessions = n;
                    plan.latency_points.retain(|&c| c <= n);
                    plan.sequential_starts = plan.sequential_starts.min(n);
                }
                _ => {
                    eprintln!("bench: --sessions needs a positive number");
                    return ExitCode::from(2);
                }
            },
            // What libtest would pass (`cargo test -- --nocapture` and the like) is ignored.
            other if other.starts_with("--") => {}
            _ => {}
        }
    }
    let out = out.unwrap_or_else(|| {
        format!(
            "{}/target/bench/{}.json",
            env!("CARGO_MANIFEST_DIR"),
            plan.name
        )
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let outcome = runtime.block_on(async {
        match tokio::time::timeout(plan.deadline, run(&plan)).await {
            Ok(result) => result,
            Err(_) => Err(format!("the run did not finish within {:?}", plan.deadline)),
        }
    });
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("bench: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut json = report.json.clone();
    json["plan"] = json!(plan.name);
    json["bot_build"] = json!(std::env::var("SM_BENCH_PROFILE").unwrap_or_else(|_| "debug".into()));
    json["wall_seconds"] = json!(started.elapsed().as_secs_f64());
    json["machine"] = machine();
    if let Some(dir) = std::path::Path::new(&out).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_string_pretty(&json) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&out, text + "\n") {
                eprintln!("bench: cannot write {out}: {e}");
                return ExitCode::FAILURE;
            }
        }
        Err(e) => {
            eprintln!("bench: cannot encode the figures: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!(
        "\nbench: {} run in {:.0} s; figures in {out}",
        plan.name,
        started.elapsed().as_secs_f64()
    );
    if report.problems.is_empty() {
        println!("bench: no message lost, every scenario ran");
        ExitCode::SUCCESS
    } else {
        for p in &report.problems {
            eprintln!("bench: FAILED: {p}");
        }
        ExitCode::FAILURE
    }
}

/// The figures and what went wrong.
struct Report {
    json: Value,
    /// Lost messages and broken scenarios.
    problems: Vec<String>,
}

// ------------------------------------------------------------------------------------------
// Time and statistics
// ------------------------------------------------------------------------------------------

/// Wall-clock nanoseconds since the Unix epoch (the load agent stamps the same clock).
fn ns(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn now_ns() -> i128 {
    ns(SystemTime::now())
}

fn ms(nanos: i128) -> f64 {
    nanos as f64 / 1e6
}

/// Percentiles of a sample in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    fn of(sample: &[f64]) -> Self {
        let mut v: Vec<f64> = sample.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Self {
            n: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": round3(self.p50), "p90_ms": round3(self.p90),
               "p99_ms": round3(self.p99), "max_ms": round3(self.max), "mean_ms": round3(self.mean)})
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn table(title: &str, head: &[&str], rows: &[Vec<String>]) {
    println!("\n{title}");
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .chain(std::iter::once(head[i].chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = widths[i]))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(head.iter().map(|s| (*s).to_owned()).collect());
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        line(r.clone());
    }
}

fn f1(x: f64) -> String {
    format!("{x:.1}")
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

// ------------------------------------------------------------------------------------------
// The observer: every post the bot writes, stamped by the fake
// ------------------------------------------------------------------------------------------

/// What the observer found for a key.
#[derive(Debug, Clone)]
struct Seen {
    /// When the fake stored the write.
    at: i128,
    kind: PostWriteKind,
    post_id: String,
    /// The agent's `recv=` and `sent=` stamps, when the line has them.
    recv: i128,
    sent: i128,
}

#[derive(Default)]
struct ObsState {
    seen: HashMap<String, Seen>,
    waiters: HashMap<String, Vec<oneshot::Sender<Seen>>>,
    /// Every write by the bot, in order.
    log: Vec<PostWrite>,
}

/// Reads the fake's write stream and answers "when did the bot first post X".
#[derive(Clone)]
struct Observer {
    state: Arc<Mutex<ObsState>>,
}

impl Observer {
    fn start(fake: &FakeMattermost) -> Self {
        let mut rx = fake.watch_writes();
        let bot = fake.bot_user_id();
        let state: Arc<Mutex<ObsState>> = Arc::default();
        let inner = Arc::clone(&state);
        tokio::spawn(async move {
            while let Some(write) = rx.recv().await {
                if write.user_id != bot {
                    continue;
                }
                let keys = keys_of(&write);
                let mut st = inner.lock().unwrap_or_else(|e| e.into_inner());
                for (key, recv, sent) in keys {
                    if st.seen.contains_key(&key) {
                        continue;
                    }
                    let seen = Seen {
                        at: ns(write.at),
                        kind: write.kind,
                        post_id: write.post_id.clone(),
                        recv,
                        sent,
                    };
                    if let Some(waiters) = st.waiters.remove(&key) {
                        for w in waiters {
                            let _ = w.send(seen.clone());
                        }
                    }
                    st.seen.insert(key, seen);
                }
                st.log.push(write);
            }
        });
        Self { state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ObsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &str) -> Option<Seen> {
        self.lock().seen.get(key).cloned()
    }

    /// Waits until the bot writes something with `key`, up to `timeout`.
    async fn wait(&self, key: &str, timeout: Duration) -> Option<Seen> {
        let rx = {
            let mut st = self.lock();
            if let Some(seen) = st.seen.get(key) {
                return Some(seen.clone());
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.entry(key.to_owned()).or_default().push(tx);
            rx
        };
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }

    fn log(&self) -> Vec<PostWrite> {
        self.lock().log.clone()
    }

    fn count_containing(&self, needle: &str) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|w| w.kind == PostWriteKind::Create && w.message.contains(needle))
            .count()
    }
}

/// The keys a bot write carries: agent lines (`echo ID`, `done ID`, `approved D`,
/// `denied D`), thread roots (`root:org/repo`), progress steps (`clone:`, `up:`, `agent:`,
/// `ready:`, `failed:` + root post id) and approval cards (`card:DOMAIN`).
fn keys_of(write: &PostWrite) -> Vec<(String, i128, i128)> {
    let mut keys = Vec::new();
    let thread = if write.root_id.is_empty() {
        write.post_id.as_str()
    } else {
        write.root_id.as_str()
    };
    for line in write.message.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if matches!(first, "echo" | "done" | "approved" | "denied") {
            let Some(id) = words.next() else { continue };
            let stamp = |w: Option<&str>, p: &str| {
                w.and_then(|w| w.strip_prefix(p))
                    .and_then(|n| n.parse::<i128>().ok())
                    .unwrap_or(0)
            };
            let recv = stamp(words.next(), "recv=");
            let sent = stamp(words.next(), "sent=");
            if recv > 0 && sent > 0 {
                keys.push((format!("{first}:{id}"), recv, sent));
            }
        }
    }
    let last = write.message.lines().last().unwrap_or_default();
    for (prefix, key) in [
        ("⏳ Cloning", "clone"),
        ("⏳ Starting the container", "up"),
        ("⏳ Starting Claude", "agent"),
        ("🟢 Ready", "ready"),
        ("❌", "failed"),
    ] {
        if last.starts_with(prefix) {
            keys.push((format!("{key}:{thread}"), 0, 0));
        }
    }
    if write.root_id.is_empty() && write.kind == PostWriteKind::Create {
        if let Some(rest) = write.message.split("for `").nth(1) {
            let slug: String = rest
                .chars()
                .take_while(|c| *c != '`' && *c != '@')
                .collect();
            keys.push((format!("root:{slug}"), 0, 0));
        }
    }
    let props = write.props.to_string();
    if props.contains("Approve for this session") {
        let text = format!("{}\n{props}", write.message);
        if let Some(rest) = text.split("asks to reach **").nth(1) {
            if let Some(domain) = rest.split("**").next() {
                keys.push((format!("card:{domain}"), 0, 0));
            }
        }
    }
    keys
}

// ------------------------------------------------------------------------------------------
// The world: fakes, the VM, the bot process
// ------------------------------------------------------------------------------------------

/// One started session.
#[derive(Debug, Clone)]
struct BenchSession {
    /// `bench/sNNN`.
    slug: String,
    channel: String,
    root: String,
    id: String,
    container: String,
    user: String,
    folder: String,
}

/// Everything the run made; [`World::shutdown`] (or, on a panic, `Drop`) removes it.
struct World {
    tb: Testbed,
    fake: FakeMattermost,
    opn: FakeOpnsense,
    _dns: FakeDns,
    db: TestDatabase,
    store: Store,
    vm: SshPool,
    vm_root: String,
    alice: String,
    town: String,
    obs: Observer,
    bot: Option<std::process::Child>,
    bot_tmp: tempfile::TempDir,
    bot_log: std::path::PathBuf,
    clean: bool,
}

fn ssh_config(tb: &Testbed, timeout: Duration) -> SshConfig {
    SshConfig {
        host: tb.get("SM_TEST_VM_HOST"),
        port: tb.port(),
        user: tb.get("SM_TEST_VM_USER"),
        key: SshKey::Path(tb.get("SM_TEST_VM_KEY_PATH").into()),
        host_key: HostKeyPolicy::Pinned(tb.known_hosts()),
        timeout,
        max_channels_per_master: 8,
    }
}

/// `SM_CLAUDE_COMMAND` running the load agent: its source travels base64-encoded in the
/// command line (no file needs to exist in the container).
fn agent_command() -> String {
    use base64::Engine as _;
    let code = base64::engine::general_purpose::STANDARD.encode(AGENT);
    format!("perl -MMIME::Base64 -e 'eval decode_base64(q({code})); die $@ if $@' --")
}

/// The words of [`agent_command`], for running the agent without the bot.
fn agent_words() -> Vec<String> {
    shlex::split(&agent_command()).unwrap_or_default()
}

impl World {
    async fn start(plan: &Plan) -> Result<Self, String> {
        let tb = Testbed::load();
        let fake = FakeMattermost::start().await;
        let obs = Observer::start(&fake);
        let alice = fake.add_user("alice");
        fake.grant_ephemeral_posts(&fake.bot_user_id());
        let town = fake.create_channel("town-square", &[&alice, &fake.bot_user_id()]);
        let opn = FakeOpnsense::start(OPN_KEY, OPN_SECRET).await;
        let dns = FakeDns::start(&[]).await;
        let db = TestDatabase::sqlite();
        let store = db.store().await;
        let vm = SshPool::new(ssh_config(&tb, Duration::from_secs(120)))
            .map_err(|e| format!("ssh: {e}"))?;
        let vm_root = format!("/home/claude/sm-bench/{}", uuid::Uuid::new_v4().simple());
        let bot_tmp = tempfile::tempdir().map_err(|e| format!("tmp: {e}"))?;
        let bot_log = bot_tmp.path().join("bot.log");
        let mut world = Self {
            tb,
            fake,
            opn,
            _dns: dns,
            db,
            store,
            vm,
            vm_root,
            alice,
            town,
            obs,
            bot: None,
            bot_tmp,
            bot_log,
            clean: false,
        };
        world.make_repos(plan.sessions).await?;
        world.start_bot()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while world.fake.websocket_connections() == 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "the bot never connected to the fake Mattermost; its log: {}",
                    world.bot_log.display()
                ));
            }
            if let Some(child) = world.bot.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "the bot exited at start ({status}); its log: {}",
                        std::fs::read_to_string(&world.bot_log).unwrap_or_default()
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(world)
    }

    /// One bare repository per session (`bench/sNNN`, one commit) under the run's directory.
    async fn make_repos(&self, n: usize) -> Result<(), String> {
        let mut s = Script::new();
        s.set("root", &self.vm_root)
            .and_then(|s| s.set("count", &n.to_string()))
            .map_err(|e| e.to_string())?;
        s.raw(r#"work="$root/seed"; mkdir -p "$work" "$root/git/bench""#)
            .raw(r#"git -C "$work" init -q -b main"#)
            .raw(r#"printf 'A repository of the session-manager benchmark.\n' > "$work/README.md""#)
            .raw(r#"git -C "$work" add README.md"#)
            .raw(r#"git -C "$work" -c user.name=bench -c user.email=bench@example.invalid commit -q -m seed"#)
            .raw(r#"i=0; while [ "$i" -lt "$count" ]; do bare="$root/git/bench/$(printf 's%03d' "$i").git"; git init -q --bare -b main "$bare"; git -C "$work" push -q "$bare" main; i=$((i + 1)); done"#)
            .raw(r#"echo made"#);
        let out = self.vm.run(&s).await.map_err(|e| e.to_string())?;
        if !out.success() || !out.stdout.contains("made") {
            return Err(format!("cannot make the repositories: {}", out.stderr));
        }
        Ok(())
    }

    fn start_bot(&mut self) -> Result<(), String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let tb = &self.tb;
        let vars: Vec<(&str, String)> = vec![
            ("MATTERMOST_URL", self.fake.url()),
            ("MATTERMOST_TOKEN", self.fake.bot_token()),
            ("MATTERMOST_TEAM_ID", self.fake.team_id()),
            ("OPNSENSE_URL", self.opn.url()),
            ("OPNSENSE_KEY", OPN_KEY.into()),
            ("OPNSENSE_SECRET", OPN_SECRET.into()),
            ("CALLBACK_SECRET", support::CALLBACK_SECRET.into()),
            ("CALLBACK_URL", format!("http://127.0.0.1:{port}/callback")),
            ("LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("DATABASE_URL", self.db.url.clone()),
            ("VM_HOST", tb.get("SM_TEST_VM_HOST")),
            ("VM_PORT", tb.get("SM_TEST_VM_PORT")),
            ("VM_USER", tb.get("SM_TEST_VM_USER")),
            ("VM_SSH_KEY_PATH", tb.get("SM_TEST_VM_KEY_PATH")),
            ("VM_KNOWN_HOSTS", tb.get("SM_TEST_VM_KNOWN_HOSTS")),
            ("GIT_BASE_URL", format!("file://{}/git", self.vm_root)),
            ("REPOS_BASE_PATH", format!("{}/repos", self.vm_root)),
            ("WORKTREES_PATH", format!("{}/worktrees", self.vm_root)),
            ("CONTAINER_IMAGE", tb.get("SM_TEST_SANDBOX_IMAGE")),
            ("CONTAINER_NETWORK", "host".into()),
            ("CONTAINER_ENV", "BENCH_AGENT=1".into()),
            ("CLAUDE_COMMAND", agent_command()),
            ("DEVCONTAINER_TIMEOUT_SECS", "600".into()),
            // The testbed's podman is shared with other test runs: the reconciler still
            // lists the containers every minute, but leaves others' alone during a run.
            ("RECONCILE_GRACE_SECS", "86400".into()),
            ("EGRESS_DNS_SERVERS", self._dns.addr().to_string()),
            ("RATE_LIMIT_RPS", "10000".into()),
            ("RATE_LIMIT_BURST", "10000".into()),
            ("LOG_FORMAT", "json".into()),
        ];
        let bin = std::env::var("SM_BENCH_BOT")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_session-manager").to_owned());
        let log = std::fs::File::create(&self.bot_log).map_err(|e| format!("log: {e}"))?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TMPDIR", self.bot_tmp.path())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        for (k, v) in vars {
            cmd.env(format!("SM_{k}"), v);
        }
        self.bot = Some(cmd.spawn().map_err(|e| format!("cannot run {bin}: {e}"))?);
        Ok(())
    }

    fn bot_pid(&self) -> u32 {
        self.bot.as_ref().map_or(0, std::process::Child::id)
    }

    /// Resident memory of the bot process and of the ssh masters it started, in KiB.
    fn memory(&self) -> (u64, u64) {
        let bot = rss_kib(self.bot_pid());
        let dir = self.bot_tmp.path().display().to_string();
        let mut masters = 0;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                    continue;
                };
                let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmd.starts_with("ssh ") && cmd.contains(&dir) {
                    if let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() {
                        masters += rss_kib(pid);
                    }
                }
            }
        }
        (bot, masters)
    }

    /// Starts `bench/sNNN` from town-square and waits until its thread says Ready. Returns the
    /// session and its phases as seen in the fake (command, clone, up, agent, ready).
    async fn start_session(&self, idx: usize) -> Result<(BenchSession, [i128; 5]), String> {
        let slug = format!("bench/s{idx:03}");
        let t0 = now_ns();
        self.fake
            .post_as(
                &self.alice,
                &self.town,
                None,
                &format!("@claude start {slug}"),
            )
            .map_err(|e| format!("post: {e}"))?;
        let root = self
            .obs
            .wait(&format!("root:{slug}"), Duration::from_secs(60))
            .await
            .ok_or_else(|| format!("no thread for {slug}"))?;
        let thread = root.post_id.clone();
        let deadline = Instant::now() + START_TIMEOUT;
        let ready = loop {
            if let Some(seen) = self.obs.get(&format!("ready:{thread}")) {
                break seen;
            }
            if self.obs.get(&format!("failed:{thread}")).is_some() {
                let why = self
                    .fake
                    .thread(&thread)
                    .into_iter()
                    .map(|p| p.message)
                    .collect::<Vec<_>>()
                    .join(" / ");
                return Err(format!("{slug} failed to start: {why}"));
            }
            if Instant::now() > deadline {
                return Err(format!("{slug} was not ready within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let at = |key: &str| self.obs.get(&format!("{key}:{thread}")).map_or(0, |s| s.at);
        let phases = [t0, at("clone"), at("up"), at("agent"), ready.at];
        let channel = self
            .fake
            .post(&thread)
            .map(|p| p.channel_id)
            .ok_or("the thread root vanished")?;
        let row = self
            .store
            .session_by_thread(Platform::Mattermost, &channel, &thread)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no session row for {slug}"))?;
        let (user, folder) = row
            .container
            .clone()
            .map(|d| (d.user, d.folder))
            .unwrap_or_default();
        Ok((
            BenchSession {
                slug,
                channel,
                root: thread,
                id: row.id,
                container: row.container_id.unwrap_or_default(),
                user,
                folder,
            },
            phases,
        ))
    }

    /// A person's reply in a session's thread; returns when the fake had published it
    /// (`posted` queued to the bot's WebSocket).
    fn say(&self, s: &BenchSession, text: &str) -> Result<i128, String> {
        Ok(self.say_timed(s, text)?.1)
    }

    /// Like [`World::say`], with the time the fake took to store and publish the post:
    /// `(started, published)`.
    fn say_timed(&self, s: &BenchSession, text: &str) -> Result<(i128, i128), String> {
        let t = now_ns();
        self.fake
            .post_as(&self.alice, &s.channel, Some(&s.root), text)
            .map_err(|e| format!("post: {e}"))?;
        Ok((t, now_ns()))
    }

    /// Stops every session (`!stop` in its thread), waits until each has ended, then stops
    /// the bot (SIGTERM) and removes what is left on the VM.
    async fn shutdown(&mut self, sessions: &[BenchSession]) -> Vec<String> {
        let mut problems = Vec::new();
        for s in sessions {
            if let Err(e) = self.say(s, "!stop") {
                problems.push(format!("cannot stop {}: {e}", s.slug));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        for s in sessions {
            loop {
                let state = self
                    .store
                    .session(&s.id)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.state());
                if state == Some(SessionState::Ended) {
                    break;
                }
                if Instant::now() > deadline {
                    problems.push(format!("{} did not end after !stop", s.slug));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if let Some(mut child) = self.bot.take() {
            // SAFETY: signalling the bot process this run started, by its pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            problems.push(format!("the bot exited with {status}"));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => {
                        problems.push("the bot did not stop on SIGTERM".into());
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        support::stack::kill_ssh_masters_under(self.bot_tmp.path());
        let left = clean_vm(&self.vm, &self.vm_root).await;
        if left > 0 {
            problems.push(format!(
                "{left} container(s) of stopped sessions were still there (removed)"
            ));
        }
        self.vm.close().await;
        self.clean = true;
        problems
    }
}

impl Drop for World {
    /// After a failure or panic: kill the bot and its ssh masters, remove the run's
    /// containers and directory.
    fn drop(&mut self) {
        if self.clean {
            return;
        }
        if let Some(mut child) = self.bot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        support::stack::kill_ssh_masters_under(self.bot_tmp.path());
        let root = self.vm_root.clone();
        let tb = self.tb.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(vm) = SshPool::new(ssh_config(&tb, Duration::from_secs(120))) {
                    clean_vm(&vm, &root).await;
                    vm.close().await;
                }
            });
        })
        .join();
    }
}

/// Removes the containers of workspaces under `root` and `root` itself; returns how many
/// containers there were.
async fn clean_vm(vm: &SshPool, root: &str) -> usize {
    let mut s = Script::new();
    if s.set("root", root).is_err() {
        return 0;
    }
    // The containers' per-folder `-uid` images go too (never forced; the sandbox image stays).
    s.raw(r#"n=0; images=""; for id in $(podman ps -aq --no-trunc --filter label=session-manager.managed=true); do case "$(podman inspect --format '{{index .Config.Labels "session-manager.workspace"}}' "$id")" in "$root"/*) images="$images $(podman inspect --format '{{.ImageName}}' "$id")"; podman rm -f "$id" >/dev/null; n=$((n + 1)) ;; esac; done"#)
        .raw(r#"for image in $images; do case "$image" in vsc-*-uid|vsc-*-uid:*|*/vsc-*-uid|*/vsc-*-uid:*) podman image rm "$image" >/dev/null 2>&1 || true ;; esac; done; echo "removed=$n""#)
        .raw(r#"rm -rf "$root""#);
    match vm.run(&s).await {
        Ok(out) => out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("removed="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({"cpu": cpu, "cores": cores, "memory": mem,
           "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()})
}

// ------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------

async fn run(plan: &Plan) -> Result<Report, String> {
    println!(
        "bench: {} run: {} sessions, latency at {:?} concurrent sessions, {} messages per point",
        plan.name, plan.sessions, plan.latency_points, plan.messages_per_point
    );
    let mut world = World::start(plan).await?;
    let mut sessions: Vec<BenchSession> = Vec::new();
    let mut json = json!({});
    let outcome = scenarios(plan, &world, &mut sessions, &mut json).await;
    let mut problems = world.shutdown(&sessions).await;
    match outcome {
        Ok(mut lost) => problems.append(&mut lost),
        Err(e) => problems.insert(0, e),
    }
    if !problems.is_empty() {
        eprintln!("bench: the bot's log is {}", world.bot_log.display());
        // Keep the log for a look: the temporary directory would remove it.
        let keep = std::env::temp_dir().join(format!("sm-bench-bot-{}.log", std::process::id()));
        if std::fs::copy(&world.bot_log, &keep).is_ok() {
            eprintln!("bench: the bot's log was kept at {}", keep.display());
        }
    }
    Ok(Report { json, problems })
}

/// Runs the scenarios in order; returns the lost messages (a broken scenario is an `Err`).
async fn scenarios(
    plan: &Plan,
    world: &World,
    sessions: &mut Vec<BenchSession>,
    json: &mut Value,
) -> Result<Vec<String>, String> {
    let mut lost = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = world.memory();

    // 5. Session start (and the memory points it passes).
    let mut starts: Vec<[i128; 5]> = Vec::new();
    let mut memory_points: Vec<(usize, (u64, u64))> = vec![(0, idle)];
    let first_wave = plan.sessions.min(10);
    let started_at = Instant::now();
    let mut next = 0;
    while next < plan.sessions {
        let batch = if next < plan.sequential_starts {
            1
        } else if next < first_wave {
            plan.start_concurrency.min(first_wave - next)
        } else {
            plan.start_concurrency.min(plan.sessions - next)
        };
        let results =
            futures_util::future::join_all((next..next + batch).map(|i| world.start_session(i)))
                .await;
        for r in results {
            let (s, phases) = r?;
            sessions.push(s);
            starts.push(phases);
        }
        next += batch;
        if next == first_wave || next == plan.sessions {
            tokio::time::sleep(Duration::from_secs(1)).await;
            memory_points.push((next, world.memory()));
        }
    }
    let start_wall = started_at.elapsed().as_secs_f64();
    json["session_start"] = session_start_report(world, plan, &starts, start_wall).await;

    // Transport baseline: the same SSH pool code, podman exec and agent, without the bot.
    let baseline = transport_baseline(world, &sessions[0], plan.baseline_messages).await?;
    json["transport_baseline"] =
        json!({"to_agent": baseline.0.json(), "from_agent": baseline.1.json()});
    table(
        "Transport baseline (SSH channel + podman exec + agent, no bot), ms",
        &["direction", "n", "p50", "p90", "p99", "max"],
        &[
            stat_row("to agent", &baseline.0),
            stat_row("from agent", &baseline.1),
        ],
    );

    // 1. Relay latency.
    let mut latency = Vec::new();
    let mut rows = Vec::new();
    for &c in &plan.latency_points {
        let (to_agent, from_agent, missing, queued, fake) =
            relay_latency(world, &sessions[..c], plan.messages_per_point).await;
        lost.extend(missing);
        let over_in: Vec<f64> = to_agent.iter().map(|x| x - baseline.0.p50).collect();
        let over_out: Vec<f64> = from_agent.iter().map(|x| x - baseline.1.p50).collect();
        let (si, so) = (Stats::of(&to_agent), Stats::of(&from_agent));
        let (oi, oo) = (Stats::of(&over_in), Stats::of(&over_out));
        rows.push(lat_row(c, "to agent", &si, &oi));
        rows.push(lat_row(c, "from agent", &so, &oo));
        println!(
            "   {c} sessions: the fake took p50 {:.2} / p99 {:.2} ms to store and publish a post (not counted)",
            fake.p50, fake.p99
        );
        latency.push(
            json!({"sessions": c, "queued_notices": queued, "fake_publish": fake.json(),
            "to_agent": si.json(), "from_agent": so.json(),
            "bot_overhead_to_agent": oi.json(), "bot_overhead_from_agent": oo.json()}),
        );
    }
    json["relay_latency"] = json!(latency);
    table(
        "1. Relay latency, ms (end to end; bot = end to end minus the baseline's median)",
        &[
            "sessions",
            "direction",
            "n",
            "p50",
            "p90",
            "p99",
            "max",
            "bot p50",
            "bot p99",
        ],
        &rows,
    );

    // 2. Memory.
    memory_points.push((sessions.len(), world.memory()));
    json["memory"] = memory_report(&memory_points);

    // 3. Chat write load.
    let (write_json, mut write_lost) = write_load(world, sessions, plan.stream).await;
    lost.append(&mut write_lost);
    json["chat_writes"] = write_json;

    // 4. Approvals.
    let (approval_json, mut approval_lost) =
        approvals(world, sessions, plan.approvals, baseline.0.p50).await;
    lost.append(&mut approval_lost);
    json["approvals"] = approval_json;

    json["sessions"] = json!(sessions.len());
    Ok(lost)
}

fn stat_row(label: &str, s: &Stats) -> Vec<String> {
    vec![
        label.to_owned(),
        s.n.to_string(),
        f2(s.p50),
        f2(s.p90),
        f2(s.p99),
        f2(s.max),
    ]
}

fn lat_row(c: usize, dir: &str, s: &Stats, over: &Stats) -> Vec<String> {
    vec![
        c.to_string(),
        dir.to_owned(),
        s.n.to_string(),
        f2(s.p50),
        f2(s.p90),
        f2(s.p99),
        f2(s.max),
        f2(over.p50),
        f2(over.p99),
    ]
}

// ---- session start ---------------------------------------------------------------------

async fn session_start_report(
    world: &World,
    plan: &Plan,
    starts: &[[i128; 5]],
    wall: f64,
) -> Value {
    // The one remote command before the clone step: `git ls-remote` (does the repository
    // exist?), timed here over the same SSH code so it can be taken out of the bot's part.
    let ls_remote = ls_remote_time(world, 10).await;
    let split = |range: std::ops::Range<usize>| {
        let pick = |f: &dyn Fn(&[i128; 5]) -> i128| -> Vec<f64> {
            starts[range.clone()].iter().map(|p| ms(f(p))).collect()
        };
        let total = Stats::of(&pick(&|p| p[4] - p[0]));
        let before = Stats::of(&pick(&|p| p[1] - p[0]));
        let git = Stats::of(&pick(&|p| p[2] - p[1]));
        let up = Stats::of(&pick(&|p| p[3] - p[2]));
        let agent = Stats::of(&pick(&|p| p[4] - p[3]));
        let own = Stats::of(&pick(&|p| p[1] - p[0] - (ls_remote.p50 * 1e6) as i128));
        (total, before, git, up, agent, own)
    };
    let seq = plan.sequential_starts.min(starts.len());
    let mut rows = Vec::new();
    let mut out = json!({"ls_remote": ls_remote.json(), "wall_seconds": wall});
    for (label, range) in [
        ("one at a time", 0..seq),
        ("concurrent", seq..starts.len()),
        ("all", 0..starts.len()),
    ] {
        if range.is_empty() {
            continue;
        }
        let n = range.len();
        let (total, before, git, up, agent, own) = split(range);
        rows.push(vec![
            label.to_owned(),
            n.to_string(),
            f1(total.p50),
            f1(total.max),
            f1(before.p50),
            f1(own.p50),
            f1(git.p50),
            f1(up.p50),
            f1(agent.p50),
        ]);
        out[label.replace(' ', "_")] = json!({"n": n, "total": total.json(),
            "before_clone": before.json(), "bot_own": own.json(), "git": git.json(),
            "devcontainer_up": up.json(), "agent_start": agent.json()});
    }
    table(
        "5. Session start, ms (phases between the progress post's edits, as the fake received them)",
        &["starts", "n", "total p50", "total max", "before clone", "bot own", "git", "devcontainer up", "agent"],
        &rows,
    );
    println!(
        "   bot own = before clone (command → channel, thread, progress post) minus one `git ls-remote` over SSH (p50 {:.1} ms); {} sessions started in {:.0} s",
        ls_remote.p50,
        starts.len(),
        wall
    );
    out
}

async fn ls_remote_time(world: &World, n: usize) -> Stats {
    let mut sample = Vec::new();
    for _ in 0..n {
        let mut s = Script::new();
        if s.set(
            "url",
            &format!("file://{}/git/bench/s000.git", world.vm_root),
        )
        .is_err()
        {
            break;
        }
        s.raw(r#"git ls-remote -- "$url" HEAD >/dev/null 2>&1 && echo exists"#);
        let t = Instant::now();
        if world.vm.run(&s).await.is_ok() {
            sample.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Stats::of(&sample)
}

// ---- transport baseline -----------------------------------------------------------------

async fn transport_baseline(
    world: &World,
    s: &BenchSession,
    n: usize,
) -> Result<(Stats, Stats), String> {
    let mut words: Vec<String> = vec![
        "podman".into(),
        "exec".into(),
        "-i".into(),
        "-u".into(),
        s.user.clone(),
        "-w".into(),
        s.folder.clone(),
        s.container.clone(),
    ];
    words.extend(agent_words());
    words.extend(["-p", "--session-id", "baseline"].map(str::to_owned));
    let mut script = Script::new();
    script.command("exec", &words).map_err(|e| e.to_string())?;
    let mut process = world
        .vm
        .spawn(&script)
        .await
        .map_err(|e| format!("baseline agent: {e}"))?;
    let mut stdin = process.take_stdin().ok_or("baseline agent: no stdin")?;
    let stdout = process.take_stdout().ok_or("baseline agent: no stdout")?;
    let stderr = process.take_stderr();
    let stderr_text: Arc<Mutex<String>> = Arc::default();
    if let Some(stderr) = stderr {
        let text = Arc::clone(&stderr_text);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut t = text.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() < 2000 {
                    t.push_str(&line);
                    t.push('\n');
                }
            }
        });
    }
    let said = |why: &str| {
        // Give the stderr reader a moment: the process has just ended.
        std::thread::sleep(Duration::from_millis(200));
        let text = stderr_text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        format!("{why} (container {}): {}", s.container, text.trim())
    };
    let mut lines = BufReader::new(stdout).lines();
    let (mut to_agent, mut from_agent) = (Vec::new(), Vec::new());
    for i in 0..n {
        let line = session_manager::agent::stream_json::user_turn(&format!("bench echo base-{i}"));
        let t = now_ns();
        stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("baseline write: {e}"))?;
        stdin.flush().await.map_err(|e| e.to_string())?;
        loop {
            let next = tokio::time::timeout(MESSAGE_TIMEOUT, lines.next_line())
                .await
                .map_err(|_| said("the baseline agent did not answer"))?
                .map_err(|e| e.to_string())?
                .ok_or_else(|| said("the baseline agent ended"))?;
            let read = now_ns();
            if next.contains("\"result\"") && next.contains("\"type\":\"result\"") {
                break;
            }
            if let Some(pos) = next.find("echo base-") {
                let rest = &next[pos..];
                let num = |p: &str| {
                    rest.split(p)
                        .nth(1)
                        .map(|r| {
                            r.chars()
                                .take_while(char::is_ascii_digit)
                                .collect::<String>()
                        })
                        .and_then(|d| d.parse::<i128>().ok())
                        .unwrap_or(0)
                };
                let (recv, sent) = (num("recv="), num("sent="));
                to_agent.push(ms(recv - t));
                from_agent.push(ms(read - sent));
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), process.wait()).await;
    Ok((Stats::of(&to_agent), Stats::of(&from_agent)))
}

// ---- relay latency ----------------------------------------------------------------------

/// `messages` echo round trips spread over `sessions`, each session one message at a time
/// (a person waits for the answer): returns the two latency samples (ms), the lost messages
/// how many messages the bot queued (answered "still working") and how long the fake took to
/// store and publish each post (not counted in the latency).
async fn relay_latency(
    world: &World,
    sessions: &[BenchSession],
    messages: usize,
) -> (Vec<f64>, Vec<f64>, Vec<String>, usize, Stats) {
    let c = sessions.len();
    let queued_before = world.obs.count_containing("your message is queued");
    let per = messages.div_ceil(c);
    let runs = sessions.iter().enumerate().map(|(si, s)| async move {
        let mut to_agent = Vec::new();
        let mut from_agent = Vec::new();
        let mut fake_ms = Vec::new();
        let mut lost = Vec::new();
        for k in 0..per {
            if si * per + k >= messages {
                break;
            }
            let id = format!("c{c}-{}-{k}", &s.slug[6..]);
            let t = match world.say_timed(s, &format!("bench echo {id}")) {
                Ok((before, t)) => {
                    fake_ms.push(ms(t - before));
                    t
                }
                Err(e) => {
                    lost.push(format!("{id}: {e}"));
                    continue;
                }
            };
            match world.obs.wait(&format!("echo:{id}"), MESSAGE_TIMEOUT).await {
                Some(seen) => {
                    to_agent.push(ms(seen.recv - t));
                    // The echo is the first text of its turn: the bot posts it at once in
                    // a new post (an edit would mean it was coalesced).
                    if seen.kind == PostWriteKind::Create {
                        from_agent.push(ms(seen.at - seen.sent));
                    } else {
                        lost.push(format!("echo {id} arrived in an edit, not a new post"));
                    }
                }
                None => {
                    lost.push(format!("echo {id} never came back ({})", s.slug));
                    if lost.len() >= 3 {
                        break;
                    }
                }
            }
            // The person reads the answer before writing again (the bot meanwhile ends the
            // turn): about `c` × 10 ms, spread ±50 %, so that every point offers about 100
            // messages a second in all, in no lockstep.
            tokio::time::sleep(think_time(c, &id)).await;
        }
        (to_agent, from_agent, lost, fake_ms)
    });
    let results = futures_util::future::join_all(runs).await;
    let (mut a, mut b, mut l, mut f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (x, y, z, w) in results {
        a.extend(x);
        b.extend(y);
        l.extend(z);
        f.extend(w);
    }
    let queued = world.obs.count_containing("your message is queued") - queued_before;
    (a, b, l, queued, Stats::of(&f))
}

/// A pause of `c` × 10 ms (at least 20 ms), spread ±50 % by a hash of `id`.
fn think_time(c: usize, id: &str) -> Duration {
    let base = (c as f64 * 10.0).max(20.0);
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let spread = (h % 1000) as f64 / 1000.0; // 0..1
    Duration::from_secs_f64(base * (0.5 + spread) / 1000.0)
}

// ---- memory -------------------------------------------------------------------------------

fn memory_report(points: &[(usize, (u64, u64))]) -> Value {
    let idle = points.first().map_or(0, |p| p.1 .0);
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (label, (n, (bot, masters))) in points.iter().enumerate().map(|(i, p)| {
        (
            if i + 1 == points.len() && i > 0 {
                "after the load"
            } else if p.0 == 0 {
                "idle"
            } else {
                "sessions up"
            },
            p,
        )
    }) {
        let per = if *n > 0 {
            (*bot as f64 - idle as f64) / *n as f64 / 1024.0
        } else {
            0.0
        };
        rows.push(vec![
            label.to_owned(),
            n.to_string(),
            f1(*bot as f64 / 1024.0),
            f2(per),
            f1(*masters as f64 / 1024.0),
        ]);
        out.push(json!({"when": label, "sessions": n, "bot_rss_kib": bot,
            "per_session_mib": round3(per), "ssh_masters_rss_kib": masters}));
    }
    table(
        "2. Memory: the bot's resident set (and, apart, its ssh master processes)",
        &[
            "when",
            "sessions",
            "bot RSS MiB",
            "MiB per session",
            "ssh masters MiB",
        ],
        &rows,
    );
    json!(out)
}

// ---- chat write load ----------------------------------------------------------------------

/// The text the agent streams for `id` (what `chunk_line` in the agent writes).
fn expected_stream(id: &str, chunks: usize, size: usize) -> String {
    let filler = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod ";
    let mut out = String::new();
    for k in 0..chunks {
        let mut line = format!("{id} c{k} ");
        while line.len() < size {
            line.push_str(filler);
        }
        line.truncate(size);
        if line.ends_with(' ') {
            line.pop();
            line.push('x');
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

async fn write_load(
    world: &World,
    sessions: &[BenchSession],
    (chunks, size, interval): (usize, usize, u64),
) -> (Value, Vec<String>) {
    let mut lost = Vec::new();
    let typing_before = world.fake.typing_events().len();
    let log_before = world.obs.log().len();
    let t0 = now_ns();
    let mut ids = Vec::new();
    for s in sessions {
        let id = format!("w-{}", &s.slug[6..]);
        if let Err(e) = world.say(s, &format!("bench stream {id} {chunks} {size} {interval}")) {
            lost.push(format!("stream {id}: {e}"));
        }
        ids.push(id);
    }
    let expected_secs = chunks as f64 * interval as f64 / 1000.0;
    let wait = Duration::from_secs_f64(expected_secs * 3.0 + 120.0);
    let keys: Vec<String> = ids.iter().map(|id| format!("done:{id}")).collect();
    let waits = keys.iter().map(|key| world.obs.wait(key, wait));
    let done = futures_util::future::join_all(waits).await;
    let t_end = done
        .iter()
        .flatten()
        .map(|s| s.at)
        .max()
        .unwrap_or_else(now_ns);
    // The final edit of each post follows its last text within the edit interval.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let typing = world.fake.typing_events().len() - typing_before;
    let log = world.obs.log();
    let writes: Vec<&PostWrite> = log[log_before..].iter().collect();
    let mut per_session_rate = Vec::new();
    let mut intact = 0;
    let mut total_writes = 0;
    for (s, id) in sessions.iter().zip(&ids) {
        let mine: Vec<&&PostWrite> = writes
            .iter()
            .filter(|w| w.root_id == s.root && w.message.contains(&format!("{id} c")))
            .collect();
        let start = mine.first().map_or(t0, |w| ns(w.at));
        let end = world.obs.get(&format!("done:{id}")).map_or(t_end, |d| d.at);
        let secs = (ms(end - start) / 1000.0)
            .max(expected_secs * 0.5)
            .max(0.001);
        total_writes += mine.len();
        per_session_rate.push(mine.len() as f64 / secs);
        // Reassemble: the final text of every post of this answer, in creation order.
        let mut posts: Vec<String> = Vec::new();
        for w in &mine {
            if w.kind == PostWriteKind::Create && !posts.contains(&w.post_id) {
                posts.push(w.post_id.clone());
            }
        }
        let text: String = posts
            .iter()
            .filter_map(|p| world.fake.post(p))
            .map(|p| p.message)
            .collect();
        let body: String = text
            .lines()
            .filter(|l| l.starts_with(&format!("{id} c")))
            .map(|l| format!("{}\n", l.trim_end()))
            .collect();
        let want = expected_stream(id, chunks, size);
        let squash = |t: &str| t.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        if body == want || squash(&text).contains(&squash(&want)) {
            intact += 1;
        } else {
            let got = body.lines().count();
            lost.push(format!(
                "the streamed answer of {} came out different: {got} of {chunks} lines intact",
                s.slug
            ));
        }
    }
    let n = sessions.len().max(1) as f64;
    let rate = Stats::of(&per_session_rate);
    let window = ms(t_end - t0) / 1000.0;
    let typing_rate = typing as f64 / n / window.max(0.001);
    table(
        "3. Chat write load while every session streams a long answer",
        &[
            "sessions",
            "chars each",
            "seconds",
            "post writes",
            "per session/s mean",
            "max",
            "typing/s",
            "intact",
        ],
        &[vec![
            sessions.len().to_string(),
            (chunks * size).to_string(),
            f1(window),
            total_writes.to_string(),
            f2(rate.mean),
            f2(rate.max),
            f2(typing_rate),
            format!("{intact}/{}", sessions.len()),
        ]],
    );
    (
        json!({"sessions": sessions.len(), "chars_per_answer": chunks * size,
               "chunk_interval_ms": interval, "window_seconds": round3(window),
               "post_writes": total_writes,
               "post_writes_per_session_per_second": {"mean": round3(rate.mean), "max": round3(rate.max)},
               "typing_per_session_per_second": round3(typing_rate),
               "answers_intact": intact}),
        lost,
    )
}

// ---- approvals ----------------------------------------------------------------------------

async fn approvals(
    world: &World,
    sessions: &[BenchSession],
    n: usize,
    to_agent_baseline_ms: f64,
) -> (Value, Vec<String>) {
    let mut lost = Vec::new();
    let (mut to_alias, mut to_agent, mut own) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..n {
        let s = &sessions[k % sessions.len()];
        let domain = format!("a{k}-{}.bench.example.org", &s.slug[6..]);
        if let Err(e) = world.say(s, &format!("bench request {domain}")) {
            lost.push(format!("approval {domain}: {e}"));
            continue;
        }
        if lost.len() >= 3 {
            lost.push(format!(
                "approvals stopped after {k} of {n}: too many failed"
            ));
            break;
        }
        let Some(card) = world
            .obs
            .wait(&format!("card:{domain}"), MESSAGE_TIMEOUT)
            .await
        else {
            let thread: Vec<String> = world
                .fake
                .thread(&s.root)
                .into_iter()
                .rev()
                .take(3)
                .map(|p| format!("{} {}", p.message, p.props))
                .collect();
            lost.push(format!(
                "no approval card for {domain}; the thread ends with: {thread:?}"
            ));
            continue;
        };
        let t = now_ns();
        match world
            .fake
            .click(&card.post_id, "approvesession", &world.alice)
            .await
        {
            ClickOutcome::Ok { .. } => {}
            ClickOutcome::Failed { status, body } => {
                lost.push(format!("the click on {domain} failed: {status} {body}"));
                continue;
            }
        }
        let Some(told) = world
            .obs
            .wait(&format!("approved:{domain}"), MESSAGE_TIMEOUT)
            .await
        else {
            lost.push(format!("the agent never heard that {domain} was approved"));
            continue;
        };
        match world.opn.first_applied_at(ALIAS, &domain) {
            Some(at) => to_alias.push(ms(ns(at) - t)),
            None => lost.push(format!("{domain} never reached the alias")),
        }
        let agent = ms(told.recv - t);
        to_agent.push(agent);
        own.push(agent - to_agent_baseline_ms);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a, b, c) = (Stats::of(&to_alias), Stats::of(&to_agent), Stats::of(&own));
    table(
        "4. Approval round trip from the click, ms",
        &["to", "n", "p50", "p90", "p99", "max"],
        &[
            stat_row("alias applied (OPNsense)", &a),
            stat_row("agent told", &b),
            stat_row("bot's own part", &c),
        ],
    );
    println!("   bot's own part = click → agent told, minus the transport baseline's median to the agent");
    (
        json!({"approvals": n, "click_to_alias": a.json(), "click_to_agent": b.json(), "bot_own": c.json()}),
        lost,
    )
}
