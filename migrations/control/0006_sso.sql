-- Single sign-on with OpenID Connect, per tenant.
CREATE TABLE control.sso_settings (
    tenant_id          uuid PRIMARY KEY REFERENCES control.tenants (id),
    provider           text NOT NULL CHECK (provider IN ('google', 'microsoft', 'okta', 'oidc')),
    issuer             text NOT NULL,
    client_id          text NOT NULL,
    -- Sealed with the service's secret_key (XChaCha20-Poly1305); never stored in clear.
    client_secret_enc  bytea NOT NULL,
    -- New people are provisioned only from these e-mail domains.
    allowed_domains    text[] NOT NULL DEFAULT '{}',
    default_role       text NOT NULL DEFAULT 'developer'
                       CHECK (default_role IN ('admin', 'manager', 'developer', 'viewer')),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Logins in flight: state → what the callback must check (single use, 10 minutes).
CREATE TABLE control.sso_logins (
    state          text PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES control.tenants (id),
    nonce          text NOT NULL,
    code_verifier  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- A person as the identity provider knows them.
CREATE TABLE control.user_identities (
    issuer   text NOT NULL,
    subject  text NOT NULL,
    user_id  uuid NOT NULL REFERENCES control.users (id),
    PRIMARY KEY (issuer, subject)
);
