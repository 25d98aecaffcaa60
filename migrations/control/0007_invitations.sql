-- Invitations: a link token (stored as SHA-256) that lets one person set their password and
-- join a tenant with a given role, valid 1 to 168 hours, once.
CREATE TABLE control.invitations (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES control.tenants (id),
    email        text NOT NULL CHECK (email = lower(email)),
    role         text NOT NULL CHECK (role IN ('owner', 'admin', 'manager', 'developer', 'viewer')),
    teams        text[] NOT NULL DEFAULT '{}',
    token_hash   bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    accepted_at  timestamptz,
    user_id      uuid REFERENCES control.users (id)
);
CREATE INDEX invitations_tenant ON control.invitations (tenant_id);
