-- A session's tool-permission mode (issue #16): set with `!mode`, kept across agent restarts
-- and bot restarts. NULL: the configured default (SM_PERMISSION_MODE).
ALTER TABLE sessions ADD COLUMN permission_mode TEXT;
