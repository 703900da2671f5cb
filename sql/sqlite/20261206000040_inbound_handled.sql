-- Inbound messages are recorded before they are handled and marked handled once taken
-- (issue #14, point 7): a message recorded but not handled when the bot stopped (a crash, or
-- a shutdown while it waited behind a running turn) is handled after the restart.
--   payload     the message as the dispatcher takes it (JSON), kept until it is handled;
--               NULL for records that need no redelivery (card submits, old rows)
--   handled_at  Unix ms when the message was taken by its session or otherwise handled;
--               NULL while it waits
ALTER TABLE inbound_posts ADD COLUMN payload TEXT;
ALTER TABLE inbound_posts ADD COLUMN handled_at BIGINT;
-- What was recorded before this version was handled then (or is lost for good).
UPDATE inbound_posts SET handled_at = received_at;
CREATE INDEX inbound_posts_unhandled ON inbound_posts (platform, create_at) WHERE handled_at IS NULL;
