-- Teams of a tenant. `key` is the team id events carry (`data.team_id`); membership is the
-- team key in a user's `teams`.
CREATE TABLE control.teams (
    tenant_id   uuid NOT NULL REFERENCES control.tenants (id),
    key         text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);
