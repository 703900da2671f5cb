-- Egress grants (issue #13). An approval now grants a domain to one session, for a time or
-- until the session ends; the bot removes from the alias what no live grant covers any more,
-- but only what it added itself.
--
-- approval_requests gains (SQLite cannot change a CHECK constraint: the table is rebuilt):
--   state 'closed'   : the session ended while the request was pending;
--   grant_scope      : what an approval grants: 'ttl' (SM_EGRESS_GRANT_TTL_SECS) or 'session';
--   source_grant_id  : set on a request the bot opened itself to put back a domain that a live
--                      grant covers but the alias lost (drift), or to share another session's
--                      grant; it needs no human decision.
CREATE TABLE approval_requests_new (
    id                TEXT PRIMARY KEY,
    session_id        TEXT NOT NULL REFERENCES sessions (id),
    domain            TEXT NOT NULL,
    state             TEXT NOT NULL,
    card_post_id      TEXT,
    requested_at      INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    decided_at        INTEGER,
    decided_by_id     TEXT,
    decided_by_name   TEXT,
    applied_at        INTEGER,
    apply_attempts    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER,
    last_error        TEXT,
    grant_scope       TEXT,
    source_grant_id   TEXT,
    CONSTRAINT approval_state_check CHECK (state IN ('pending', 'approved', 'denied', 'failed', 'expired', 'closed'))
);
INSERT INTO approval_requests_new (id, session_id, domain, state, card_post_id, requested_at,
    expires_at, decided_at, decided_by_id, decided_by_name, applied_at, apply_attempts,
    next_attempt_at, last_error)
SELECT id, session_id, domain, state, card_post_id, requested_at, expires_at, decided_at,
    decided_by_id, decided_by_name, applied_at, apply_attempts, next_attempt_at, last_error
FROM approval_requests;
DROP TABLE approval_requests;
ALTER TABLE approval_requests_new RENAME TO approval_requests;
CREATE UNIQUE INDEX approval_one_pending ON approval_requests (session_id, domain) WHERE state = 'pending';
CREATE INDEX approval_unapplied ON approval_requests (next_attempt_at) WHERE state = 'approved' AND applied_at IS NULL;
CREATE INDEX approval_domain ON approval_requests (domain, state);

-- A domain granted to one session: who asked (the session, hence its owner), who decided,
-- when, and until when. Live while ended_at IS NULL and (expires_at IS NULL OR expires_at > now).
CREATE TABLE egress_grants (
    id               TEXT PRIMARY KEY,
    domain           TEXT NOT NULL,
    session_id       TEXT NOT NULL REFERENCES sessions (id),
    scope            TEXT NOT NULL,
    request_id       TEXT UNIQUE,
    source_grant_id  TEXT,
    granted_by_id    TEXT,
    granted_by_name  TEXT,
    granted_at       INTEGER NOT NULL,
    expires_at       INTEGER,
    ended_at         INTEGER,
    end_reason       TEXT,
    CONSTRAINT grant_scope_check CHECK (scope IN ('ttl', 'session'))
);
CREATE INDEX egress_grants_open ON egress_grants (domain) WHERE ended_at IS NULL;
CREATE INDEX egress_grants_session ON egress_grants (session_id);

-- Domains the bot itself added to the alias; only these are ever removed from it.
CREATE TABLE firewall_domains (
    domain           TEXT PRIMARY KEY,
    added_at         INTEGER NOT NULL,
    remove_attempts  INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT
);
