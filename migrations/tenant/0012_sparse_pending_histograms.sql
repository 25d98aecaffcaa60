-- Pending per-key rows carry sparse histograms (issue 14, goal 1): a batch appends only the
-- span of a row's non-empty buckets, as an array whose lower bound is its first bucket's
-- (`'[25:27]={1,0,2}'`), so that `COPY` parses and the fold (`control.hist_add`, which takes
-- either form) merges a few buckets instead of the forty or so up to the last non-empty
-- one. Readers see dense 1-based histograms, as before: the views that read pending rows
-- give them back through `hist_dense`. Idempotent, like every template.
CREATE OR REPLACE FUNCTION hist_dense(h bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN array_lower(h, 1) > 1
                THEN array_fill(0::bigint, ARRAY[array_lower(h, 1) - 1]) || h
                ELSE h END
$$;

CREATE OR REPLACE VIEW activity_1m AS
    SELECT * FROM activity_1m_folded
    UNION ALL
    SELECT bucket, event_type, user_id, team_id, project_id, name, count, errors, duration_sum,
           duration_max, input_tokens, output_tokens, value_sum, hist_dense(duration_hist)
      FROM activity_1m_pending;
CREATE OR REPLACE VIEW activity_1h_unfolded AS
    SELECT date_bin('1 hour', bucket, TIMESTAMPTZ 'epoch') AS bucket, event_type, user_id,
           team_id, project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, hist_dense(duration_hist) AS duration_hist
      FROM activity_1m_pending;
CREATE OR REPLACE VIEW activity_1d_unfolded AS
    SELECT date_bin('1 day', bucket, TIMESTAMPTZ 'epoch') AS bucket, event_type, user_id,
           team_id, project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, hist_dense(duration_hist) AS duration_hist
      FROM activity_1m_pending;
