-- Plans and per-tenant ingest rate limits (requests per minute).
ALTER TABLE control.tenants
    ADD COLUMN plan text NOT NULL DEFAULT 'professional'
        CHECK (plan IN ('free', 'professional', 'enterprise')),
    -- Overrides the plan's limit when set.
    ADD COLUMN rate_limit_per_min integer CHECK (rate_limit_per_min > 0);
