-- The tenant's audit log: every auth and control-plane event of the tenant, projected from
-- tally.auth.v1 (event ids make it exactly-once).
CREATE TABLE audit_log (
    event_id     uuid        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    type         text        NOT NULL,
    user_id      uuid,
    email        text,
    ip           text,
    target       text,
    detail       text,
    actor        jsonb       NOT NULL,
    data         jsonb       NOT NULL,
    PRIMARY KEY (event_id)
);
CREATE INDEX audit_log_time ON audit_log (occurred_at DESC, event_id DESC);
