-- Children an orchestrator asked for, keyed by what was asked (kind, repository, branch, task),
-- so a marker the model repeats or re-emits within a window creates one child.
CREATE TABLE spawn_requests (
    parent_id   TEXT NOT NULL REFERENCES sessions (id),
    spawn_key   TEXT NOT NULL,                      -- kind, repo, branch and task, normalised
    child_id    TEXT,                               -- set once the child exists
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (parent_id, spawn_key)
);
