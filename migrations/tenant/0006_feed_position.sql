-- The live feed's position: every raw row carries the projector transaction that wrote it
-- (`feed_seq`, the tenant's `projection_state.seq` of that transaction) and its ordinal in
-- that transaction's rows (`feed_ord`). The projector takes `projection_state`'s row lock
-- before it writes a tenant's rows, so one tenant's transactions commit in `feed_seq` order:
-- a reader that has seen position p will never later find a committed row below p. (A
-- bigserial would not do: sequence values are handed out in call order, not commit order.)
-- Rows written before this column existed have no position (NULL) and are not in the feed.

ALTER TABLE command_executions ADD COLUMN IF NOT EXISTS feed_seq bigint, ADD COLUMN IF NOT EXISTS feed_ord integer;
ALTER TABLE agent_interactions ADD COLUMN IF NOT EXISTS feed_seq bigint, ADD COLUMN IF NOT EXISTS feed_ord integer;
ALTER TABLE tool_executions ADD COLUMN IF NOT EXISTS feed_seq bigint, ADD COLUMN IF NOT EXISTS feed_ord integer;
ALTER TABLE session_events ADD COLUMN IF NOT EXISTS feed_seq bigint, ADD COLUMN IF NOT EXISTS feed_ord integer;
ALTER TABLE productivity_metrics ADD COLUMN IF NOT EXISTS feed_seq bigint, ADD COLUMN IF NOT EXISTS feed_ord integer;
ALTER TABLE metric_samples ADD COLUMN IF NOT EXISTS feed_seq bigint, ADD COLUMN IF NOT EXISTS feed_ord integer;

CREATE INDEX IF NOT EXISTS command_executions_feed_idx ON command_executions (feed_seq, feed_ord);
CREATE INDEX IF NOT EXISTS agent_interactions_feed_idx ON agent_interactions (feed_seq, feed_ord);
CREATE INDEX IF NOT EXISTS tool_executions_feed_idx ON tool_executions (feed_seq, feed_ord);
CREATE INDEX IF NOT EXISTS session_events_feed_idx ON session_events (feed_seq, feed_ord);
CREATE INDEX IF NOT EXISTS productivity_metrics_feed_idx ON productivity_metrics (feed_seq, feed_ord);
CREATE INDEX IF NOT EXISTS metric_samples_feed_idx ON metric_samples (feed_seq, feed_ord);

-- The same view with the position appended (CREATE OR REPLACE may only add columns at the end).
CREATE OR REPLACE VIEW activity_events AS
    SELECT event_id, occurred_at, received_at, 'command.executed'::text AS event_type, user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value, feed_seq,
           feed_ord
      FROM command_executions
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'agent.interacted', user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value, feed_seq,
           feed_ord
      FROM agent_interactions
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'tool.executed', user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value, feed_seq,
           feed_ord
      FROM tool_executions
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'session.' || name, user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value, feed_seq,
           feed_ord
      FROM session_events
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'productivity.recorded', user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value, feed_seq,
           feed_ord
      FROM productivity_metrics
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'metric.sample', user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value, feed_seq,
           feed_ord
      FROM metric_samples;
