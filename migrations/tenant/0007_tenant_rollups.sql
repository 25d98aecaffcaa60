-- Tenant-wide rollups beside the per-key ones, so that the views of the whole tenant (the
-- overview and the time series of an owner, an admin or a read key) read a few rows per
-- bucket and event type instead of one per (user, team, project, name): their cost grows
-- with buckets, not with keys or events.
--
-- `activity_all_*`: the per-key rollups summed over user, team, project and name.
-- `active_users_*`: who sent something in each bucket, kept rather than recounted, so the
--   distinct users of a range are counted over (bucket, user) pairs.
-- Maintained in the projector's transaction with the per-key rollups, from the same rows.

CREATE TABLE IF NOT EXISTS activity_all_1m (
    bucket         timestamptz NOT NULL,
    event_type     text   NOT NULL,
    count          bigint NOT NULL,
    errors         bigint NOT NULL,
    duration_sum   bigint NOT NULL,
    duration_max   bigint NOT NULL,
    input_tokens   bigint NOT NULL,
    output_tokens  bigint NOT NULL,
    value_sum      double precision NOT NULL,
    duration_hist  bigint[] NOT NULL,
    PRIMARY KEY (bucket, event_type)
);
CREATE TABLE IF NOT EXISTS activity_all_1h (LIKE activity_all_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS activity_all_1d (LIKE activity_all_1m INCLUDING ALL);

CREATE TABLE IF NOT EXISTS active_users_1m (
    bucket   timestamptz NOT NULL,
    user_id  text NOT NULL,
    PRIMARY KEY (bucket, user_id)
);
CREATE TABLE IF NOT EXISTS active_users_1h (LIKE active_users_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS active_users_1d (LIKE active_users_1m INCLUDING ALL);

-- Schemas made before: built once from their per-key rollups.
INSERT INTO activity_all_1m
SELECT bucket, event_type, sum(count), sum(errors), sum(duration_sum), max(duration_max),
       sum(input_tokens), sum(output_tokens), sum(value_sum), control.hist_sum(duration_hist)
  FROM activity_1m GROUP BY bucket, event_type
    ON CONFLICT DO NOTHING;
INSERT INTO activity_all_1h
SELECT bucket, event_type, sum(count), sum(errors), sum(duration_sum), max(duration_max),
       sum(input_tokens), sum(output_tokens), sum(value_sum), control.hist_sum(duration_hist)
  FROM activity_1h GROUP BY bucket, event_type
    ON CONFLICT DO NOTHING;
INSERT INTO activity_all_1d
SELECT bucket, event_type, sum(count), sum(errors), sum(duration_sum), max(duration_max),
       sum(input_tokens), sum(output_tokens), sum(value_sum), control.hist_sum(duration_hist)
  FROM activity_1d GROUP BY bucket, event_type
    ON CONFLICT DO NOTHING;
INSERT INTO active_users_1m SELECT DISTINCT bucket, user_id FROM activity_1m WHERE user_id <> ''
    ON CONFLICT DO NOTHING;
INSERT INTO active_users_1h SELECT DISTINCT bucket, user_id FROM activity_1h WHERE user_id <> ''
    ON CONFLICT DO NOTHING;
INSERT INTO active_users_1d SELECT DISTINCT bucket, user_id FROM activity_1d WHERE user_id <> ''
    ON CONFLICT DO NOTHING;

-- Their spans, as `activity_hours` / `activity_days` (0005) for the per-key rollups.
CREATE OR REPLACE FUNCTION activity_all_hours(lo timestamptz, hi timestamptz) RETURNS SETOF activity_all_1m
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_all_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM activity_all_1h WHERE bucket >= span_h1(lo, hi) AND bucket < span_hh2(lo, hi)
    UNION ALL
    SELECT * FROM activity_all_1m WHERE bucket >= span_hh2(lo, hi) AND bucket < hi
$$;

CREATE OR REPLACE FUNCTION activity_all_days(lo timestamptz, hi timestamptz) RETURNS SETOF activity_all_1m
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_all_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM activity_all_1h WHERE bucket >= span_h1(lo, hi) AND bucket < span_d1(lo, hi)
    UNION ALL
    SELECT * FROM activity_all_1d WHERE bucket >= span_d1(lo, hi) AND bucket < span_d2(lo, hi)
    UNION ALL
    SELECT * FROM activity_all_1h WHERE bucket >= span_d2(lo, hi) AND bucket < span_h2(lo, hi)
    UNION ALL
    SELECT * FROM activity_all_1m WHERE bucket >= span_h2(lo, hi) AND bucket < hi
$$;

CREATE OR REPLACE FUNCTION active_users_hours(lo timestamptz, hi timestamptz) RETURNS SETOF active_users_1m
LANGUAGE sql STABLE AS $$
    SELECT * FROM active_users_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM active_users_1h WHERE bucket >= span_h1(lo, hi) AND bucket < span_hh2(lo, hi)
    UNION ALL
    SELECT * FROM active_users_1m WHERE bucket >= span_hh2(lo, hi) AND bucket < hi
$$;

CREATE OR REPLACE FUNCTION active_users_days(lo timestamptz, hi timestamptz) RETURNS SETOF active_users_1m
LANGUAGE sql STABLE AS $$
    SELECT * FROM active_users_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM active_users_1h WHERE bucket >= span_h1(lo, hi) AND bucket < span_d1(lo, hi)
    UNION ALL
    SELECT * FROM active_users_1d WHERE bucket >= span_d1(lo, hi) AND bucket < span_d2(lo, hi)
    UNION ALL
    SELECT * FROM active_users_1h WHERE bucket >= span_d2(lo, hi) AND bucket < span_h2(lo, hi)
    UNION ALL
    SELECT * FROM active_users_1m WHERE bucket >= span_h2(lo, hi) AND bucket < hi
$$;
