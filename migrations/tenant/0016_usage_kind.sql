-- A usage row is known by its kind as well as its session, time and event id (issue 14).
--
-- The raw tables keep an event id once per table, so a sender reusing one id for an agent
-- interaction and a tool run at the same time in the same session has two usage rows under one
-- `session_usage` key (template 0015 reads them both from the raw rows): one could not be
-- stored, and a later move would take the other's place for its own. The kind (1 an agent
-- interaction, 2 a tool run, 3 lines of code) joins the key, derived from the amounts, which
-- tell them apart: an interaction always counts a request, a tool run a tool run.
-- Idempotent, like every template.

ALTER TABLE session_usage ADD COLUMN IF NOT EXISTS kind smallint NOT NULL
    GENERATED ALWAYS AS ((CASE WHEN requests <> 0 THEN 1 WHEN tool_runs <> 0 THEN 2
                               ELSE 3 END)::smallint) STORED;

DO $$
BEGIN
    IF (SELECT array_length(conkey, 1) FROM pg_constraint
         WHERE conrelid = 'session_usage'::regclass AND contype = 'p') = 3 THEN
        ALTER TABLE session_usage DROP CONSTRAINT session_usage_pkey,
            ADD CONSTRAINT session_usage_pkey PRIMARY KEY (session_id, occurred_at, event_id, kind);
    END IF;
END
$$;

-- `usage_rows` (template 0015) with each row's kind, as `session_usage` derives it.
CREATE OR REPLACE VIEW usage_rows AS
SELECT session_id, occurred_at, event_id, user_id, team_id,
       1::bigint AS requests, 0::bigint AS tool_runs, value AS cost_usd, input_tokens,
       output_tokens,
       CASE WHEN jsonb_typeof(data -> 'cache_read_tokens') = 'number'
                 AND (data ->> 'cache_read_tokens') ~ '^-?[0-9]{1,18}$'
            THEN (data ->> 'cache_read_tokens')::bigint ELSE 0 END AS cache_read_tokens,
       CASE WHEN jsonb_typeof(data -> 'cache_creation_tokens') = 'number'
                 AND (data ->> 'cache_creation_tokens') ~ '^-?[0-9]{1,18}$'
            THEN (data ->> 'cache_creation_tokens')::bigint ELSE 0 END AS cache_creation_tokens,
       0::bigint AS lines_added, 0::bigint AS lines_removed, 1::smallint AS kind
  FROM agent_interactions
UNION ALL
SELECT session_id, occurred_at, event_id, user_id, team_id, 0, 1, 0::float8, 0, 0, 0, 0, 0, 0,
       2::smallint
  FROM tool_executions
UNION ALL
SELECT session_id, occurred_at, event_id, user_id, team_id, 0, 0, 0::float8, 0, 0, 0, 0,
       CASE WHEN data #>> '{labels,type}' = 'added' AND value >= 0 AND value <= 1e9
            THEN (floor(value) + CASE WHEN value - floor(value) >= 0.5 THEN 1 ELSE 0 END)::bigint
            ELSE 0 END,
       CASE WHEN data #>> '{labels,type}' = 'removed' AND value >= 0 AND value <= 1e9
            THEN (floor(value) + CASE WHEN value - floor(value) >= 0.5 THEN 1 ELSE 0 END)::bigint
            ELSE 0 END,
       3::smallint
  FROM metric_samples
 WHERE name = 'claude_code.lines_of_code.count'
   AND data #>> '{extra,temporality}' = 'delta'
   AND data #>> '{labels,type}' IN ('added', 'removed')
   AND value >= 0 AND value <= 1e9;
