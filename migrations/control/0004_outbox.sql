-- The transactional outbox: auth and control events are written here in the same
-- transaction as the change they describe, and relayed to Kafka (tally.auth.v1) by a
-- background task of ingest-api. Relaying is at-least-once; event ids make projection
-- exactly-once.
CREATE TABLE control.outbox (
    seq         bigserial PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    record_key  text NOT NULL,
    envelope    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX outbox_unsent ON control.outbox (seq) WHERE sent_at IS NULL;

-- Which tenant-schema templates (migrations/tenant/NNNN_*.sql) a schema has had applied.
ALTER TABLE control.tenant_schemas ADD COLUMN template_version integer NOT NULL DEFAULT 1;

-- Which deployment's relay sends a row (the services' topic prefix; '' normally). Lets
-- several deployments — or parallel tests — share one database.
ALTER TABLE control.outbox ADD COLUMN namespace text NOT NULL DEFAULT '';
CREATE INDEX outbox_unsent_ns ON control.outbox (namespace, seq) WHERE sent_at IS NULL;
