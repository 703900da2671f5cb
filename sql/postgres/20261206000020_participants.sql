-- Who may do what (issue #12): the users a session's owner invited into it. The owner is
-- sessions.started_by; participants may talk to the session and look at it, not stop it.
CREATE TABLE session_participants (
    session_id  TEXT NOT NULL REFERENCES sessions (id),
    user_id     TEXT NOT NULL,
    added_by    TEXT NOT NULL,
    added_at    BIGINT NOT NULL,
    PRIMARY KEY (session_id, user_id)
);
CREATE INDEX session_participants_user ON session_participants (user_id);
