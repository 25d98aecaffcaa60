-- Per tenant: with TimescaleDB, raw chunks older than `compress_after_days` are compressed
-- (columnstore) by the projector's retention pass. Late events are still accepted into them
-- and deduplicated. Plain PostgreSQL ignores it.
ALTER TABLE control.tenants
    ADD COLUMN compress_after_days int NOT NULL DEFAULT 7 CHECK (compress_after_days BETWEEN 1 AND 3650);
