-- What **Add $N** on a budget card added to a session's cap (issue #16), in US dollars. The cap
-- is the configured budget (SM_SESSION_BUDGET_USD, or SM_ORCHESTRATOR_BUDGET_USD on an
-- orchestrator's row for its family) plus this.
ALTER TABLE sessions ADD COLUMN budget_added_usd REAL NOT NULL DEFAULT 0;
