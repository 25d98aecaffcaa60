-- The sum of many duration histograms (`hist_add` folded over a set), for building the
-- tenant-wide rollups of schemas made before they existed (tenant template 0007).
CREATE AGGREGATE control.hist_sum(bigint[]) (
    SFUNC = control.hist_add,
    STYPE = bigint[],
    INITCOND = '{}'
);
