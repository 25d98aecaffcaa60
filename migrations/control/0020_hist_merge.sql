-- Sums of duration histograms that stay sparse, for the compactor's fold (issue 14, goal 1).
--
-- `hist_add` always answers a dense 1-based array, so in a fold every sum after the first
-- loops over forty or so buckets, and `hist_sum` calls it once per row even for a key with
-- one pending row (from its initial `'{}'`). `hist_merge` answers only the span from the
-- lower of its arguments' first buckets to the higher of their last (its lower bound the
-- first's, as the pending rows' are: `'[25:27]={1,0,2}'`), so sums of sums loop over a few
-- buckets too; it is strict, so `hist_merge_sum`, which has no initial value, takes a
-- group's first histogram as it is and calls it only from the second row on. Its sums are
-- sparse: what is stored in the folded tables goes through the tenant's `hist_dense` first.
-- Histograms hold no NULLs; a missing bucket is zero.
CREATE OR REPLACE FUNCTION control.hist_merge(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    r bigint[];
    s bigint[];
BEGIN
    IF cardinality(a) = 0 THEN
        RETURN b;
    ELSIF cardinality(b) = 0 THEN
        RETURN a;
    END IF;
    -- r reaches further up; s is added into it over its own span.
    IF array_upper(a, 1) >= array_upper(b, 1) THEN
        r := a;
        s := b;
    ELSE
        r := b;
        s := a;
    END IF;
    -- r made to start where s does, if s starts lower.
    IF array_lower(s, 1) < array_lower(r, 1) THEN
        r := array_fill(0::bigint, ARRAY[array_lower(r, 1) - array_lower(s, 1)],
                        ARRAY[array_lower(s, 1)]) || r;
    END IF;
    FOR i IN array_lower(s, 1) .. array_upper(s, 1) LOOP
        r[i] := r[i] + s[i];
    END LOOP;
    RETURN r;
END
$$;

CREATE OR REPLACE AGGREGATE control.hist_merge_sum(bigint[]) (
    SFUNC = control.hist_merge,
    STYPE = bigint[]
);
