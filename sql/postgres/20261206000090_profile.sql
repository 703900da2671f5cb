-- The profile a session was started with (issue #16): the whole profile as JSON, so a restart
-- or a changed SM_PROFILES_FILE never changes what a running session may do. NULL: no profile
-- (the bot's settings).
ALTER TABLE sessions ADD COLUMN profile TEXT;
