-- Source-control integrations: each tenant's GitHub and GitLab webhook secret, sealed with
-- the services' secret_key as JSON {"secret": …, "repository_salt": null | …}. With a
-- repository salt, the receivers store repository and branch names as the salted hashes the
-- tenant's hooks send (TALLY_HOOK_HASH=1 with the same TALLY_HOOK_SALT).
CREATE TABLE control.integrations (
    tenant_id         uuid NOT NULL REFERENCES control.tenants (id),
    provider          text NOT NULL CHECK (provider IN ('github', 'gitlab')),
    sealed            bytea NOT NULL,
    private_names     boolean NOT NULL DEFAULT false,
    created_by        uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_delivery_at  timestamptz,
    -- Verified deliveries (refused ones are counted in ingest-api's metrics, not here: an
    -- unauthenticated request writes nothing).
    deliveries        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, provider)
);

-- Whether the text of users' prompts (Claude Code sends it only with OTEL_LOG_USER_PROMPTS=1)
-- is stored; off by default: the doors drop it and keep its length.
ALTER TABLE control.tenants ADD COLUMN store_prompt_text boolean NOT NULL DEFAULT false;
