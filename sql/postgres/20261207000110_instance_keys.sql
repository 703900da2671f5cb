-- Keys this installation made for itself and must keep across restarts (one-machine mode's
-- callback secret when SM_CALLBACK_SECRET is unset), so that what was signed before a restart
-- still verifies after it. The first writer wins; later starts read the stored value.
CREATE TABLE instance_keys (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
