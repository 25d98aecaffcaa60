-- The tenant-schema template. The projector runs it once per tenant and projection version,
-- with `search_path` set to the new schema, so nothing here names a schema.
-- The PARTITIONING marker comment becomes `PARTITION BY RANGE (occurred_at)` on plain PostgreSQL; with
-- TimescaleDB it is removed and the projector turns the same tables into hypertables.
-- Every raw table has the same columns (the payload's own shape is kept in `data`), and a
-- unique key that includes the time column, as both paths require.

CREATE TABLE command_executions (
    event_id       uuid        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    received_at    timestamptz NOT NULL,
    user_id        text        NOT NULL DEFAULT '',
    team_id        text        NOT NULL DEFAULT '',
    project_id     text        NOT NULL DEFAULT '',
    session_id     text        NOT NULL DEFAULT '',
    name           text        NOT NULL DEFAULT '',
    status         text        NOT NULL DEFAULT '',
    duration_ms    bigint      NOT NULL DEFAULT 0,
    input_tokens   bigint      NOT NULL DEFAULT 0,
    output_tokens  bigint      NOT NULL DEFAULT 0,
    value          double precision NOT NULL DEFAULT 0,
    data           jsonb       NOT NULL,
    PRIMARY KEY (event_id, occurred_at)
) /*PARTITIONING*/;

CREATE TABLE agent_interactions   (LIKE command_executions INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (event_id, occurred_at)) /*PARTITIONING*/;
CREATE TABLE tool_executions      (LIKE command_executions INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (event_id, occurred_at)) /*PARTITIONING*/;
CREATE TABLE session_events       (LIKE command_executions INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (event_id, occurred_at)) /*PARTITIONING*/;
CREATE TABLE productivity_metrics (LIKE command_executions INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (event_id, occurred_at)) /*PARTITIONING*/;
CREATE TABLE metric_samples       (LIKE command_executions INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (event_id, occurred_at)) /*PARTITIONING*/;

CREATE INDEX ON command_executions (occurred_at, user_id);
CREATE INDEX ON agent_interactions (occurred_at, user_id);
CREATE INDEX ON tool_executions (occurred_at, user_id);
CREATE INDEX ON metric_samples (name, occurred_at);

-- One row per session, upserted from session.started / session.ended.
CREATE TABLE sessions (
    session_id          text PRIMARY KEY,
    user_id             text NOT NULL,
    team_id             text NOT NULL DEFAULT '',
    project_id          text NOT NULL DEFAULT '',
    started_at          timestamptz,
    ended_at            timestamptz,
    commands_executed   bigint,
    productivity_score  double precision,
    agents_used         text[] NOT NULL DEFAULT '{}'
);

-- Rollups, maintained in the same transaction as the raw rows, counting only rows that
-- were really inserted. Dimensions absent from an event are ''. `duration_hist` is a
-- mergeable log-linear histogram of duration_ms (bucket layout: projector's rollup module).
CREATE TABLE activity_1m (
    bucket         timestamptz NOT NULL,
    event_type     text   NOT NULL,
    user_id        text   NOT NULL,
    team_id        text   NOT NULL,
    project_id     text   NOT NULL,
    name           text   NOT NULL,
    count          bigint NOT NULL,
    errors         bigint NOT NULL,
    duration_sum   bigint NOT NULL,
    duration_max   bigint NOT NULL,
    input_tokens   bigint NOT NULL,
    output_tokens  bigint NOT NULL,
    value_sum      double precision NOT NULL,
    duration_hist  bigint[] NOT NULL,
    PRIMARY KEY (bucket, event_type, user_id, team_id, project_id, name)
);
CREATE TABLE activity_1h (LIKE activity_1m INCLUDING ALL);
CREATE TABLE activity_1d (LIKE activity_1m INCLUDING ALL);

-- The projection's watermark, advanced in every transaction that projects this tenant.
-- query-api reports it as `as_of` and keys its cache by `seq`.
CREATE TABLE projection_state (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq          bigint NOT NULL DEFAULT 0,
    events       bigint NOT NULL DEFAULT 0,
    as_of        timestamptz
);
INSERT INTO projection_state DEFAULT VALUES;
