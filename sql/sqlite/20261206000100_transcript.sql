-- The web console's record of every thread (issue #19): each post and edit the bot makes, each
-- card, and each message people write in a session's thread, in order. `id` is the event id a
-- browser resumes from (Server-Sent Events' Last-Event-ID).
CREATE TABLE transcript (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    thread_id TEXT NOT NULL,
    post_id TEXT NOT NULL,
    -- post (a bot post, new or edited), card (a card, new or replaced), inbound (someone wrote)
    kind TEXT NOT NULL,
    -- who wrote an inbound message (display name); NULL for the bot
    author TEXT,
    -- JSON: {"text": …} for post and inbound, the card for card
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX transcript_thread ON transcript (thread_id, id);
CREATE INDEX transcript_post ON transcript (post_id, id);
-- A message handed out again after a restart is recorded once.
CREATE UNIQUE INDEX transcript_inbound_once ON transcript (post_id) WHERE kind = 'inbound';
