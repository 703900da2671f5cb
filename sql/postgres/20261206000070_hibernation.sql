-- Hibernation (issue #16): a session left without a message for SM_SESSION_IDLE_SECS has its
-- agent closed and its container stopped (not removed) until its next message. It stays
-- active (state 'idle'); this column says it sleeps.
--   hibernated_at  Unix ms when the session went to sleep; NULL while it is awake
ALTER TABLE sessions ADD COLUMN hibernated_at BIGINT;
