-- Which projection version of each tenant the read side serves. `projector replay` builds
-- version N+1 of a tenant's schema beside N and flips this row in one transaction; the
-- projector's batches read it (FOR SHARE) in their own transaction, so a flip and a batch
-- never interleave. A tenant without a row is on version 1.
CREATE TABLE control.tenant_versions (
    tenant_id       uuid PRIMARY KEY REFERENCES control.tenants (id),
    active_version  int  NOT NULL CHECK (active_version >= 1),
    switched_at     timestamptz NOT NULL DEFAULT now()
);

-- Superseded by the per-tenant table (a replay may rebuild one tenant).
DROP TABLE control.projection_versions;

-- Retention, per tenant: raw rows (and minute rollups) for `raw_retention_days`, hourly and
-- daily rollups for `rollup_retention_days`. Older partitions/chunks are dropped by the
-- projector; ingest refuses events older than the raw window.
ALTER TABLE control.tenants
    ADD COLUMN raw_retention_days    int NOT NULL DEFAULT 90  CHECK (raw_retention_days BETWEEN 1 AND 3650),
    ADD COLUMN rollup_retention_days int NOT NULL DEFAULT 400 CHECK (rollup_retention_days BETWEEN 1 AND 3650),
    ADD CONSTRAINT rollups_outlive_raw CHECK (rollup_retention_days >= raw_retention_days);
