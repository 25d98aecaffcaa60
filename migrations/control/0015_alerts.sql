-- Budgets, notification channels, and what fired and was delivered.

-- Calendar periods (a budget's day, week, month) are taken in the tenant's time zone.
ALTER TABLE control.tenants ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC';

-- Where notifications go: a generic webhook signed as the Standard Webhooks specification
-- describes, or a Slack incoming webhook. The URL (a Slack URL is itself a credential) and
-- the signing secrets are sealed with the services' secret_key, as JSON:
-- {"url": …, "secrets": [{"secret": "whsec_…", "expires_at": null | time}]}, newest first.
CREATE TABLE control.channels (
    id                    uuid PRIMARY KEY,
    tenant_id             uuid NOT NULL REFERENCES control.tenants (id),
    name                  text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind                  text NOT NULL CHECK (kind IN ('webhook', 'slack')),
    sealed                bytea NOT NULL,
    -- Scheme and host only, for display.
    url_display           text NOT NULL,
    -- Who is told when the channel is paused.
    owner_user_id         uuid,
    -- Deliveries that ran out of attempts in a row; at `pause_after_failures` it is paused.
    consecutive_failures  int NOT NULL DEFAULT 0,
    paused_at             timestamptz,
    paused_reason         text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX channels_tenant ON control.channels (tenant_id);

-- A spending budget on agent cost or tokens, for a calendar period of the tenant's zone.
CREATE TABLE control.budgets (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES control.tenants (id),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- Whose usage counts: the whole tenant ('' as scope_id), a team, a user or a project.
    scope       text NOT NULL CHECK (scope IN ('tenant', 'team', 'user', 'project')),
    scope_id    text NOT NULL CHECK (length(scope_id) <= 255),
    metric      text NOT NULL CHECK (metric IN ('cost_usd', 'tokens')),
    period      text NOT NULL CHECK (period IN ('day', 'week', 'month')),
    amount      double precision NOT NULL CHECK (amount > 0 AND amount < 1e15),
    -- Percentages of `amount`, ascending.
    thresholds  int[] NOT NULL,
    -- Channels notified; empty means every channel of the tenant.
    channels    uuid[] NOT NULL DEFAULT '{}',
    created_by  uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX budgets_tenant ON control.budgets (tenant_id);

-- What fired (a budget's threshold, a channel paused): once per crossing (`dedup`: budget,
-- period and threshold), whichever process
-- saw it first, however often it is evaluated again (restarts, rebalances, replays).
CREATE TABLE control.firings (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES control.tenants (id),
    source      text NOT NULL CHECK (source IN ('budget', 'rule', 'channel')),
    source_id   uuid NOT NULL,
    dedup       text NOT NULL,
    -- Who may see it: '' scope for the tenant, else the team, user or project it concerns.
    scope       text NOT NULL,
    scope_id    text NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    -- The body every webhook delivery of it sends (Standard Webhooks: type, timestamp, data).
    payload     jsonb NOT NULL,
    UNIQUE (tenant_id, dedup)
);
CREATE INDEX firings_recent ON control.firings (tenant_id, fired_at DESC);

-- One firing to one channel. `id` is the `webhook-id`, the same on every attempt.
CREATE TABLE control.deliveries (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES control.tenants (id),
    firing_id        uuid NOT NULL REFERENCES control.firings (id),
    channel_id       uuid NOT NULL REFERENCES control.channels (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- A sender holds it until then; another may take it over after (a crash mid-attempt).
    leased_until     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (firing_id, channel_id)
);
CREATE INDEX deliveries_due ON control.deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_tenant ON control.deliveries (tenant_id, created_at DESC);

-- Every attempt: its answer's status, latency and first bytes, or the error.
CREATE TABLE control.delivery_attempts (
    delivery_id  uuid NOT NULL REFERENCES control.deliveries (id) ON DELETE CASCADE,
    attempt      int NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  int,
    latency_ms   int NOT NULL,
    error        text,
    excerpt      text,
    PRIMARY KEY (delivery_id, attempt)
);
