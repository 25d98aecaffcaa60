-- The hour's and the day's unfolded rows are read by the minute's own bucket (issue 14, goal 1).
--
-- Since 0011, `activity_1m_pending` had an index by hour and one by day (`date_bin` of its
-- bucket) beside its key, so that a reader of the hour's or the day's view found its range's
-- pending rows. Every batch's `COPY` of per-key minute rows maintained all three: in `psql`,
-- 5 000 rows of a backfill took 87 ms with the three and 67 ms with the key alone, and a
-- backfill appends nearly a pending row per event. A pending minute row lies in the hour
-- [h, h + 1 h) exactly when its own bucket does, and likewise for a day, so a range of whole
-- hours or days finds its rows through the key's leading column, the minute's bucket. The
-- span functions and privacy mode's cells below now read the folded tables and the pending
-- rows that way, and query-api reads whole hours and days through them. The views `activity_1h` and `activity_1d`
-- stay, with the same rows; only a range on their widened bucket no longer finds an index.
-- The key index stays: readers filter on it, and it refuses a key too wide for a btree in
-- its batch (54000), where its event can be dead-lettered, before the fold meets it.
-- Idempotent, like every template.
DROP INDEX IF EXISTS activity_1m_pending_hour;
DROP INDEX IF EXISTS activity_1m_pending_day;

-- The per-key rows of the hour buckets in [lo, hi): the folded hours and the pending minutes
-- widened to theirs, as `activity_1h` has them. A minute's hour is in [lo, hi) exactly when the
-- minute is in [lo, hi) with both bounds rounded up to whole hours. query-api passes whole
-- hours; `activity_days` may pass an `hi` within an hour (a range over 2 hours that does not
-- cross UTC midnight), whose whole hour both halves then read, as the view did.
CREATE OR REPLACE FUNCTION activity_whole_hours(lo timestamptz, hi timestamptz)
RETURNS SETOF activity_1m_folded
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_1h_folded WHERE bucket >= lo AND bucket < hi
    UNION ALL
    SELECT date_bin('1 hour', bucket, TIMESTAMPTZ 'epoch'), event_type, user_id, team_id,
           project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, hist_dense(duration_hist)
      FROM activity_1m_pending
     WHERE bucket >= span_ceil(lo, '1 hour') AND bucket < span_ceil(hi, '1 hour')
$$;

-- The same in day buckets, as `activity_1d` has them.
CREATE OR REPLACE FUNCTION activity_whole_days(lo timestamptz, hi timestamptz)
RETURNS SETOF activity_1m_folded
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_1d_folded WHERE bucket >= lo AND bucket < hi
    UNION ALL
    SELECT date_bin('1 day', bucket, TIMESTAMPTZ 'epoch'), event_type, user_id, team_id,
           project_id, name, count, errors, duration_sum, duration_max, input_tokens,
           output_tokens, value_sum, hist_dense(duration_hist)
      FROM activity_1m_pending
     WHERE bucket >= span_ceil(lo, '1 day') AND bucket < span_ceil(hi, '1 day')
$$;

-- 0005's spans, with their whole hours and days read as above. Their rows are of the type of
-- 0005's table `activity_1m`, which 0010 renamed `activity_1m_folded`.
CREATE OR REPLACE FUNCTION activity_hours(lo timestamptz, hi timestamptz) RETURNS SETOF activity_1m_folded
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM activity_whole_hours(span_h1(lo, hi), span_hh2(lo, hi))
    UNION ALL
    SELECT * FROM activity_1m WHERE bucket >= span_hh2(lo, hi) AND bucket < hi
$$;

CREATE OR REPLACE FUNCTION activity_days(lo timestamptz, hi timestamptz) RETURNS SETOF activity_1m_folded
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM activity_whole_hours(span_h1(lo, hi), span_d1(lo, hi))
    UNION ALL
    SELECT * FROM activity_whole_days(span_d1(lo, hi), span_d2(lo, hi))
    UNION ALL
    SELECT * FROM activity_whole_hours(span_d2(lo, hi), span_h2(lo, hi))
    UNION ALL
    SELECT * FROM activity_1m WHERE bucket >= span_h2(lo, hi) AND bucket < hi
$$;

-- 0009's privacy cells, with their whole days read as above (its readers' ranges are whole
-- days that have ended).
CREATE OR REPLACE FUNCTION private_cells(lo timestamptz, hi timestamptz, k integer,
                                         ids text[], teams text[])
RETURNS TABLE (bucket timestamptz, team_id text, event_type text)
LANGUAGE sql STABLE AS $$
    SELECT a.bucket, a.team_id, a.event_type
      FROM activity_whole_days(lo, hi) a
      JOIN unnest(ids, teams) AS m(id, team) ON m.id = a.user_id AND m.team = a.team_id
     WHERE a.bucket >= lo AND a.bucket < hi
     GROUP BY 1, 2, 3
    HAVING count(DISTINCT a.user_id) >= k
$$;
