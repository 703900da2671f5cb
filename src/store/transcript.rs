//! The web console's transcript of threads (table `transcript`, see [`crate::console`]).

use sqlx::FromRow;

use super::{Store, StoreError, StoreResult};

/// One recorded event of a thread.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TranscriptEntry {
    /// Increasing over the whole table: the order of events and the id a browser resumes
    /// from.
    pub id: i64,
    /// The thread (its anchor post id).
    pub thread_id: String,
    /// The post this event is about; a post's later events replace its earlier ones.
    pub post_id: String,
    /// What happened.
    pub kind: TranscriptKind,
    /// Who wrote an inbound message (display name); `None` for the bot.
    pub author: Option<String>,
    /// JSON: `{"text": …}` for posts and inbound messages, the card for cards.
    pub body: String,
    /// When (Unix ms).
    pub created_at: i64,
}

/// What a [`TranscriptEntry`] records.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, strum::EnumString, strum::IntoStaticStr,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum TranscriptKind {
    /// A post of the bot, new or edited (the text is the whole new text).
    Post,
    /// A card, new or replaced.
    Card,
    /// A message someone wrote in the thread.
    Inbound,
}

#[derive(FromRow)]
struct Row {
    id: i64,
    thread_id: String,
    post_id: String,
    kind: String,
    author: Option<String>,
    body: String,
    created_at: i64,
}

impl TryFrom<Row> for TranscriptEntry {
    type Error = StoreError;

    fn try_from(r: Row) -> StoreResult<Self> {
        Ok(Self {
            id: r.id,
            kind: super::parse_enum("transcript", "kind", r.kind)?,
            thread_id: r.thread_id,
            post_id: r.post_id,
            author: r.author,
            body: r.body,
            created_at: r.created_at,
        })
    }
}

impl Store {
    /// Appends an event; `None` when it was recorded before (an inbound message handed out
    /// again after a restart).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn append_transcript(
        &self,
        thread_id: &str,
        post_id: &str,
        kind: TranscriptKind,
        author: Option<&str>,
        body: &str,
        at: i64,
    ) -> StoreResult<Option<TranscriptEntry>> {
        let row = sqlx::query_as::<_, Row>(
            "INSERT INTO transcript (thread_id, post_id, kind, author, body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT DO NOTHING
             RETURNING *",
        )
        .bind(thread_id)
        .bind(post_id)
        .bind(<&str>::from(kind))
        .bind(author)
        .bind(body)
        .bind(at)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    /// A thread's events after `after` (an event id; 0 for all), oldest first, at most
    /// `limit`.
    ///
    /// # Errors
    /// [`StoreError::Database`]; [`StoreError::Corrupt`].
    pub async fn transcript_after(
        &self,
        thread_id: &str,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<TranscriptEntry>> {
        let rows = sqlx::query_as::<_, Row>(
            "SELECT * FROM transcript WHERE thread_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(thread_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    /// Forgets what no page needs any more, returning how many events went:
    /// - each post's or card's events between its first and its latest one (a page places a
    ///   post where it first appeared and shows it as it is now; a page resuming after an id
    ///   gets the latest version, whose id is larger);
    /// - with `ended_before` (Unix ms), every event of the threads of sessions that ended
    ///   before then.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn prune_transcript(&self, ended_before: Option<i64>) -> StoreResult<u64> {
        let superseded = sqlx::query(
            "DELETE FROM transcript WHERE kind <> 'inbound' AND EXISTS (
                 SELECT 1 FROM transcript AS newer
                 WHERE newer.post_id = transcript.post_id AND newer.id > transcript.id)
             AND EXISTS (
                 SELECT 1 FROM transcript AS older
                 WHERE older.post_id = transcript.post_id AND older.id < transcript.id)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        let ended = match ended_before {
            Some(before) => sqlx::query(
                "DELETE FROM transcript WHERE thread_id IN (
                     SELECT thread_id FROM sessions
                     WHERE state = 'ended' AND ended_at IS NOT NULL AND ended_at < $1)",
            )
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            None => 0,
        };
        Ok(superseded + ended)
    }

    /// The latest event of a post (e.g. a card as it is now).
    ///
    /// # Errors
    /// [`StoreError::Database`]; [`StoreError::Corrupt`].
    pub async fn transcript_latest(&self, post_id: &str) -> StoreResult<Option<TranscriptEntry>> {
        let row = sqlx::query_as::<_, Row>(
            "SELECT * FROM transcript WHERE post_id = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(post_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }
}
