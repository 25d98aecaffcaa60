-- Usage no context places is read from the raw rows (issue 14, goal 1).
--
-- Since 0008 every usage row (an agent interaction, a tool run, a delta of Claude Code's lines
-- of code) was also stored in `session_usage`, keyed by session and time, so that a context
-- arriving later could find and move it. Its key made the usage statement the projector's
-- largest after the raw `COPY`s (about a quarter of a live drain's statement time; inserting
-- 2 400 rows took 37 ms in `psql` with the key, 6.5 ms without), for rows a sender without
-- the hook never places and no reader asks for one by one. The raw tables already keep an
-- index by session and time, so `usage_rows` below gives the same rows from them, and
-- `session_usage` keeps only the rows some context has placed (in a repository, or on a
-- branch of a repository without a remote): the rows the pull-request views read. A usage
-- row absent from it is unplaced (repository and branch ''). The projector keeps the two in
-- step: it stores a row when a context places it, moves it, and deletes it when a later
-- context leaves it nowhere. (Two raw rows of different types with one event id, which only
-- a sender reusing ids makes, are both counted in the rollups, as `usage_rows` gives them;
-- template 0016 puts the kind in `session_usage`'s key so that both are stored and moved.)
-- Idempotent, like every template.

-- The usage of every raw row, as the projector's `Usage::of` computes it: agent interactions
-- (a request, its cost and tokens), tool runs, and delta points of Claude Code's lines-of-code
-- counter, rounded half away from zero. The doors accept the cache token counts only as
-- integers in 0..=1 000 000; anything else here reads as 0, as `as_i64` does, and never fails.
-- A caller's filter on session and time reaches each branch's index by session and time
-- (`metric_samples`' only for a non-empty session: say `session_id <> ''`).
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
       0::bigint AS lines_added, 0::bigint AS lines_removed
  FROM agent_interactions
UNION ALL
SELECT session_id, occurred_at, event_id, user_id, team_id, 0, 1, 0::float8, 0, 0, 0, 0, 0, 0
  FROM tool_executions
UNION ALL
SELECT session_id, occurred_at, event_id, user_id, team_id, 0, 0, 0::float8, 0, 0, 0, 0,
       CASE WHEN data #>> '{labels,type}' = 'added' AND value >= 0 AND value <= 1e9
            THEN (floor(value) + CASE WHEN value - floor(value) >= 0.5 THEN 1 ELSE 0 END)::bigint
            ELSE 0 END,
       CASE WHEN data #>> '{labels,type}' = 'removed' AND value >= 0 AND value <= 1e9
            THEN (floor(value) + CASE WHEN value - floor(value) >= 0.5 THEN 1 ELSE 0 END)::bigint
            ELSE 0 END
  FROM metric_samples
 WHERE name = 'claude_code.lines_of_code.count'
   AND data #>> '{extra,temporality}' = 'delta'
   AND data #>> '{labels,type}' IN ('added', 'removed')
   AND value >= 0 AND value <= 1e9;

DELETE FROM session_usage WHERE repository = '' AND branch = '';
