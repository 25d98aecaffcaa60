-- Every raw event of the tenant in one relation, with its event type: what the activity feed
-- and the live feed read. Filters on the columns (time, type, user) are pushed down into each
-- branch, so partitions and branches that cannot match are skipped.
CREATE VIEW activity_events AS
    SELECT event_id, occurred_at, received_at, 'command.executed'::text AS event_type, user_id,
           team_id, project_id, session_id, name, status, duration_ms, input_tokens,
           output_tokens, value
      FROM command_executions
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'agent.interacted', user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value
      FROM agent_interactions
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'tool.executed', user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value
      FROM tool_executions
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'session.' || name, user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value
      FROM session_events
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'productivity.recorded', user_id, team_id,
           project_id, session_id, name, status, duration_ms, input_tokens, output_tokens, value
      FROM productivity_metrics
    UNION ALL
    SELECT event_id, occurred_at, received_at, 'metric.sample', user_id, team_id, project_id,
           session_id, name, status, duration_ms, input_tokens, output_tokens, value
      FROM metric_samples;
