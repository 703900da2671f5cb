-- This deployment's identity: a random id made once, shared by every instance on this
-- database. Containers carry it (label session-manager.deployment), so the reconciler only
-- ever touches containers of its own deployment, never another bot's on the same VM user.
CREATE TABLE deployment (
    id          TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL
);
