-- Hourly and daily per-key rollups derived from the minute's deltas (issue 14, goal 1).
--
-- Since 0010 a batch appended its per-key deltas three times, once per grain, and at live
-- traffic's spread of keys each COPY carried nearly a row per event: the hour's and the day's
-- cost a batch as much as the minute's. Now a batch appends only the minute's, and the
-- compactor folds each pending minute row into all three grains, in the transaction that
-- deletes it (`rollups::compact`). Until then the hour's and the day's views read the minute's
-- pending rows with their buckets widened (`date_bin` from the epoch, as the projector buckets
-- them), so a reader sees every event once in every grain before, during and after a fold.
--
-- `activity_1h_pending` and `activity_1d_pending` stay, read and folded as before: deltas a
-- projector of template 0010 appended are not lost. Idempotent, like every template.
CREATE OR REPLACE VIEW activity_1h_unfolded AS
    SELECT * FROM activity_1h_pending
    UNION ALL
    SELECT date_bin('1 hour', bucket, TIMESTAMPTZ 'epoch'), event_type, user_id, team_id,
           project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, duration_hist
      FROM activity_1m_pending;
CREATE OR REPLACE VIEW activity_1d_unfolded AS
    SELECT * FROM activity_1d_pending
    UNION ALL
    SELECT date_bin('1 day', bucket, TIMESTAMPTZ 'epoch'), event_type, user_id, team_id,
           project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, duration_hist
      FROM activity_1m_pending;

CREATE OR REPLACE VIEW activity_1h AS
    SELECT * FROM activity_1h_folded UNION ALL SELECT * FROM activity_1h_unfolded;
CREATE OR REPLACE VIEW activity_1d AS
    SELECT * FROM activity_1d_folded UNION ALL SELECT * FROM activity_1d_unfolded;
