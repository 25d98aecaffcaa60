-- Rollup rows covering [lo, hi) read from the coarsest rollups that tile it exactly: whole days
-- from activity_1d, the whole hours around them from activity_1h, the minutes at the very
-- edges from activity_1m. A 30-day range that does not start on midnight reads ~30 daily
-- and ≤ 46 hourly and ≤ 118 minute buckets per key instead of 43 200 minute buckets.
-- `activity_hours` stops at hours (for hourly time-series buckets). Boundaries are UTC and
-- epoch-aligned like every bucket (date_bin). Both functions are plain SQL, so the planner
-- inlines them and pushes the caller's filters into each branch.

CREATE FUNCTION span_floor(t timestamptz, g interval) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT date_bin(g, t, TIMESTAMPTZ '2000-01-03 00:00:00+00')
$$;

CREATE FUNCTION span_ceil(t timestamptz, g interval) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN span_floor(t, g) = t THEN t ELSE span_floor(t, g) + g END
$$;

-- x limited to [a, b]
CREATE FUNCTION span_clamp(x timestamptz, a timestamptz, b timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT least(greatest(x, a), b)
$$;

-- The edges: lo ≤ h1 (first whole hour) ≤ d1 (first whole day) ≤ d2 (end of the last whole
-- day) ≤ h2 (end of the last whole hour) ≤ hi; and hh2, the end of the last whole hour after h1.
CREATE FUNCTION span_h1(lo timestamptz, hi timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT span_clamp(span_ceil(lo, '1 hour'), lo, hi) $$;
CREATE FUNCTION span_d1(lo timestamptz, hi timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT span_clamp(span_ceil(lo, '1 day'), span_h1(lo, hi), hi) $$;
CREATE FUNCTION span_d2(lo timestamptz, hi timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT span_clamp(span_floor(hi, '1 day'), span_d1(lo, hi), hi) $$;
CREATE FUNCTION span_h2(lo timestamptz, hi timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT span_clamp(span_floor(hi, '1 hour'), span_d2(lo, hi), hi) $$;
CREATE FUNCTION span_hh2(lo timestamptz, hi timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT span_clamp(span_floor(hi, '1 hour'), span_h1(lo, hi), hi) $$;

CREATE FUNCTION activity_hours(lo timestamptz, hi timestamptz) RETURNS SETOF activity_1m
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM activity_1h WHERE bucket >= span_h1(lo, hi) AND bucket < span_hh2(lo, hi)
    UNION ALL
    SELECT * FROM activity_1m WHERE bucket >= span_hh2(lo, hi) AND bucket < hi
$$;

CREATE FUNCTION activity_days(lo timestamptz, hi timestamptz) RETURNS SETOF activity_1m
LANGUAGE sql STABLE AS $$
    SELECT * FROM activity_1m WHERE bucket >= lo AND bucket < span_h1(lo, hi)
    UNION ALL
    SELECT * FROM activity_1h WHERE bucket >= span_h1(lo, hi) AND bucket < span_d1(lo, hi)
    UNION ALL
    SELECT * FROM activity_1d WHERE bucket >= span_d1(lo, hi) AND bucket < span_d2(lo, hi)
    UNION ALL
    SELECT * FROM activity_1h WHERE bucket >= span_d2(lo, hi) AND bucket < span_h2(lo, hi)
    UNION ALL
    SELECT * FROM activity_1m WHERE bucket >= span_h2(lo, hi) AND bucket < hi
$$;
