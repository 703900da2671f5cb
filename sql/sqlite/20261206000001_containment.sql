-- Containment (issue #11): each session's own directory on the VM (its Claude Code state and
-- generated devcontainer configuration), the container's user and workspace folder (so a
-- resume starts the existing container instead of running devcontainer up again), and
-- leases: a lock with an expiry is taken over once it has expired, so a bot killed while
-- holding one (the firewall lock) never blocks others for good.
ALTER TABLE sessions ADD COLUMN session_dir TEXT;
ALTER TABLE sessions ADD COLUMN container_user TEXT;
ALTER TABLE sessions ADD COLUMN container_folder TEXT;
ALTER TABLE locks ADD COLUMN expires_at INTEGER;
