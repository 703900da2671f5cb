//! Storage: one API over PostgreSQL and embedded SQLite.
//!
//! The backend is chosen at run time from `SM_DATABASE_URL` through sqlx's `Any` driver, so
//! every query below is written once, in the SQL both databases accept (`$1` placeholders,
//! `RETURNING`, `ON CONFLICT`, partial indexes). Migrations live in `sql/postgres` and
//! `sql/sqlite`, are embedded into the binary with `sqlx::migrate!`, and are append-only.
//!
//! Every claim is a single conditional statement (`UPDATE … WHERE state = 'pending'
//! RETURNING …`), so two racing callers cannot both win, on either backend.

pub mod model;
mod transcript;

use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor, FromRow};

pub use model::*;
pub use transcript::{TranscriptEntry, TranscriptKind};

use crate::config::{DatabaseBackend, DatabaseSettings, DatabaseUrl};

/// Errors from storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `session 1a2b…`.
        what: String,
    },
    /// A uniqueness rule refused the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored value the program cannot read (e.g. an unknown state name).
    #[error("corrupt value in {table}.{column}: {value:?}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Column.
        column: &'static str,
        /// The stored value.
        value: String,
    },
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Result alias for storage calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// The storage handle. Cheap to clone (it wraps a connection pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: DatabaseBackend,
}

static DRIVERS: Once = Once::new();

impl Store {
    /// Opens a pool to the database. For SQLite the file is created if missing (and its
    /// directory must exist); foreign keys and WAL are switched on for every connection.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the database cannot be reached.
    pub async fn connect(settings: &DatabaseSettings) -> StoreResult<Self> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let backend = settings.url.backend();
        let url = connect_url(&settings.url);
        let mut options = AnyPoolOptions::new()
            .max_connections(settings.pool_size)
            .acquire_timeout(Duration::from_secs(5));
        if backend == DatabaseBackend::Sqlite {
            if let Some(path) = settings.url.sqlite_path() {
                create_owner_only(&path);
            } else {
                // Each in-memory connection is its own database: keep exactly one, forever.
                options = options
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            }
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await?;
        Ok(Self { pool, backend })
    }

    /// Which backend this store talks to.
    pub fn backend(&self) -> DatabaseBackend {
        self.backend
    }

    /// Applies the embedded migrations of this backend. Safe to run any number of times and
    /// from several processes at once.
    ///
    /// # Errors
    /// [`StoreError::Migrate`].
    pub async fn migrate(&self) -> StoreResult<()> {
        match self.backend {
            DatabaseBackend::Postgres => sqlx::migrate!("sql/postgres").run(&self.pool).await?,
            DatabaseBackend::Sqlite => sqlx::migrate!("sql/sqlite").run(&self.pool).await?,
        }
        Ok(())
    }

    /// Checks that the database answers (`SELECT 1`).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The key this installation keeps under `name` (table `instance_keys`): the stored one
    /// when there is one, else `candidate`, stored now. Concurrent callers with different
    /// candidates all get the one that was stored first.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn instance_key(&self, name: &str, candidate: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO instance_keys (name, value, created_at) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let value: String = sqlx::query_scalar("SELECT value FROM instance_keys WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ----- sessions -----------------------------------------------------------------------

    /// Creates a session in state `starting`.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the thread already anchors a session or the id is taken.
    pub async fn create_session(&self, new: &NewSession) -> StoreResult<Session> {
        let id = &new.id;
        let now = now_ms();
        let row = sqlx::query_as::<_, SessionRow>(
            "INSERT INTO sessions (id, platform, channel_id, thread_id, kind, parent_id, state,
                 started_by, repo_host, repo_org, repo_name, branch, worktree,
                 created_at, updated_at, last_activity_at, profile)
             VALUES ($1, $2, $3, $4, $5, $6, 'starting', $7, $8, $9, $10, $11, $12, $13, $13, $13, $14)
             ON CONFLICT DO NOTHING
             RETURNING *",
        )
        .bind(id)
        .bind(<&str>::from(new.platform))
        .bind(&new.channel_id)
        .bind(&new.thread_id)
        .bind(<&str>::from(new.kind))
        .bind(new.parent_id.as_deref())
        .bind(&new.started_by)
        .bind(&new.repo_host)
        .bind(&new.repo_org)
        .bind(&new.repo_name)
        .bind(new.branch.as_deref())
        .bind(new.worktree.as_deref())
        .bind(now)
        .bind(
            new.profile
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| StoreError::Corrupt {
                    table: "sessions",
                    column: "profile",
                    value: e.to_string(),
                })?,
        )
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => row.try_into(),
            None => Err(StoreError::Conflict(format!(
                "thread {} in channel {} already has a session",
                new.thread_id, new.channel_id
            ))),
        }
    }

    /// A session by id.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn session(&self, id: &str) -> StoreResult<Option<Session>> {
        sqlx::query_as::<_, SessionRow>("SELECT * FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(Session::try_from)
            .transpose()
    }

    /// The session anchored at a thread, whatever its state.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn session_by_thread(
        &self,
        platform: Platform,
        channel_id: &str,
        thread_id: &str,
    ) -> StoreResult<Option<Session>> {
        sqlx::query_as::<_, SessionRow>(
            "SELECT * FROM sessions WHERE platform = $1 AND channel_id = $2 AND thread_id = $3",
        )
        .bind(<&str>::from(platform))
        .bind(channel_id)
        .bind(thread_id)
        .fetch_optional(&self.pool)
        .await?
        .map(Session::try_from)
        .transpose()
    }

    /// The session anchored at `thread_id` on any platform (thread ids of different
    /// platforms never collide); the newest when a thread somehow has several.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn session_by_thread_any(&self, thread_id: &str) -> StoreResult<Option<Session>> {
        sqlx::query_as::<_, SessionRow>(
            "SELECT * FROM sessions WHERE thread_id = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(thread_id)
        .fetch_optional(&self.pool)
        .await?
        .map(Session::try_from)
        .transpose()
    }

    /// Active sessions (starting, running, idle) whose id starts with `prefix`, oldest first.
    /// The prefix is matched literally (LIKE wildcards in it are escaped).
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn active_sessions_by_prefix(&self, prefix: &str) -> StoreResult<Vec<Session>> {
        let pattern = format!("{}%", escape_like(&prefix.to_ascii_lowercase()));
        self.sessions_where(
            "state IN ('starting', 'running', 'idle') AND id LIKE $1 ESCAPE '\\'",
            Some(&pattern),
        )
        .await
    }

    /// Every active session (starting, running, idle), oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn active_sessions(&self) -> StoreResult<Vec<Session>> {
        self.sessions_where("state IN ('starting', 'running', 'idle')", None)
            .await
    }

    /// Sessions that were not ended: active ones and those caught mid-cleanup. This is what a
    /// restarted bot must recover.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn unended_sessions(&self) -> StoreResult<Vec<Session>> {
        self.sessions_where("state <> 'ended'", None).await
    }

    /// Every session an orchestrator spawned, in any state, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn children(&self, parent_id: &str) -> StoreResult<Vec<Session>> {
        self.sessions_where("parent_id = $1", Some(parent_id)).await
    }

    /// Active sessions in one channel, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn active_sessions_in_channel(
        &self,
        platform: Platform,
        channel_id: &str,
    ) -> StoreResult<Vec<Session>> {
        let rows = sqlx::query_as::<_, SessionRow>(
            "SELECT * FROM sessions WHERE platform = $1 AND channel_id = $2
               AND state IN ('starting', 'running', 'idle') ORDER BY created_at, id",
        )
        .bind(<&str>::from(platform))
        .bind(channel_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Session::try_from).collect()
    }

    async fn sessions_where(
        &self,
        condition: &str,
        arg: Option<&str>,
    ) -> StoreResult<Vec<Session>> {
        let sql = format!("SELECT * FROM sessions WHERE {condition} ORDER BY created_at, id");
        let mut query = sqlx::query_as::<_, SessionRow>(&sql);
        if let Some(arg) = arg {
            query = query.bind(arg);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.into_iter().map(Session::try_from).collect()
    }

    /// Moves an active session to another active state (`starting`, `running` or `idle`),
    /// awake (a hibernating session is woken: [`Session::hibernated_at`] is cleared).
    /// Returns `false` if the session is stopping, ended or missing, and leaves it alone.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when `to` is not an active state; [`StoreError::Database`].
    pub async fn set_session_state(&self, id: &str, to: SessionState) -> StoreResult<bool> {
        if !to.is_active() {
            return Err(StoreError::Conflict(format!(
                "set_session_state cannot move to {to}; use claim_stop or end_session"
            )));
        }
        let done = sqlx::query(
            "UPDATE sessions SET state = $2, hibernated_at = NULL, updated_at = $3
             WHERE id = $1 AND state IN ('starting', 'running', 'idle')",
        )
        .bind(id)
        .bind(<&str>::from(to))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that an active session hibernates since `at` (Unix ms): `idle`, with its agent
    /// closed and its container stopped until its next message. Returns `false` if the session
    /// is stopping, ended or missing, and leaves it alone.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn set_hibernating(&self, id: &str, at: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE sessions SET state = 'idle', hibernated_at = $2, updated_at = $2
             WHERE id = $1 AND state IN ('starting', 'running', 'idle')",
        )
        .bind(id)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the container and workspace of a session, and how to run the agent in it.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Database`].
    pub async fn set_session_container(
        &self,
        id: &str,
        container_id: Option<&str>,
        workspace_path: Option<&str>,
        details: Option<&ContainerDetails>,
    ) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE sessions SET container_id = $2, workspace_path = $3, session_dir = $4,
                 container_user = $5, container_folder = $6, updated_at = $7
             WHERE id = $1",
        )
        .bind(id)
        .bind(container_id)
        .bind(workspace_path)
        .bind(details.map(|d| d.session_dir.as_str()))
        .bind(details.map(|d| d.user.as_str()))
        .bind(details.map(|d| d.folder.as_str()))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        expect_one(done.rows_affected(), || format!("session {id}"))
    }

    /// Records (or clears, on `clear`) the agent's conversation id.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Database`].
    pub async fn set_agent_session_id(
        &self,
        id: &str,
        agent_session_id: Option<&str>,
    ) -> StoreResult<()> {
        let done =
            sqlx::query("UPDATE sessions SET agent_session_id = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(agent_session_id)
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
        expect_one(done.rows_affected(), || format!("session {id}"))
    }

    /// This deployment's id (made at the first call, then the same for every instance on
    /// this database): what its containers are labelled with.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn deployment_id(&self) -> StoreResult<String> {
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        sqlx::query(
            "INSERT INTO deployment (id, created_at)
             SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM deployment)",
        )
        .bind(&fresh)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        // Two instances racing at the very first start may both insert: all take the first.
        Ok(
            sqlx::query_scalar("SELECT id FROM deployment ORDER BY created_at, id LIMIT 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Raises a session's cap by `raise` dollars, but only while the cap (the configured
    /// `budget` plus what was added before) is `cap_cents`: the card that showed that cap
    /// raises it once. Returns whether it did.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn add_budget(
        &self,
        id: &str,
        raise: f64,
        budget: f64,
        cap_cents: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE sessions SET budget_added_usd = budget_added_usd + $2, updated_at = $5
             WHERE id = $1 AND CAST(ROUND(($3 + budget_added_usd) * 100) AS BIGINT) = $4",
        )
        .bind(id)
        .bind(raise)
        .bind(budget)
        .bind(cap_cents)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the permission mode `!mode` chose for a session (`None`: back to the default).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn set_session_permission_mode(
        &self,
        id: &str,
        mode: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE sessions SET permission_mode = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(mode)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Adds usage to a session's counters and marks activity at `now` (Unix ms).
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Database`].
    pub async fn add_usage(&self, id: &str, usage: &UsageDelta, now: i64) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE sessions SET
                 message_count = message_count + $2,
                 compaction_count = compaction_count + $3,
                 input_tokens = input_tokens + $4,
                 output_tokens = output_tokens + $5,
                 context_tokens = COALESCE($6, context_tokens),
                 cost_usd = cost_usd + $7,
                 last_activity_at = $8,
                 updated_at = $8
             WHERE id = $1",
        )
        .bind(id)
        .bind(usage.messages)
        .bind(usage.compactions)
        .bind(usage.input_tokens)
        .bind(usage.output_tokens)
        .bind(usage.context_tokens)
        .bind(usage.cost_usd)
        .bind(now)
        .execute(&self.pool)
        .await?;
        expect_one(done.rows_affected(), || format!("session {id}"))
    }

    /// Claims a session's cleanup: moves it to `stopping` only if it is neither stopping nor
    /// ended. Exactly one of any number of concurrent callers gets `Some`.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn claim_stop(&self, id: &str) -> StoreResult<Option<Session>> {
        sqlx::query_as::<_, SessionRow>(
            "UPDATE sessions SET state = 'stopping', updated_at = $2
             WHERE id = $1 AND state IN ('starting', 'running', 'idle')
             RETURNING *",
        )
        .bind(id)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?
        .map(Session::try_from)
        .transpose()
    }

    /// Ends a session (from any state but `ended`). Returns `false` if it was already ended.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is no such session; [`StoreError::Database`].
    pub async fn end_session(
        &self,
        id: &str,
        reason: EndReason,
        detail: Option<&str>,
    ) -> StoreResult<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE sessions SET state = 'ended', end_reason = $2, end_detail = $3,
                 ended_at = $4, updated_at = $4, hibernated_at = NULL
             WHERE id = $1 AND state <> 'ended'",
        )
        .bind(id)
        .bind(<&str>::from(reason))
        .bind(detail)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        match self.session(id).await? {
            Some(_) => Ok(false),
            None => Err(StoreError::NotFound {
                what: format!("session {id}"),
            }),
        }
    }

    // ----- participants -------------------------------------------------------------------

    /// Adds `user_id` to the users a session's owner invited. Returns `false` when they were
    /// already in.
    ///
    /// # Errors
    /// [`StoreError::Database`] (including an unknown session).
    pub async fn add_participant(
        &self,
        session_id: &str,
        user_id: &str,
        added_by: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO session_participants (session_id, user_id, added_by, added_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(added_by)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes back an invitation. Returns whether there was one.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn remove_participant(&self, session_id: &str, user_id: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("DELETE FROM session_participants WHERE session_id = $1 AND user_id = $2")
                .bind(session_id)
                .bind(user_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The user ids a session's owner invited, in the order they were added.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn participants(&self, session_id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM session_participants WHERE session_id = $1
             ORDER BY added_at, user_id",
        )
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Gives `child` the participants of `parent` (an orchestrator's children inherit them).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn copy_participants(&self, parent: &str, child: &str, now: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO session_participants (session_id, user_id, added_by, added_at)
             SELECT $2, user_id, added_by, $3 FROM session_participants WHERE session_id = $1
             ON CONFLICT DO NOTHING",
        )
        .bind(parent)
        .bind(child)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Active sessions `user_id` owns or was invited to, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn active_sessions_of(&self, user_id: &str) -> StoreResult<Vec<Session>> {
        self.sessions_where(
            "state IN ('starting', 'running', 'idle') AND (started_by = $1
               OR id IN (SELECT session_id FROM session_participants WHERE user_id = $1))",
            Some(user_id),
        )
        .await
    }

    // ----- project channels ---------------------------------------------------------------

    /// Records the channel serving a repository, replacing an older record for it.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the channel already serves another repository.
    pub async fn upsert_project_channel(
        &self,
        channel: &ProjectChannel,
    ) -> StoreResult<ProjectChannel> {
        let row = sqlx::query_as::<_, ProjectChannelRow>(
            "INSERT INTO project_channels (platform, repo_slug, team_id, channel_id, channel_name, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (platform, repo_slug) DO UPDATE SET
                 team_id = excluded.team_id, channel_id = excluded.channel_id,
                 channel_name = excluded.channel_name
             RETURNING *",
        )
        .bind(<&str>::from(channel.platform))
        .bind(&channel.repo_slug)
        .bind(&channel.team_id)
        .bind(&channel.channel_id)
        .bind(&channel.channel_name)
        .bind(channel.created_at)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| unique_to_conflict(e, || format!("channel {} already serves another repository", channel.channel_id)))?;
        row.try_into()
    }

    /// The channel serving `org/repo`.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn project_channel(
        &self,
        platform: Platform,
        repo_slug: &str,
    ) -> StoreResult<Option<ProjectChannel>> {
        sqlx::query_as::<_, ProjectChannelRow>(
            "SELECT * FROM project_channels WHERE platform = $1 AND repo_slug = $2",
        )
        .bind(<&str>::from(platform))
        .bind(repo_slug)
        .fetch_optional(&self.pool)
        .await?
        .map(ProjectChannel::try_from)
        .transpose()
    }

    /// The project a channel serves, if it is a project channel.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn project_channel_by_id(
        &self,
        platform: Platform,
        channel_id: &str,
    ) -> StoreResult<Option<ProjectChannel>> {
        sqlx::query_as::<_, ProjectChannelRow>(
            "SELECT * FROM project_channels WHERE platform = $1 AND channel_id = $2",
        )
        .bind(<&str>::from(platform))
        .bind(channel_id)
        .fetch_optional(&self.pool)
        .await?
        .map(ProjectChannel::try_from)
        .transpose()
    }

    /// Every project channel of a platform.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn project_channels(&self, platform: Platform) -> StoreResult<Vec<ProjectChannel>> {
        let rows = sqlx::query_as::<_, ProjectChannelRow>(
            "SELECT * FROM project_channels WHERE platform = $1 ORDER BY repo_slug",
        )
        .bind(<&str>::from(platform))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ProjectChannel::try_from).collect()
    }

    // ----- approval requests --------------------------------------------------------------

    /// Opens a request for `domain` by `session_id`, expiring at `expires_at` (Unix ms).
    /// If that session already has a pending request for the domain, returns it instead,
    /// with `false`.
    ///
    /// # Errors
    /// [`StoreError::Database`] (including an unknown session) or [`StoreError::Corrupt`].
    pub async fn open_approval(
        &self,
        session_id: &str,
        domain: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<(ApprovalRequest, bool)> {
        let id = uuid::Uuid::new_v4().to_string();
        let inserted = sqlx::query_as::<_, ApprovalRow>(
            "INSERT INTO approval_requests (id, session_id, domain, state, requested_at, expires_at)
             VALUES ($1, $2, $3, 'pending', $4, $5)
             ON CONFLICT DO NOTHING
             RETURNING *",
        )
        .bind(&id)
        .bind(session_id)
        .bind(domain)
        .bind(now)
        .bind(expires_at)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return Ok((row.try_into()?, true));
        }
        match self.pending_approval(session_id, domain).await? {
            Some(existing) => Ok((existing, false)),
            // The pending one was decided between the two statements: try once more.
            None => Box::pin(self.open_approval(session_id, domain, now, expires_at)).await,
        }
    }

    /// An approval request by id.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn approval(&self, id: &str) -> StoreResult<Option<ApprovalRequest>> {
        sqlx::query_as::<_, ApprovalRow>("SELECT * FROM approval_requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(ApprovalRequest::try_from)
            .transpose()
    }

    /// Records the post holding the request's buttons.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Database`].
    pub async fn set_approval_card(&self, id: &str, post_id: &str) -> StoreResult<()> {
        let done = sqlx::query("UPDATE approval_requests SET card_post_id = $2 WHERE id = $1")
            .bind(id)
            .bind(post_id)
            .execute(&self.pool)
            .await?;
        expect_one(done.rows_affected(), || format!("approval request {id}"))
    }

    /// Decides a pending, unexpired request; an approval grants the domain for `scope` (ignored
    /// for a denial). The first decision wins; any later one (a double
    /// click, a replay, approve racing deny) gets [`DecideOutcome::AlreadyDecided`] and
    /// changes nothing. An approval is due for the firewall at once (`next_attempt_at = now`).
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn decide_approval(
        &self,
        id: &str,
        decision: Decision,
        scope: GrantScope,
        user_id: &str,
        user_name: &str,
        now: i64,
    ) -> StoreResult<DecideOutcome> {
        let approve = decision == Decision::Approve;
        let next_attempt = approve.then_some(now);
        let scope = approve.then(|| <&str>::from(scope));
        let row = sqlx::query_as::<_, ApprovalRow>(
            "UPDATE approval_requests SET state = $2, decided_at = $3, decided_by_id = $4,
                 decided_by_name = $5, next_attempt_at = $6, grant_scope = $7
             WHERE id = $1 AND state = 'pending' AND expires_at > $3
             RETURNING *",
        )
        .bind(id)
        .bind(<&str>::from(decision.state()))
        .bind(now)
        .bind(user_id)
        .bind(user_name)
        .bind(next_attempt)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return Ok(DecideOutcome::Decided(row.try_into()?));
        }
        match self.approval(id).await? {
            Some(current) => Ok(DecideOutcome::AlreadyDecided(current)),
            None => Err(StoreError::NotFound {
                what: format!("approval request {id}"),
            }),
        }
    }

    /// Marks every pending request whose `expires_at` is at or before `now` as expired and
    /// returns them (each exactly once, even with concurrent callers).
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn expire_approvals(&self, now: i64) -> StoreResult<Vec<ApprovalRequest>> {
        let rows = sqlx::query_as::<_, ApprovalRow>(
            "UPDATE approval_requests SET state = 'expired', decided_at = $1
             WHERE state = 'pending' AND expires_at <= $1
             RETURNING *",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ApprovalRequest::try_from).collect()
    }

    /// Approved requests not yet applied to the firewall whose next attempt is due.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn approvals_due_for_firewall(&self, now: i64) -> StoreResult<Vec<ApprovalRequest>> {
        let rows = sqlx::query_as::<_, ApprovalRow>(
            "SELECT * FROM approval_requests
             WHERE state = 'approved' AND applied_at IS NULL AND next_attempt_at <= $1
             ORDER BY next_attempt_at, id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ApprovalRequest::try_from).collect()
    }

    /// Records that the firewall accepted an approved request. Returns `false` if it was
    /// already marked applied (or is not approved).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn mark_approval_applied(&self, id: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE approval_requests SET applied_at = $2, next_attempt_at = NULL,
                 apply_attempts = apply_attempts + 1, last_error = NULL
             WHERE id = $1 AND state = 'approved' AND applied_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a failed firewall attempt; it is retried at `next_attempt_at` (Unix ms).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn record_approval_attempt_failed(
        &self,
        id: &str,
        error: &str,
        next_attempt_at: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE approval_requests SET apply_attempts = apply_attempts + 1, last_error = $2,
                 next_attempt_at = $3
             WHERE id = $1 AND state = 'approved' AND applied_at IS NULL",
        )
        .bind(id)
        .bind(error)
        .bind(next_attempt_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives up on an approved request the firewall refused for good (state `failed`).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn fail_approval(&self, id: &str, error: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE approval_requests SET state = 'failed', last_error = $2, next_attempt_at = NULL
             WHERE id = $1 AND state = 'approved' AND applied_at IS NULL",
        )
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The number of pending requests of a session (the cap `SM_MAX_PENDING_APPROVALS`).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn pending_approvals(&self, session_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM approval_requests WHERE session_id = $1 AND state = 'pending'",
        )
        .bind(session_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// The pending request of a session for a domain, if any.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn pending_approval(
        &self,
        session_id: &str,
        domain: &str,
    ) -> StoreResult<Option<ApprovalRequest>> {
        sqlx::query_as::<_, ApprovalRow>(
            "SELECT * FROM approval_requests WHERE session_id = $1 AND domain = $2 AND state = 'pending'",
        )
        .bind(session_id)
        .bind(domain)
        .fetch_optional(&self.pool)
        .await?
        .map(ApprovalRequest::try_from)
        .transpose()
    }

    /// Opens a request the bot decides itself (state `approved`, due for the firewall at
    /// once): the domain of the live grant `source` must be put back in the alias (drift) and
    /// granted to `session_id` too. The decider is the source grant's. If the session already
    /// has such a request waiting for the firewall, returns that one instead.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn open_grant_repair(
        &self,
        session_id: &str,
        source: &Grant,
        now: i64,
    ) -> StoreResult<ApprovalRequest> {
        let waiting = sqlx::query_as::<_, ApprovalRow>(
            "SELECT * FROM approval_requests
             WHERE session_id = $1 AND domain = $2 AND state = 'approved' AND applied_at IS NULL
             ORDER BY requested_at LIMIT 1",
        )
        .bind(session_id)
        .bind(&source.domain)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = waiting {
            return row.try_into();
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query_as::<_, ApprovalRow>(
            "INSERT INTO approval_requests (id, session_id, domain, state, requested_at, expires_at,
                 decided_at, decided_by_id, decided_by_name, next_attempt_at, grant_scope, source_grant_id)
             VALUES ($1, $2, $3, 'approved', $4, $4, $4, $5, $6, $4, $7, $8)
             RETURNING *",
        )
        .bind(&id)
        .bind(session_id)
        .bind(&source.domain)
        .bind(now)
        .bind(&source.granted_by_id)
        .bind(&source.granted_by_name)
        .bind(<&str>::from(source.scope))
        .bind(&source.id)
        .fetch_one(&self.pool)
        .await?
        .try_into()
    }

    /// Closes the requests of ended sessions that are still pending, or approved but not yet
    /// applied to the firewall (state `closed`), and returns them, each exactly once.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn close_approvals_of_ended_sessions(
        &self,
        now: i64,
    ) -> StoreResult<Vec<ApprovalRequest>> {
        let rows = sqlx::query_as::<_, ApprovalRow>(
            "UPDATE approval_requests SET state = 'closed', decided_at = COALESCE(decided_at, $1),
                 next_attempt_at = NULL
             WHERE (state = 'pending' OR (state = 'approved' AND applied_at IS NULL))
               AND session_id IN (SELECT id FROM sessions WHERE state = 'ended')
             RETURNING *",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ApprovalRequest::try_from).collect()
    }

    // ----- egress grants ------------------------------------------------------------------

    /// Records a grant. A second grant for the same request is not recorded: the first is
    /// returned.
    ///
    /// # Errors
    /// [`StoreError::Database`] (an unknown session) or [`StoreError::Corrupt`].
    pub async fn insert_grant(&self, grant: &NewGrant) -> StoreResult<Grant> {
        let id = uuid::Uuid::new_v4().to_string();
        let inserted = sqlx::query_as::<_, GrantRow>(
            "INSERT INTO egress_grants (id, domain, session_id, scope, request_id, source_grant_id,
                 granted_by_id, granted_by_name, granted_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT DO NOTHING
             RETURNING *",
        )
        .bind(&id)
        .bind(&grant.domain)
        .bind(&grant.session_id)
        .bind(<&str>::from(grant.scope))
        .bind(&grant.request_id)
        .bind(&grant.source_grant_id)
        .bind(&grant.granted_by_id)
        .bind(&grant.granted_by_name)
        .bind(grant.granted_at)
        .bind(grant.expires_at)
        .fetch_optional(&self.pool)
        .await?;
        match inserted {
            Some(row) => row.try_into(),
            None => {
                sqlx::query_as::<_, GrantRow>("SELECT * FROM egress_grants WHERE request_id = $1")
                    .bind(&grant.request_id)
                    .fetch_one(&self.pool)
                    .await?
                    .try_into()
            }
        }
    }

    /// A grant by id.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        sqlx::query_as::<_, GrantRow>("SELECT * FROM egress_grants WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(Grant::try_from)
            .transpose()
    }

    /// A live grant for `domain` at `now` held by a session that has not ended: `session_id`'s
    /// own first, then the one that lasts longest.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn live_grant_for_domain(
        &self,
        domain: &str,
        session_id: &str,
        now: i64,
    ) -> StoreResult<Option<Grant>> {
        sqlx::query_as::<_, GrantRow>(&format!(
            "SELECT g.* FROM egress_grants g JOIN sessions s ON s.id = g.session_id
             WHERE {GRANT_LIVE} AND g.domain = $2 AND s.state <> 'ended'
             ORDER BY CASE WHEN g.session_id = $3 THEN 0 ELSE 1 END,
                      CASE WHEN g.expires_at IS NULL THEN 0 ELSE 1 END,
                      g.expires_at DESC, g.granted_at, g.id
             LIMIT 1"
        ))
        .bind(now)
        .bind(domain)
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?
        .map(Grant::try_from)
        .transpose()
    }

    /// The live grants at `now`, of one session or (with `None`) of all, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn live_grants(&self, session_id: Option<&str>, now: i64) -> StoreResult<Vec<Grant>> {
        let rows = sqlx::query_as::<_, GrantRow>(&format!(
            "SELECT g.* FROM egress_grants g
             WHERE {GRANT_LIVE} AND ($2 IS NULL OR g.session_id = $2)
             ORDER BY g.granted_at, g.id"
        ))
        .bind(now)
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        grants(rows)
    }

    /// Ends the grants that should no longer grant anything at `now` and returns them, each
    /// exactly once: those past their expiry (`expired`) and those of ended sessions
    /// (`session_ended`).
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn end_due_grants(&self, now: i64) -> StoreResult<Vec<Grant>> {
        let mut ended = grants(
            sqlx::query_as::<_, GrantRow>(
                "UPDATE egress_grants SET ended_at = $1, end_reason = 'expired'
                 WHERE ended_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $1
                 RETURNING *",
            )
            .bind(now)
            .fetch_all(&self.pool)
            .await?,
        )?;
        ended.extend(grants(
            sqlx::query_as::<_, GrantRow>(
                "UPDATE egress_grants SET ended_at = $1, end_reason = 'session_ended'
                 WHERE ended_at IS NULL
                   AND session_id IN (SELECT id FROM sessions WHERE state = 'ended')
                 RETURNING *",
            )
            .bind(now)
            .fetch_all(&self.pool)
            .await?,
        )?);
        Ok(ended)
    }

    /// Revokes `session_id`'s live grants for `domain` at `now` (`revoked`) and returns them.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    pub async fn revoke_grants(
        &self,
        session_id: &str,
        domain: &str,
        now: i64,
    ) -> StoreResult<Vec<Grant>> {
        let rows = sqlx::query_as::<_, GrantRow>(
            "UPDATE egress_grants SET ended_at = $1, end_reason = 'revoked'
             WHERE ended_at IS NULL AND (expires_at IS NULL OR expires_at > $1)
               AND session_id = $2 AND domain = $3
             RETURNING *",
        )
        .bind(now)
        .bind(session_id)
        .bind(domain)
        .fetch_all(&self.pool)
        .await?;
        grants(rows)
    }

    // ----- domains the bot added to the firewall alias -------------------------------------

    /// Records that the bot itself added `domain` to the alias (so it may remove it later).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn record_firewall_domain(&self, domain: &str, now: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO firewall_domains (domain, added_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(domain)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The domains the bot added that nothing covers at `now` (no live grant, no approval
    /// waiting for the firewall) and whose next removal attempt is due; with `only`, just
    /// that domain if it qualifies (the check made again right before removing it).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn firewall_domains_to_remove(
        &self,
        now: i64,
        only: Option<&str>,
    ) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar::<_, String>(&format!(
            "SELECT f.domain FROM firewall_domains f
             WHERE f.next_attempt_at <= $1 AND ($2 IS NULL OR f.domain = $2)
               AND NOT EXISTS (SELECT 1 FROM egress_grants g WHERE g.domain = f.domain AND {GRANT_LIVE})
               AND NOT EXISTS (SELECT 1 FROM approval_requests a
                               WHERE a.domain = f.domain AND a.state = 'approved' AND a.applied_at IS NULL)
             ORDER BY f.domain"
        ))
        .bind(now)
        .bind(only)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forgets a domain the bot removed from the alias.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn forget_firewall_domain(&self, domain: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM firewall_domains WHERE domain = $1")
            .bind(domain)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Failed removal attempts of a domain so far (0 when unknown).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn firewall_removal_attempts(&self, domain: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT remove_attempts FROM firewall_domains WHERE domain = $1",
        )
        .bind(domain)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or(0))
    }

    /// Records a failed removal; it is tried again at `next_attempt_at` (Unix ms).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn record_firewall_removal_failed(
        &self,
        domain: &str,
        error: &str,
        next_attempt_at: i64,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar::<_, i64>(
            "UPDATE firewall_domains SET remove_attempts = remove_attempts + 1, last_error = $2,
                 next_attempt_at = $3
             WHERE domain = $1
             RETURNING remove_attempts",
        )
        .bind(domain)
        .bind(error)
        .bind(next_attempt_at)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or(0))
    }

    // ----- audit log ----------------------------------------------------------------------

    /// Appends an audit record and returns its sequence number.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit_log (at, session_id, thread_id, domain, action, user_id, user_name, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING id",
        )
        .bind(entry.at)
        .bind(entry.session_id.as_deref())
        .bind(entry.thread_id.as_deref())
        .bind(entry.domain.as_deref())
        .bind(&entry.action)
        .bind(entry.user_id.as_deref())
        .bind(entry.user_name.as_deref())
        .bind(&entry.outcome)
        .bind(entry.detail.as_deref())
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// The newest `limit` audit records (of one session, if given), oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn audit_log(
        &self,
        session_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<AuditRecord>> {
        let mut rows = sqlx::query_as::<_, AuditRow>(
            "SELECT * FROM audit_log WHERE ($1 IS NULL OR session_id = $1)
             ORDER BY id DESC LIMIT $2",
        )
        .bind(session_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.reverse();
        Ok(rows.into_iter().map(AuditRecord::from).collect())
    }

    // ----- locks --------------------------------------------------------------------------

    /// Takes the named lock for `holder`, or reports who holds it. Taking a lock one already
    /// holds succeeds. Locks survive restarts until [`Store::unlock`].
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn try_lock(&self, name: &str, holder: &str) -> StoreResult<LockOutcome> {
        sqlx::query(
            "INSERT INTO locks (name, holder, acquired_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(holder)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        match self.lock_holder(name).await? {
            Some(current) if current == holder => Ok(LockOutcome::Acquired),
            Some(current) => Ok(LockOutcome::Held { holder: current }),
            // Released between the two statements: try again.
            None => Box::pin(self.try_lock(name, holder)).await,
        }
    }

    /// Takes (or renews) the named lease for `holder` until `now + ttl_ms` (Unix ms), or
    /// reports who holds it. A lease whose holder is gone is taken over once it has expired; a
    /// lock taken with [`Store::try_lock`] never expires.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        ttl_ms: i64,
    ) -> StoreResult<LockOutcome> {
        let taken: Option<String> = sqlx::query_scalar(
            "INSERT INTO locks (name, holder, acquired_at, expires_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                 acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
             WHERE locks.holder = excluded.holder
                OR (locks.expires_at IS NOT NULL AND locks.expires_at <= excluded.acquired_at)
             RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .fetch_optional(&self.pool)
        .await?;
        if taken.is_some() {
            return Ok(LockOutcome::Acquired);
        }
        match self.lock_holder(name).await? {
            Some(current) if current != holder => Ok(LockOutcome::Held { holder: current }),
            // Released between the two statements: try again.
            _ => Box::pin(self.try_lease(name, holder, now, ttl_ms)).await,
        }
    }

    /// Releases the named lock if `holder` holds it. Returns whether it did.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn unlock(&self, name: &str, holder: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM locks WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Who holds the named lock.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn lock_holder(&self, name: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT holder FROM locks WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    // ----- inbound posts ------------------------------------------------------------------

    /// Takes an inbound chat post for handling, handled at once (nothing to hand out again
    /// after a restart: card submits; messages use [`Store::record_inbound`]). Returns `true`
    /// exactly once per `(platform, post_id)`, however many times and from however many places
    /// (live event, replay, catch-up) it arrives.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn claim_inbound_post(
        &self,
        platform: Platform,
        post_id: &str,
        channel_id: &str,
        create_at: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO inbound_posts (platform, post_id, channel_id, create_at, received_at, handled_at)
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT DO NOTHING",
        )
        .bind(<&str>::from(platform))
        .bind(post_id)
        .bind(channel_id)
        .bind(create_at)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records an inbound message for handling, with `payload` (the message as the
    /// dispatcher takes it, JSON), unhandled until [`Store::mark_inbound_handled`]. Returns
    /// `true` exactly once per `(platform, post_id)`, like [`Store::claim_inbound_post`]; a
    /// message recorded but not handled when the bot stops is handed out again by
    /// [`Store::unhandled_inbound`].
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn record_inbound(
        &self,
        platform: Platform,
        post_id: &str,
        channel_id: &str,
        create_at: i64,
        payload: &str,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO inbound_posts (platform, post_id, channel_id, create_at, received_at, payload)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(<&str>::from(platform))
        .bind(post_id)
        .bind(channel_id)
        .bind(create_at)
        .bind(now_ms())
        .bind(payload)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a recorded message handled (taken by its session, or otherwise dealt with), and
    /// forgets its payload. Returns whether it was waiting.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn mark_inbound_handled(
        &self,
        platform: Platform,
        post_id: &str,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE inbound_posts SET handled_at = $3, payload = NULL
             WHERE platform = $1 AND post_id = $2 AND handled_at IS NULL",
        )
        .bind(<&str>::from(platform))
        .bind(post_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The payloads of messages recorded on `platform` and not handled yet, oldest first (at
    /// most `limit`).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn unhandled_inbound(
        &self,
        platform: Platform,
        limit: i64,
    ) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT payload FROM inbound_posts
             WHERE platform = $1 AND handled_at IS NULL AND payload IS NOT NULL
             ORDER BY create_at, received_at LIMIT $2",
        )
        .bind(<&str>::from(platform))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The creation time (Unix ms) of the newest post taken in a channel, where a catch-up
    /// resumes.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn inbound_cursor(
        &self,
        platform: Platform,
        channel_id: &str,
    ) -> StoreResult<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MAX(create_at) FROM inbound_posts WHERE platform = $1 AND channel_id = $2",
        )
        .bind(<&str>::from(platform))
        .bind(channel_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Forgets posts received before `before` (Unix ms), keeping the newest of each channel
    /// so its catch-up cursor stays. Returns how many were forgotten.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn prune_inbound_posts(&self, before: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM inbound_posts AS p
             WHERE p.received_at < $1
               AND p.create_at < (SELECT MAX(q.create_at) FROM inbound_posts AS q
                                  WHERE q.platform = p.platform AND q.channel_id = p.channel_id)",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    // ----- Teams conversation references -------------------------------------------------

    /// Records (or refreshes) a Teams conversation reference.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn upsert_teams_conversation(&self, c: &TeamsConversation) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO teams_conversations (conversation_id, conversation_type, service_url,
                 tenant_id, team_id, name, bot_id, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (conversation_id) DO UPDATE SET
                 conversation_type = excluded.conversation_type,
                 service_url = excluded.service_url,
                 tenant_id = CASE WHEN excluded.tenant_id = '' THEN teams_conversations.tenant_id
                                  ELSE excluded.tenant_id END,
                 team_id = CASE WHEN excluded.team_id = '' THEN teams_conversations.team_id
                                ELSE excluded.team_id END,
                 name = CASE WHEN excluded.name = '' THEN teams_conversations.name
                             ELSE excluded.name END,
                 bot_id = excluded.bot_id,
                 updated_at = excluded.updated_at",
        )
        .bind(&c.conversation_id)
        .bind(&c.conversation_type)
        .bind(&c.service_url)
        .bind(&c.tenant_id)
        .bind(&c.team_id)
        .bind(&c.name)
        .bind(&c.bot_id)
        .bind(c.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A Teams conversation reference by conversation id (a channel id or a chat id).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn teams_conversation(
        &self,
        conversation_id: &str,
    ) -> StoreResult<Option<TeamsConversation>> {
        Ok(sqlx::query_as::<_, TeamsConversationRow>(
            "SELECT * FROM teams_conversations WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .fetch_optional(&self.pool)
        .await?
        .map(TeamsConversation::from))
    }

    /// Records (or refreshes) a Teams user. A `None` `last_conversation_id` and an empty name
    /// keep the stored values.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn upsert_teams_user(&self, u: &TeamsUser) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO teams_users (user_id, account_id, name, last_conversation_id, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id) DO UPDATE SET
                 account_id = excluded.account_id,
                 name = CASE WHEN excluded.name = '' THEN teams_users.name ELSE excluded.name END,
                 last_conversation_id = COALESCE(excluded.last_conversation_id,
                                                 teams_users.last_conversation_id),
                 updated_at = excluded.updated_at",
        )
        .bind(&u.user_id)
        .bind(&u.account_id)
        .bind(&u.name)
        .bind(u.last_conversation_id.as_deref())
        .bind(u.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A Teams user by id (AAD object id, or `29:…` account id).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn teams_user(&self, user_id: &str) -> StoreResult<Option<TeamsUser>> {
        Ok(
            sqlx::query_as::<_, TeamsUserRow>("SELECT * FROM teams_users WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?
                .map(TeamsUser::from),
        )
    }

    // ----- orchestrator spawns ---------------------------------------------------------

    /// Claims a spawn for `parent_id`: `true` when no equal request (same key) was claimed
    /// within `window_ms` before `now`, atomically, so a repeated marker spawns one child.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn claim_spawn(
        &self,
        parent_id: &str,
        spawn_key: &str,
        now: i64,
        window_ms: i64,
    ) -> StoreResult<bool> {
        let claimed: Option<String> = sqlx::query_scalar(
            "INSERT INTO spawn_requests (parent_id, spawn_key, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (parent_id, spawn_key) DO UPDATE SET created_at = excluded.created_at, child_id = NULL
             WHERE spawn_requests.created_at < $4
             RETURNING parent_id",
        )
        .bind(parent_id)
        .bind(spawn_key)
        .bind(now)
        .bind(now - window_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(claimed.is_some())
    }

    /// Records the child a claimed spawn created.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn set_spawn_child(
        &self,
        parent_id: &str,
        spawn_key: &str,
        child_id: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE spawn_requests SET child_id = $3 WHERE parent_id = $1 AND spawn_key = $2",
        )
        .bind(parent_id)
        .bind(spawn_key)
        .bind(child_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ----- containers ---------------------------------------------------------------------

    /// Records a container the bot started (again, if it was marked removed).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn record_container(
        &self,
        container_id: &str,
        vm_host: &str,
        workspace_folder: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO containers (container_id, vm_host, workspace_folder, created_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (container_id) DO UPDATE SET
                 vm_host = excluded.vm_host, workspace_folder = excluded.workspace_folder,
                 removed_at = NULL",
        )
        .bind(container_id)
        .bind(vm_host)
        .bind(workspace_folder)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a container removed.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn mark_container_removed(&self, container_id: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE containers SET removed_at = $2 WHERE container_id = $1 AND removed_at IS NULL",
        )
        .bind(container_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Containers not marked removed.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn live_containers(&self) -> StoreResult<Vec<Container>> {
        let rows = sqlx::query_as::<_, ContainerRow>(
            "SELECT * FROM containers WHERE removed_at IS NULL ORDER BY created_at, container_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Container::from).collect())
    }

    /// How many sessions that are not ended use a container (other than `except_session`).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn container_users(
        &self,
        container_id: &str,
        except_session: Option<&str>,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM sessions
             WHERE container_id = $1 AND state <> 'ended' AND ($2 IS NULL OR id <> $2)",
        )
        .bind(container_id)
        .bind(except_session)
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Creates an empty SQLite file readable by its owner only (0600) when none exists yet, so the
/// database (transcripts, audit log, one-machine mode's callback key) and the `-wal`/`-shm`
/// files SQLite later makes with the same mode are not world-readable. An existing file is
/// left as it is; a failure here is left for the connection to report.
fn create_owner_only(path: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

/// For SQLite, asks the driver to create the file when missing (`mode=rwc`) unless the URL
/// already sets a mode.
fn connect_url(url: &DatabaseUrl) -> String {
    let raw = url.expose();
    if url.backend() == DatabaseBackend::Sqlite
        && url.sqlite_path().is_some()
        && !raw.contains("mode=")
    {
        let sep = if raw.contains('?') { '&' } else { '?' };
        format!("{raw}{sep}mode=rwc")
    } else {
        raw.to_owned()
    }
}

fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn expect_one(affected: u64, what: impl FnOnce() -> String) -> StoreResult<()> {
    if affected == 0 {
        Err(StoreError::NotFound { what: what() })
    } else {
        Ok(())
    }
}

fn unique_to_conflict(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Database(e),
    }
}

fn parse_enum<T: FromStr>(
    table: &'static str,
    column: &'static str,
    value: String,
) -> StoreResult<T> {
    value.parse::<T>().map_err(|_| StoreError::Corrupt {
        table,
        column,
        value,
    })
}

#[derive(FromRow)]
struct SessionRow {
    id: String,
    platform: String,
    channel_id: String,
    thread_id: String,
    kind: String,
    parent_id: Option<String>,
    state: String,
    end_reason: Option<String>,
    end_detail: Option<String>,
    started_by: String,
    agent_session_id: Option<String>,
    repo_host: String,
    repo_org: String,
    repo_name: String,
    branch: Option<String>,
    worktree: Option<String>,
    workspace_path: Option<String>,
    container_id: Option<String>,
    session_dir: Option<String>,
    container_user: Option<String>,
    container_folder: Option<String>,
    message_count: i64,
    compaction_count: i64,
    input_tokens: i64,
    output_tokens: i64,
    context_tokens: i64,
    cost_usd: f64,
    created_at: i64,
    updated_at: i64,
    last_activity_at: i64,
    ended_at: Option<i64>,
    permission_mode: Option<String>,
    hibernated_at: Option<i64>,
    budget_added_usd: f64,
    profile: Option<String>,
}

impl TryFrom<SessionRow> for Session {
    type Error = StoreError;

    fn try_from(r: SessionRow) -> StoreResult<Session> {
        let state: SessionState = parse_enum("sessions", "state", r.state)?;
        let lifecycle = match (state, r.end_reason) {
            (SessionState::Starting, _) => Lifecycle::Starting,
            (SessionState::Running, _) => Lifecycle::Running,
            (SessionState::Idle, _) => Lifecycle::Idle,
            (SessionState::Stopping, _) => Lifecycle::Stopping,
            (SessionState::Ended, Some(reason)) => Lifecycle::Ended(SessionEnd {
                reason: parse_enum("sessions", "end_reason", reason)?,
                detail: r.end_detail,
                at: r.ended_at.unwrap_or(r.updated_at),
            }),
            (SessionState::Ended, None) => {
                return Err(StoreError::Corrupt {
                    table: "sessions",
                    column: "end_reason",
                    value: "NULL on an ended session".into(),
                })
            }
        };
        Ok(Session {
            id: r.id,
            platform: parse_enum("sessions", "platform", r.platform)?,
            channel_id: r.channel_id,
            thread_id: r.thread_id,
            kind: parse_enum("sessions", "kind", r.kind)?,
            parent_id: r.parent_id,
            lifecycle,
            started_by: r.started_by,
            agent_session_id: r.agent_session_id,
            repo_host: r.repo_host,
            repo_org: r.repo_org,
            repo_name: r.repo_name,
            branch: r.branch,
            worktree: r.worktree,
            workspace_path: r.workspace_path,
            container_id: r.container_id,
            container: match (r.session_dir, r.container_user, r.container_folder) {
                (Some(session_dir), Some(user), Some(folder)) => Some(ContainerDetails {
                    session_dir,
                    user,
                    folder,
                }),
                _ => None,
            },
            stats: SessionStats {
                message_count: r.message_count,
                compaction_count: r.compaction_count,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                context_tokens: r.context_tokens,
                cost_usd: r.cost_usd,
            },
            permission_mode: r.permission_mode,
            budget_added_usd: r.budget_added_usd,
            profile: match r.profile {
                None => None,
                Some(json) => {
                    Some(
                        serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                            table: "sessions",
                            column: "profile",
                            value: format!("not a recorded profile ({e})"),
                        })?,
                    )
                }
            },
            created_at: r.created_at,
            updated_at: r.updated_at,
            last_activity_at: r.last_activity_at,
            hibernated_at: r.hibernated_at,
        })
    }
}

#[derive(FromRow)]
struct ProjectChannelRow {
    platform: String,
    repo_slug: String,
    team_id: String,
    channel_id: String,
    channel_name: String,
    created_at: i64,
}

impl TryFrom<ProjectChannelRow> for ProjectChannel {
    type Error = StoreError;

    fn try_from(r: ProjectChannelRow) -> StoreResult<ProjectChannel> {
        Ok(ProjectChannel {
            platform: parse_enum("project_channels", "platform", r.platform)?,
            repo_slug: r.repo_slug,
            team_id: r.team_id,
            channel_id: r.channel_id,
            channel_name: r.channel_name,
            created_at: r.created_at,
        })
    }
}

#[derive(FromRow)]
struct ApprovalRow {
    id: String,
    session_id: String,
    domain: String,
    state: String,
    card_post_id: Option<String>,
    requested_at: i64,
    expires_at: i64,
    decided_at: Option<i64>,
    decided_by_id: Option<String>,
    decided_by_name: Option<String>,
    applied_at: Option<i64>,
    apply_attempts: i64,
    next_attempt_at: Option<i64>,
    last_error: Option<String>,
    grant_scope: Option<String>,
    source_grant_id: Option<String>,
}

impl TryFrom<ApprovalRow> for ApprovalRequest {
    type Error = StoreError;

    fn try_from(r: ApprovalRow) -> StoreResult<ApprovalRequest> {
        Ok(ApprovalRequest {
            id: r.id,
            session_id: r.session_id,
            domain: r.domain,
            state: parse_enum("approval_requests", "state", r.state)?,
            card_post_id: r.card_post_id,
            requested_at: r.requested_at,
            expires_at: r.expires_at,
            decided_at: r.decided_at,
            decided_by_id: r.decided_by_id,
            decided_by_name: r.decided_by_name,
            applied_at: r.applied_at,
            apply_attempts: r.apply_attempts,
            next_attempt_at: r.next_attempt_at,
            last_error: r.last_error,
            grant_scope: r
                .grant_scope
                .map(|v| parse_enum("approval_requests", "grant_scope", v))
                .transpose()?,
            source_grant_id: r.source_grant_id,
        })
    }
}

#[derive(FromRow)]
struct GrantRow {
    id: String,
    domain: String,
    session_id: String,
    scope: String,
    request_id: Option<String>,
    source_grant_id: Option<String>,
    granted_by_id: Option<String>,
    granted_by_name: Option<String>,
    granted_at: i64,
    expires_at: Option<i64>,
    ended_at: Option<i64>,
    end_reason: Option<String>,
}

impl TryFrom<GrantRow> for Grant {
    type Error = StoreError;

    fn try_from(r: GrantRow) -> StoreResult<Grant> {
        Ok(Grant {
            id: r.id,
            domain: r.domain,
            session_id: r.session_id,
            scope: parse_enum("egress_grants", "scope", r.scope)?,
            request_id: r.request_id,
            source_grant_id: r.source_grant_id,
            granted_by_id: r.granted_by_id,
            granted_by_name: r.granted_by_name,
            granted_at: r.granted_at,
            expires_at: r.expires_at,
            ended_at: r.ended_at,
            end_reason: r
                .end_reason
                .map(|v| parse_enum("egress_grants", "end_reason", v))
                .transpose()?,
        })
    }
}

fn grants(rows: Vec<GrantRow>) -> StoreResult<Vec<Grant>> {
    rows.into_iter().map(Grant::try_from).collect()
}

/// SQL condition: grant `g` is live at `$1` (Unix ms).
const GRANT_LIVE: &str = "g.ended_at IS NULL AND (g.expires_at IS NULL OR g.expires_at > $1)";

#[derive(FromRow)]
struct AuditRow {
    id: i64,
    at: i64,
    session_id: Option<String>,
    thread_id: Option<String>,
    domain: Option<String>,
    action: String,
    user_id: Option<String>,
    user_name: Option<String>,
    outcome: String,
    detail: Option<String>,
}

impl From<AuditRow> for AuditRecord {
    fn from(r: AuditRow) -> Self {
        AuditRecord {
            id: r.id,
            entry: AuditEntry {
                at: r.at,
                session_id: r.session_id,
                thread_id: r.thread_id,
                domain: r.domain,
                action: r.action,
                user_id: r.user_id,
                user_name: r.user_name,
                outcome: r.outcome,
                detail: r.detail,
            },
        }
    }
}

#[derive(FromRow)]
struct ContainerRow {
    container_id: String,
    vm_host: String,
    workspace_folder: String,
    created_at: i64,
    removed_at: Option<i64>,
}

impl From<ContainerRow> for Container {
    fn from(r: ContainerRow) -> Self {
        Container {
            container_id: r.container_id,
            vm_host: r.vm_host,
            workspace_folder: r.workspace_folder,
            created_at: r.created_at,
            removed_at: r.removed_at,
        }
    }
}

#[derive(FromRow)]
struct TeamsConversationRow {
    conversation_id: String,
    conversation_type: String,
    service_url: String,
    tenant_id: String,
    team_id: String,
    name: String,
    bot_id: String,
    updated_at: i64,
}

impl From<TeamsConversationRow> for TeamsConversation {
    fn from(r: TeamsConversationRow) -> Self {
        TeamsConversation {
            conversation_id: r.conversation_id,
            conversation_type: r.conversation_type,
            service_url: r.service_url,
            tenant_id: r.tenant_id,
            team_id: r.team_id,
            name: r.name,
            bot_id: r.bot_id,
            updated_at: r.updated_at,
        }
    }
}

#[derive(FromRow)]
struct TeamsUserRow {
    user_id: String,
    account_id: String,
    name: String,
    last_conversation_id: Option<String>,
    updated_at: i64,
}

impl From<TeamsUserRow> for TeamsUser {
    fn from(r: TeamsUserRow) -> Self {
        TeamsUser {
            user_id: r.user_id,
            account_id: r.account_id,
            name: r.name,
            last_conversation_id: r.last_conversation_id,
            updated_at: r.updated_at,
        }
    }
}
