-- Egress grants (issue #13). An approval now grants a domain to one session, for a time or
-- until the session ends; the bot removes from the alias what no live grant covers any more,
-- but only what it added itself.
--
-- approval_requests gains:
--   state 'closed'   : the session ended while the request was pending;
--   grant_scope      : what an approval grants: 'ttl' (SM_EGRESS_GRANT_TTL_SECS) or 'session';
--   source_grant_id  : set on a request the bot opened itself to put back a domain that a live
--                      grant covers but the alias lost (drift), or to share another session's
--                      grant; it needs no human decision.
ALTER TABLE approval_requests DROP CONSTRAINT approval_state_check;
ALTER TABLE approval_requests ADD CONSTRAINT approval_state_check
    CHECK (state IN ('pending', 'approved', 'denied', 'failed', 'expired', 'closed'));
ALTER TABLE approval_requests ADD COLUMN grant_scope TEXT;
ALTER TABLE approval_requests ADD COLUMN source_grant_id TEXT;

-- A domain granted to one session: who asked (the session, hence its owner), who decided,
-- when, and until when. Live while ended_at IS NULL and (expires_at IS NULL OR expires_at > now).
CREATE TABLE egress_grants (
    id               TEXT PRIMARY KEY,              -- UUID v4
    domain           TEXT NOT NULL,
    session_id       TEXT NOT NULL REFERENCES sessions (id),
    scope            TEXT NOT NULL,                 -- 'ttl' | 'session'
    request_id       TEXT UNIQUE,                   -- the request it answered (none when shared at once)
    source_grant_id  TEXT,                          -- shared from this grant of another session
    granted_by_id    TEXT,
    granted_by_name  TEXT,
    granted_at       BIGINT NOT NULL,
    expires_at       BIGINT,                        -- NULL: until its session ends
    ended_at         BIGINT,
    end_reason       TEXT,                          -- 'expired' | 'revoked' | 'session_ended'
    CONSTRAINT grant_scope_check CHECK (scope IN ('ttl', 'session'))
);
CREATE INDEX egress_grants_open ON egress_grants (domain) WHERE ended_at IS NULL;
CREATE INDEX egress_grants_session ON egress_grants (session_id);

-- Domains the bot itself added to the alias; only these are ever removed from it.
CREATE TABLE firewall_domains (
    domain           TEXT PRIMARY KEY,
    added_at         BIGINT NOT NULL,
    remove_attempts  BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL DEFAULT 0,     -- next removal attempt (Unix ms) once no grant covers it
    last_error       TEXT
);
