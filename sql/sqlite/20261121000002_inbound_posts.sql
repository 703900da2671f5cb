-- Chat posts the bot has taken for handling, so each is handled at most once even across
-- reconnects, catch-ups and restarts. The newest create_at per channel is where a catch-up
-- after downtime starts.
CREATE TABLE inbound_posts (
    platform     TEXT NOT NULL,
    post_id      TEXT NOT NULL,
    channel_id   TEXT NOT NULL,
    create_at    INTEGER NOT NULL,                   -- the post's creation time (Unix ms)
    received_at  INTEGER NOT NULL,
    PRIMARY KEY (platform, post_id)
);
CREATE INDEX inbound_posts_cursor ON inbound_posts (platform, channel_id, create_at);
