-- People: users who log in with a password, their refresh tokens, and the keys that sign
-- their access tokens.

CREATE TABLE control.users (
    id                  uuid PRIMARY KEY,
    tenant_id           uuid NOT NULL REFERENCES control.tenants (id),
    email               text NOT NULL CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 254),
    password_hash       text NOT NULL,
    role                text NOT NULL CHECK (role IN ('owner', 'admin', 'manager', 'developer', 'viewer')),
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deactivated')),
    -- The user id this person's events carry (`data.user_id`); dashboards scope by it.
    external_id         text NOT NULL,
    -- Team ids (as events carry them) a manager or viewer may see.
    teams               text[] NOT NULL DEFAULT '{}',
    -- Carried in every access token (`ver`); raising it (password change, logout-all) makes
    -- every access token issued before refused.
    token_version       integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email ON control.users (email);
CREATE INDEX users_tenant ON control.users (tenant_id);

-- Opaque refresh tokens, stored as SHA-256, rotated on every use. Tokens of one login form a
-- family; presenting a used token again revokes the whole family.
CREATE TABLE control.refresh_tokens (
    id          uuid PRIMARY KEY,
    family_id   uuid NOT NULL,
    user_id     uuid NOT NULL REFERENCES control.users (id),
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family ON control.refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON control.refresh_tokens (user_id);

-- Ed25519 keys that sign access tokens. The newest unretired key signs; every unretired key is
-- published in the JWKS, so tokens signed by the previous key stay valid across a rotation.
CREATE TABLE control.signing_keys (
    kid             text PRIMARY KEY,
    private_pkcs8   bytea NOT NULL,
    public_key      bytea NOT NULL CHECK (length(public_key) = 32),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    retired_at      timestamptz
);
