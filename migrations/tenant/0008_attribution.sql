-- Attribution: where each session worked (its contexts, from the hook), the agent usage each
-- context explains, and the pull requests the source-control webhooks describe.
--
-- A usage row (an agent interaction's cost and tokens, or a delta of Claude Code's lines of
-- code) belongs to the latest context of its session at or before its time; without one it
-- is unattributed (repository ''). A context that arrives after the usage it explains
-- re-attributes it, moving its amounts between rollup keys in the same transaction.

CREATE TABLE IF NOT EXISTS session_contexts (
    session_id  text        NOT NULL,
    at          timestamptz NOT NULL,
    event_id    uuid        NOT NULL,
    user_id     text        NOT NULL DEFAULT '',
    repository  text        NOT NULL DEFAULT '',
    branch      text        NOT NULL DEFAULT '',
    commit_sha  text        NOT NULL DEFAULT '',
    directory   text        NOT NULL DEFAULT '',
    PRIMARY KEY (session_id, at, event_id)
);

CREATE TABLE IF NOT EXISTS session_usage (
    session_id             text        NOT NULL,
    occurred_at            timestamptz NOT NULL,
    event_id               uuid        NOT NULL,
    user_id                text        NOT NULL DEFAULT '',
    team_id                text        NOT NULL DEFAULT '',
    requests               bigint      NOT NULL DEFAULT 0,
    tool_runs              bigint      NOT NULL DEFAULT 0,
    cost_usd               double precision NOT NULL DEFAULT 0,
    input_tokens           bigint      NOT NULL DEFAULT 0,
    output_tokens          bigint      NOT NULL DEFAULT 0,
    cache_read_tokens      bigint      NOT NULL DEFAULT 0,
    cache_creation_tokens  bigint      NOT NULL DEFAULT 0,
    lines_added            bigint      NOT NULL DEFAULT 0,
    lines_removed          bigint      NOT NULL DEFAULT 0,
    repository             text        NOT NULL DEFAULT '',
    branch                 text        NOT NULL DEFAULT '',
    PRIMARY KEY (session_id, occurred_at, event_id)
);
CREATE INDEX IF NOT EXISTS session_usage_branch ON session_usage (repository, branch, occurred_at);

-- Usage by hour, repository, branch, user and team: the repository and branch views.
CREATE TABLE IF NOT EXISTS repo_usage_1h (
    bucket                 timestamptz NOT NULL,
    repository             text   NOT NULL,
    branch                 text   NOT NULL,
    user_id                text   NOT NULL,
    team_id                text   NOT NULL,
    requests               bigint NOT NULL,
    tool_runs              bigint NOT NULL,
    cost_usd               double precision NOT NULL,
    input_tokens           bigint NOT NULL,
    output_tokens          bigint NOT NULL,
    cache_read_tokens      bigint NOT NULL,
    cache_creation_tokens  bigint NOT NULL,
    lines_added            bigint NOT NULL,
    lines_removed          bigint NOT NULL,
    PRIMARY KEY (bucket, repository, branch, user_id, team_id)
);

CREATE TABLE IF NOT EXISTS repo_usage_1d (LIKE repo_usage_1h INCLUDING ALL);

-- Rollup rows covering [lo, hi): whole days from repo_usage_1d, the hours around them from
-- repo_usage_1h (an edge hour is read whole: hours are the finest grain here). Plain SQL, so
-- the planner inlines it and pushes the caller's filters into both branches.
CREATE OR REPLACE FUNCTION repo_usage_span(lo timestamptz, hi timestamptz) RETURNS SETOF repo_usage_1h
LANGUAGE sql STABLE AS $$
    SELECT * FROM repo_usage_1h WHERE bucket >= span_floor(lo, '1 hour') AND bucket < span_d1(lo, hi)
    UNION ALL
    SELECT * FROM repo_usage_1d WHERE bucket >= span_d1(lo, hi) AND bucket < span_d2(lo, hi)
    UNION ALL
    SELECT * FROM repo_usage_1h WHERE bucket >= span_d2(lo, hi) AND bucket < hi
$$;

-- Which sessions worked on which branch, when, and what they spent there.
CREATE TABLE IF NOT EXISTS repo_sessions (
    repository   text NOT NULL,
    branch       text NOT NULL,
    session_id   text NOT NULL,
    user_id      text NOT NULL,
    team_id      text NOT NULL,
    first_at     timestamptz NOT NULL,
    last_at      timestamptz NOT NULL,
    requests     bigint NOT NULL,
    cost_usd     double precision NOT NULL,
    lines_added  bigint NOT NULL,
    PRIMARY KEY (repository, branch, session_id)
);
CREATE INDEX IF NOT EXISTS repo_sessions_session ON repo_sessions (session_id);

-- Every source-control delivery projected (its event id makes a redelivery a no-op).
CREATE TABLE IF NOT EXISTS repository_events (
    event_id     uuid PRIMARY KEY,
    occurred_at  timestamptz NOT NULL,
    type         text NOT NULL,
    repository   text NOT NULL,
    data         jsonb NOT NULL
);

-- Each pull (merge) request as its newest delivery describes it.
CREATE TABLE IF NOT EXISTS pull_requests (
    repository   text NOT NULL,
    number       bigint NOT NULL,
    provider     text NOT NULL,
    state        text NOT NULL,
    head_branch  text NOT NULL,
    -- Where the head branch lives: '' for the pull request's own repository, else a fork.
    head_repository text NOT NULL DEFAULT '',
    base_branch  text NOT NULL DEFAULT '',
    title        text NOT NULL DEFAULT '',
    author       text NOT NULL DEFAULT '',
    url          text NOT NULL DEFAULT '',
    opened_at    timestamptz,
    merged_at    timestamptz,
    closed_at    timestamptz,
    updated_at   timestamptz NOT NULL,
    additions    bigint,
    deletions    bigint,
    PRIMARY KEY (repository, number)
);
CREATE INDEX IF NOT EXISTS pull_requests_branch ON pull_requests (repository, head_branch);
CREATE INDEX IF NOT EXISTS pull_requests_merged ON pull_requests (merged_at);

-- Each branch's latest push.
CREATE TABLE IF NOT EXISTS branch_pushes (
    repository   text NOT NULL,
    branch       text NOT NULL,
    pushed_at    timestamptz NOT NULL,
    after_sha    text NOT NULL DEFAULT '',
    pushes       bigint NOT NULL,
    commits      bigint NOT NULL,
    deleted      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (repository, branch)
);

-- A session's timeline reads its raw rows by session.
CREATE INDEX IF NOT EXISTS agent_interactions_session ON agent_interactions (session_id, occurred_at);
CREATE INDEX IF NOT EXISTS tool_executions_session ON tool_executions (session_id, occurred_at);
CREATE INDEX IF NOT EXISTS metric_samples_session ON metric_samples (session_id, occurred_at) WHERE session_id <> '';

-- Schemas made before: their agent usage, unattributed (no context was known then).
INSERT INTO session_usage (session_id, occurred_at, event_id, user_id, team_id, requests, cost_usd,
                           input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens)
SELECT session_id, occurred_at, event_id, user_id, team_id, 1, value, input_tokens, output_tokens,
       COALESCE((data->>'cache_read_tokens')::bigint, 0),
       COALESCE((data->>'cache_creation_tokens')::bigint, 0)
  FROM agent_interactions
    ON CONFLICT DO NOTHING;
INSERT INTO session_usage (session_id, occurred_at, event_id, user_id, team_id, tool_runs)
SELECT session_id, occurred_at, event_id, user_id, team_id, 1 FROM tool_executions
    ON CONFLICT DO NOTHING;
INSERT INTO repo_usage_1h
SELECT date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-03 00:00:00+00'), '', '', user_id, team_id,
       sum(requests), sum(tool_runs), sum(cost_usd), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
       sum(cache_creation_tokens), 0, 0
  FROM session_usage GROUP BY 1, 4, 5
    ON CONFLICT DO NOTHING;
INSERT INTO repo_usage_1d
SELECT date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-03 00:00:00+00'), repository, branch, user_id, team_id,
       sum(requests), sum(tool_runs), sum(cost_usd), sum(input_tokens), sum(output_tokens),
       sum(cache_read_tokens), sum(cache_creation_tokens), sum(lines_added), sum(lines_removed)
  FROM repo_usage_1h GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT DO NOTHING;
INSERT INTO repo_sessions
SELECT '', '', session_id, max(user_id), max(team_id), min(occurred_at), max(occurred_at),
       sum(requests), sum(cost_usd), 0
  FROM session_usage WHERE session_id <> '' GROUP BY session_id
    ON CONFLICT DO NOTHING;
