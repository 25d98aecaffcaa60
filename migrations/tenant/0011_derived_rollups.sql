-- Hourly and daily per-key rollups derived from the minute's deltas (issue 14, goal 1).
--
-- Since 0010 a batch appended its per-key deltas three times, once per grain, and at live
-- traffic's spread of keys each COPY carried nearly a row per event: the hour's and the day's
-- cost a batch as much as the minute's. Now a batch appends only the minute's, and the
-- compactor folds each pending minute row into all three grains, in the statement that
-- deletes it (`rollups::compact`). Until then the hour's and the day's views read the minute's
-- pending rows with their buckets widened (`date_bin` from the epoch, as the projector buckets
-- them; indexed, so that a reader's range finds them), and a reader sees every event once in
-- every grain before, during and after a fold.
--
-- Applied to a schema of template 0010 (under the schema's lock, with the upgrade): the deltas
-- waiting there were appended to every grain, so each pending table is first folded into its
-- own grain only, as 0010 folded them; then `activity_1h_pending` and `activity_1d_pending`
-- are dropped, so that a projector older than this template fails loudly on this schema (its
-- batches and folds are retried, not half applied) instead of counting an hour twice.
-- Idempotent, like every template.
DO $$
DECLARE
    g text;
BEGIN
    IF to_regclass('activity_1h_pending') IS NOT NULL THEN
        -- A batch of a projector of 0010 still writing appends to all three: wait for it,
        -- and keep the next out until the tables are gone.
        LOCK TABLE activity_1m_pending, activity_1h_pending, activity_1d_pending
            IN SHARE ROW EXCLUSIVE MODE;
        FOREACH g IN ARRAY ARRAY['1m', '1h', '1d'] LOOP
            EXECUTE format(
                'WITH moved AS (DELETE FROM activity_%1$s_pending RETURNING *)
                 INSERT INTO activity_%1$s_folded AS a
                 SELECT bucket, event_type, user_id, team_id, project_id, name, sum(count),
                        sum(errors), sum(duration_sum), max(duration_max), sum(input_tokens),
                        sum(output_tokens), sum(value_sum), hist_sum(duration_hist)
                   FROM moved GROUP BY bucket, event_type, user_id, team_id, project_id, name
                 ON CONFLICT (bucket, event_type, user_id, team_id, project_id, name)
                 DO UPDATE SET count = a.count + EXCLUDED.count,
                    errors = a.errors + EXCLUDED.errors,
                    duration_sum = a.duration_sum + EXCLUDED.duration_sum,
                    duration_max = GREATEST(a.duration_max, EXCLUDED.duration_max),
                    input_tokens = a.input_tokens + EXCLUDED.input_tokens,
                    output_tokens = a.output_tokens + EXCLUDED.output_tokens,
                    value_sum = a.value_sum + EXCLUDED.value_sum,
                    duration_hist = hist_add(a.duration_hist, EXCLUDED.duration_hist)', g);
        END LOOP;
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS activity_1m_pending_hour
    ON activity_1m_pending (date_bin('1 hour', bucket, TIMESTAMPTZ 'epoch'));
CREATE INDEX IF NOT EXISTS activity_1m_pending_day
    ON activity_1m_pending (date_bin('1 day', bucket, TIMESTAMPTZ 'epoch'));

CREATE OR REPLACE VIEW activity_1h_unfolded AS
    SELECT date_bin('1 hour', bucket, TIMESTAMPTZ 'epoch') AS bucket, event_type, user_id,
           team_id, project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, duration_hist
      FROM activity_1m_pending;
CREATE OR REPLACE VIEW activity_1d_unfolded AS
    SELECT date_bin('1 day', bucket, TIMESTAMPTZ 'epoch') AS bucket, event_type, user_id,
           team_id, project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, duration_hist
      FROM activity_1m_pending;

CREATE OR REPLACE VIEW activity_1h AS
    SELECT * FROM activity_1h_folded UNION ALL SELECT * FROM activity_1h_unfolded;
CREATE OR REPLACE VIEW activity_1d AS
    SELECT * FROM activity_1d_folded UNION ALL SELECT * FROM activity_1d_unfolded;

DROP TABLE IF EXISTS activity_1h_pending;
DROP TABLE IF EXISTS activity_1d_pending;
