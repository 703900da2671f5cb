-- Initial schema (SQLite). Times are Unix milliseconds (INTEGER), as Mattermost uses.
-- Migrations are append-only and never destructive: no DROP, no TRUNCATE, no DELETE.

-- A chat-driven Claude Code session. Rows are ended (state = 'ended' + end_reason), never deleted.
CREATE TABLE sessions (
    id                TEXT PRIMARY KEY,             -- UUID v4, lowercase
    platform          TEXT NOT NULL,                -- 'mattermost' | 'teams'
    channel_id        TEXT NOT NULL,                -- Mattermost channel id / Teams channel id
    thread_id         TEXT NOT NULL,                -- Mattermost root post id / Teams conversation id
    kind              TEXT NOT NULL,                -- 'standard' | 'orchestrator' | 'worker' | 'reviewer'
    parent_id         TEXT REFERENCES sessions (id),
    state             TEXT NOT NULL,                -- 'starting' | 'running' | 'idle' | 'stopping' | 'ended'
    end_reason        TEXT,                         -- set exactly when state = 'ended'
    end_detail        TEXT,
    started_by        TEXT NOT NULL,                -- chat user id
    agent_session_id  TEXT,                         -- Claude Code conversation id (--session-id / --resume)
    repo_host         TEXT NOT NULL,                -- e.g. 'github.com'
    repo_org          TEXT NOT NULL,
    repo_name         TEXT NOT NULL,
    branch            TEXT,
    worktree          TEXT,                         -- worktree name, NULL for the main clone
    workspace_path    TEXT,                         -- path on the VM the container mounts
    container_id      TEXT,
    message_count     INTEGER NOT NULL DEFAULT 0,
    compaction_count  INTEGER NOT NULL DEFAULT 0,
    input_tokens      INTEGER NOT NULL DEFAULT 0,
    output_tokens     INTEGER NOT NULL DEFAULT 0,
    context_tokens    INTEGER NOT NULL DEFAULT 0,    -- input + cache tokens of the latest call
    cost_usd          REAL NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    last_activity_at  INTEGER NOT NULL,
    ended_at          INTEGER,
    CONSTRAINT sessions_state_check CHECK (state IN ('starting', 'running', 'idle', 'stopping', 'ended')),
    CONSTRAINT sessions_kind_check CHECK (kind IN ('standard', 'orchestrator', 'worker', 'reviewer')),
    CONSTRAINT sessions_end_check CHECK ((state = 'ended') = (end_reason IS NOT NULL))
);
CREATE UNIQUE INDEX sessions_thread_key ON sessions (platform, channel_id, thread_id);
CREATE INDEX sessions_active ON sessions (state) WHERE state <> 'ended';
CREATE INDEX sessions_parent ON sessions (parent_id) WHERE parent_id IS NOT NULL;

-- The chat channel that serves one repository.
CREATE TABLE project_channels (
    platform      TEXT NOT NULL,
    repo_slug     TEXT NOT NULL,                    -- 'org/repo'
    team_id       TEXT NOT NULL,
    channel_id    TEXT NOT NULL,
    channel_name  TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (platform, repo_slug)
);
CREATE UNIQUE INDEX project_channels_channel ON project_channels (platform, channel_id);

-- A request from an agent to reach a domain through the firewall.
CREATE TABLE approval_requests (
    id                TEXT PRIMARY KEY,             -- UUID v4
    session_id        TEXT NOT NULL REFERENCES sessions (id),
    domain            TEXT NOT NULL,                -- normalised (lowercase, IDNA ASCII)
    state             TEXT NOT NULL,                -- 'pending' | 'approved' | 'denied' | 'failed' | 'expired'
    card_post_id      TEXT,                         -- the chat post holding the buttons
    requested_at      INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    decided_at        INTEGER,
    decided_by_id     TEXT,
    decided_by_name   TEXT,
    applied_at        INTEGER,                       -- when the firewall accepted it (approved only)
    apply_attempts    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER,
    last_error        TEXT,
    CONSTRAINT approval_state_check CHECK (state IN ('pending', 'approved', 'denied', 'failed', 'expired'))
);
-- At most one pending request per (session, domain): a repeated marker reuses it.
CREATE UNIQUE INDEX approval_one_pending ON approval_requests (session_id, domain) WHERE state = 'pending';
CREATE INDEX approval_unapplied ON approval_requests (next_attempt_at) WHERE state = 'approved' AND applied_at IS NULL;
CREATE INDEX approval_domain ON approval_requests (domain, state);

-- Append-only record of every request, decision, expiry and firewall result.
CREATE TABLE audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    session_id  TEXT,
    thread_id   TEXT,
    domain      TEXT,
    action      TEXT NOT NULL,                      -- e.g. 'requested', 'approved', 'denied', 'expired', 'firewall_applied'
    user_id     TEXT,
    user_name   TEXT,
    outcome     TEXT NOT NULL,                      -- e.g. 'ok', 'rejected', 'failed'
    detail      TEXT
);
CREATE INDEX audit_log_session ON audit_log (session_id, at);

-- Named locks that must survive a restart (e.g. the main clone of a repository).
CREATE TABLE locks (
    name         TEXT PRIMARY KEY,
    holder       TEXT NOT NULL,                     -- usually a session id
    acquired_at  INTEGER NOT NULL
);

-- Containers the bot started on the VM, so it can reconcile them after a restart.
CREATE TABLE containers (
    container_id      TEXT PRIMARY KEY,             -- full id, never the short form
    vm_host           TEXT NOT NULL,
    workspace_folder  TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    removed_at        INTEGER
);
