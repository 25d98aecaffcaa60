-- The control schema: tenants, credentials and the projector's own bookkeeping.
-- Applied by `projector migrate` (sqlx migrations, embedded in the binary).

CREATE SCHEMA IF NOT EXISTS control;

CREATE TABLE control.tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deactivated')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE control.api_keys (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES control.tenants (id),
    name         text NOT NULL,
    scope        text NOT NULL CHECK (scope IN ('ingest', 'read')),
    -- SHA-256 of the secret; the secret itself is shown once and never stored.
    key_hash     bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_tenant ON control.api_keys (tenant_id);

-- Next Kafka offset to project, per projection and partition. Written in the same
-- transaction as the projected rows: this, not Kafka's commit, is the truth.
CREATE TABLE control.projector_offsets (
    projection   text   NOT NULL,
    topic        text   NOT NULL,
    partition    int    NOT NULL,
    next_offset  bigint NOT NULL CHECK (next_offset >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- Which version of a projection the read side serves (replay builds a new one).
CREATE TABLE control.projection_versions (
    projection      text PRIMARY KEY,
    active_version  int  NOT NULL CHECK (active_version >= 1),
    switched_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO control.projection_versions (projection, active_version) VALUES ('metrics', 1);

-- Tenant schemas the projector has created, per projection version.
CREATE TABLE control.tenant_schemas (
    tenant_id    uuid NOT NULL REFERENCES control.tenants (id),
    version      int  NOT NULL,
    schema_name  text NOT NULL UNIQUE,
    timescale    boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

-- Element-wise sum of two duration histograms (rollup merge).
CREATE FUNCTION control.hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
      FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i)
$$;
