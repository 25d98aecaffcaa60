-- Alert rules on what the dashboards show: error rate, p95 duration, cost, tokens and events
-- over a window, a scope gone silent, and a value far outside its own baseline.
CREATE TABLE control.alert_rules (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES control.tenants (id),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind             text NOT NULL CHECK (kind IN ('error_rate', 'p95_duration', 'cost', 'tokens',
                                                   'events', 'silence', 'anomaly')),
    scope            text NOT NULL CHECK (scope IN ('tenant', 'team', 'user', 'project')),
    scope_id         text NOT NULL CHECK (length(scope_id) <= 255),
    -- Only events of this type (`command.executed`, …) and this name (command, agent, tool).
    event_type       text,
    name_filter      text CHECK (length(name_filter) <= 255),
    -- What an anomaly rule watches: events, errors, cost_usd or tokens.
    measure          text CHECK (measure IN ('events', 'errors', 'cost_usd', 'tokens')),
    -- Fires when the value is `above` (or `below`) the threshold; for an anomaly, the
    -- z-score against the same window of the previous days.
    op               text NOT NULL DEFAULT 'above' CHECK (op IN ('above', 'below')),
    threshold        double precision NOT NULL,
    window_minutes   int NOT NULL CHECK (window_minutes BETWEEN 1 AND 1440),
    cooldown_minutes int NOT NULL CHECK (cooldown_minutes BETWEEN 0 AND 10080),
    -- Error rate and p95 need this many events in the window before they judge.
    min_events       int NOT NULL DEFAULT 10 CHECK (min_events >= 0),
    channels         uuid[] NOT NULL DEFAULT '{}',
    -- `firing` from the crossing until the condition clears; each crossing fires once.
    state            text NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'firing')),
    crossings        bigint NOT NULL DEFAULT 0,
    last_fired_at    timestamptz,
    last_value       double precision,
    evaluated_at     timestamptz,
    created_by       uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_rules_tenant ON control.alert_rules (tenant_id);
