//! The agent process: Claude Code started in the session's container over SSH, speaking
//! stream-json on plain pipes (no TTY). See `shared/reference/claude-code.md` for the protocol.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::debug;

use crate::agent::stream_json::{self, AgentEvent};
use crate::config::EnvEntry;
use crate::runtime::shell::{QuoteError, Script};
use crate::runtime::ssh::{RemoteProcess, SshError};
use crate::runtime::vetting::CLAUDE_STATE_TARGET;
use crate::store::{Session, SessionKind, StoreError};

use super::{AgentContainer, Manager, NETWORK_PROMPT};

/// How long a new agent process may take to answer its `initialize` request.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a closing agent may take to exit after its stdin closes.
const AGENT_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Why the agent could not be started or talked to.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The session has no container to run in.
    #[error("the session has no container")]
    NoContainer,
    /// The conversation id could not be stored.
    #[error("cannot store the conversation id: {0}")]
    Store(#[source] StoreError),
    /// A value of the command line cannot be quoted.
    #[error("cannot build the agent's command line: {0}")]
    Script(#[source] QuoteError),
    /// SSH could not start the process.
    #[error("cannot start Claude: {0}")]
    Spawn(#[source] SshError),
    /// The process has no stdin or stdout pipe.
    #[error("the agent has no {0}")]
    Pipe(&'static str),
    /// Writing to the agent failed.
    #[error("cannot talk to Claude: {0}")]
    Write(#[source] std::io::Error),
    /// Reading the agent failed.
    #[error("reading Claude failed: {0}")]
    Read(#[source] std::io::Error),
    /// The agent exited before it was ready; the CLI's last words (stderr), when it said any.
    #[error("Claude exited right after starting{}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    Exited(String),
    /// The agent did not answer `initialize` in time.
    #[error("Claude did not answer within {0:?}")]
    NotReady(Duration),
}

/// Longest stderr line kept, in bytes; longer ones are skipped.
const STDERR_MAX_LINE: usize = 64 * 1024;

/// Why a line of the agent's output could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum LineError {
    /// A line longer than the limit (bytes).
    #[error("a line of Claude's output was longer than {0} bytes (SM_MAX_AGENT_LINE_BYTES)")]
    TooLong(usize),
    /// Reading failed.
    #[error("reading the agent failed: {0}")]
    Read(std::io::Error),
}

/// How many of the agent's last stderr lines are kept, to say why it failed.
const STDERR_TAIL: usize = 20;

/// A running agent: its process, stdin, stdout lines and the task logging its stderr.
pub(super) struct Agent {
    process: RemoteProcess,
    stdin: crate::runtime::ssh::ProcessInput,
    /// Lines of the agent's stdout, each at most `SM_MAX_AGENT_LINE_BYTES`.
    lines: FramedRead<crate::runtime::ssh::ProcessOutput, LinesCodec>,
    /// That limit, for messages.
    max_line: usize,
    stderr: Option<JoinHandle<()>>,
    /// The last lines the agent wrote on stderr.
    stderr_tail: StderrTail,
}

/// The last lines an agent wrote on stderr, shared with the task that reads them.
type StderrTail = std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>;

impl AgentError {
    /// Whether the CLI refused `--resume` because the conversation has no turn yet (nothing
    /// was ever written for it).
    pub fn is_no_conversation(&self) -> bool {
        matches!(self, Self::Exited(why) if why.contains("No conversation found"))
    }
}

impl Agent {
    /// Starts the agent for `session` in `container`, with `--resume conversation` when
    /// `resume`, else `--session-id conversation`, and waits until it answers `initialize`.
    pub(super) async fn start(
        manager: &Manager,
        session: &Session,
        container: Option<&AgentContainer>,
        conversation: &str,
        resume: bool,
    ) -> Result<Self, AgentError> {
        let container = container.ok_or(AgentError::NoContainer)?;
        let script = agent_script(manager, session, container, conversation, resume)
            .map_err(AgentError::Script)?;
        let mut process = manager
            .ssh
            .spawn(&script)
            .await
            .map_err(AgentError::Spawn)?;
        let stdin = process.take_stdin().ok_or(AgentError::Pipe("stdin"))?;
        let stdout = process.take_stdout().ok_or(AgentError::Pipe("stdout"))?;
        let stderr_tail: StderrTail = std::sync::Arc::default();
        let stderr = process.take_stderr().map(|stderr| {
            let id = session.id.clone();
            let tail = std::sync::Arc::clone(&stderr_tail);
            tokio::spawn(async move {
                // Over-long stderr lines are skipped (the codec discards them), never buffered.
                let mut lines =
                    FramedRead::new(stderr, LinesCodec::new_with_max_length(STDERR_MAX_LINE));
                while let Some(line) = lines.next().await {
                    let Ok(line) = line else { continue };
                    debug!(session = %id, stderr = %line, "agent stderr");
                    if let Ok(mut tail) = tail.lock() {
                        if tail.len() == STDERR_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                }
            })
        });
        let mut agent = Agent {
            process,
            stdin,
            lines: FramedRead::new(
                stdout,
                LinesCodec::new_with_max_length(manager.config.max_agent_line_bytes),
            ),
            max_line: manager.config.max_agent_line_bytes,
            stderr,
            stderr_tail,
        };
        if let Err(e) = agent
            .write(&env_preamble(&manager.config.env_of(session)))
            .await
        {
            agent.close().await;
            return Err(AgentError::Write(e));
        }
        match tokio::time::timeout(AGENT_READY_TIMEOUT, agent.initialize()).await {
            Ok(Ok(())) => Ok(agent),
            Ok(Err(AgentError::Exited(_))) => {
                // Its reason is on stderr, read to the end once the process is gone.
                let tail = agent.close().await;
                Err(AgentError::Exited(tail))
            }
            Ok(Err(e)) => {
                agent.close().await;
                Err(e)
            }
            Err(_) => {
                agent.close().await;
                Err(AgentError::NotReady(AGENT_READY_TIMEOUT))
            }
        }
    }

    /// Sends `initialize` and reads until its answer.
    async fn initialize(&mut self) -> Result<(), AgentError> {
        let request_id = format!("init-{}", uuid::Uuid::new_v4().simple());
        self.write(&stream_json::control_request(&request_id, "initialize"))
            .await
            .map_err(AgentError::Write)?;
        loop {
            match self.next_line().await {
                Ok(Some(line)) => match stream_json::decode_line(&line) {
                    Ok(AgentEvent::ControlResponse {
                        request_id: Some(id),
                        ..
                    }) if id == request_id => return Ok(()),
                    // A result before it is ready: the CLI gave up (e.g. nothing to resume).
                    Ok(AgentEvent::Result(_)) => return Err(AgentError::Exited(String::new())),
                    _ => {}
                },
                Ok(None) => return Err(AgentError::Exited(String::new())),
                Err(LineError::TooLong(_)) => {}
                Err(LineError::Read(e)) => return Err(AgentError::Read(e)),
            }
        }
    }

    /// The next line of the agent's stdout: `Ok(None)` at its end, [`LineError::TooLong`] for
    /// a line over `SM_MAX_AGENT_LINE_BYTES` (the rest of that line is skipped, not buffered).
    ///
    /// # Errors
    /// [`LineError`].
    pub(super) async fn next_line(&mut self) -> Result<Option<String>, LineError> {
        match self.lines.next().await {
            None => Ok(None),
            Some(Ok(line)) => Ok(Some(line)),
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                Err(LineError::TooLong(self.max_line))
            }
            Some(Err(LinesCodecError::Io(e))) => Err(LineError::Read(e)),
        }
    }

    /// Writes one stream-json line.
    pub(super) async fn write(&mut self, line: &str) -> std::io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await
    }

    /// Closes stdin (the CLI exits after its turn), waits briefly for the process and for its
    /// stderr to end, and returns the last lines it wrote there (joined, at most 500
    /// characters).
    pub(super) async fn close(mut self) -> String {
        let _ = self.stdin.shutdown().await;
        drop(self.stdin);
        let exited = tokio::time::timeout(AGENT_EXIT_GRACE, self.process.wait())
            .await
            .is_ok();
        if !exited {
            debug!("agent did not exit in time; its channel is closed");
        }
        if let Some(mut stderr) = self.stderr.take() {
            if !exited
                || tokio::time::timeout(Duration::from_secs(1), &mut stderr)
                    .await
                    .is_err()
            {
                stderr.abort();
                let _ = stderr.await;
            }
        }
        let tail = self
            .stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        tail.chars().take(500).collect()
    }
}

/// What the agent's script reads from stdin before the agent starts: one `NAME=<base64>` line
/// per `NAME=value` entry of `SM_CONTAINER_ENV`, then an empty line. The values are secrets as
/// far as the VM is concerned: on a command line they would show in `ps`.
fn env_preamble(entries: &[EnvEntry]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for entry in entries {
        if let EnvEntry::Set(name, value) = entry {
            out.push_str(name);
            out.push('=');
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(value));
            out.push('\n');
        }
    }
    out.push('\n');
    out
}

/// Reads [`env_preamble`] in the agent's script (fixed text): each valid name is exported with
/// its decoded value, so `podman exec -e NAME` passes it on without it ever being a word of a
/// command line. bash reads a pipe byte by byte, so the agent's own input stays in the pipe.
const READ_ENV: &str = r#"while IFS= read -r sm_line && [ -n "$sm_line" ]; do sm_n=${sm_line%%=*}; case "$sm_n" in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac; export "$sm_n=$(printf '%s' "${sm_line#*=}" | base64 -d)"; done"#;

/// The remote script that runs the agent in the container: `<runtime> exec -i -u <user> -w
/// <folder> -e NAME … <container> <SM_CLAUDE_COMMAND> -p --input-format stream-json …`. Every
/// `SM_CONTAINER_ENV` name is passed as a bare `-e NAME`: the value comes from the VM's
/// environment (kept for this script) or from [`env_preamble`].
fn agent_script(
    manager: &Manager,
    session: &Session,
    container: &AgentContainer,
    conversation: &str,
    resume: bool,
) -> Result<Script, QuoteError> {
    let config = &manager.config;
    let env = config.env_of(session);
    let names: Vec<&str> = env
        .iter()
        .map(|e| match e {
            EnvEntry::FromVm(name) | EnvEntry::Set(name, _) => name.as_str(),
        })
        .collect();
    let mut words: Vec<String> = vec![
        "--".into(),
        config.containers.runtime.clone(),
        "exec".into(),
        "-i".into(),
        "-u".into(),
        container.user.clone(),
        "-w".into(),
        container.folder.clone(),
    ];
    for name in &names {
        words.push("-e".into());
        words.push((*name).to_owned());
    }
    if container.private_state {
        words.push("-e".into());
        words.push(format!("CLAUDE_CONFIG_DIR={CLAUDE_STATE_TARGET}"));
    }
    words.push(container.id.clone());
    words.extend(config.claude_command.iter().cloned());
    words.extend(
        [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
        ]
        .map(str::to_owned),
    );
    words.push(if resume { "--resume" } else { "--session-id" }.into());
    words.push(conversation.to_owned());
    words.push("--append-system-prompt".into());
    words.push(if session.kind == SessionKind::Orchestrator {
        format!(
            "{NETWORK_PROMPT}\n\n{}",
            crate::orchestrator::ORCHESTRATOR_PROMPT
        )
    } else {
        NETWORK_PROMPT.to_owned()
    });
    // Permission questions come to the bot on stdout (answered from the thread's cards).
    words.push("--permission-prompt-tool".into());
    words.push("stdio".into());
    words.push("--permission-mode".into());
    words.push(
        crate::permission::mode_of(session, config.permission_mode)
            .as_cli()
            .into(),
    );
    // The profile's model and tool rules (last: the tool options take several values).
    if let Some(profile) = &session.profile {
        words.extend(profile.agent_args());
    }
    // `set -- <runtime> <args>` puts every word, quoted, into "$@"; `exec` replaces the shell
    // so the agent's stdio is the channel's.
    let from_vm: Vec<&str> = env
        .iter()
        .filter_map(|e| match e {
            EnvEntry::FromVm(name) => Some(name.as_str()),
            EnvEntry::Set(..) => None,
        })
        .collect();
    let mut script = Script::keeping(&from_vm);
    script
        .raw(READ_ENV)
        .command("set", &words)?
        .raw("exec \"$@\"");
    Ok(script)
}
