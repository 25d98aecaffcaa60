-- Platform operators: credentials not tied to a tenant, for managing tenants over HTTP.
CREATE TABLE control.operator_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- API keys may also carry the `admin` scope (manage the tenant's users and keys).
ALTER TABLE control.api_keys DROP CONSTRAINT api_keys_scope_check;
ALTER TABLE control.api_keys ADD CONSTRAINT api_keys_scope_check
    CHECK (scope IN ('ingest', 'read', 'admin'));
