-- Privacy mode's cells (issue 17): the (UTC day, team, event type) cells of [lo, hi) in
-- which at least k people sent events of that type. A person counts only as a member the
-- control plane knows: `ids[i]` belongs to team `teams[i]` (query-api passes every active
-- member's user id with each of their teams, '' for none), so user ids a sender makes up, or
-- a team it names for someone outside it, add nobody. Readers who see only aggregates are
-- answered from these cells alone, over whole days, from the daily rollups.
CREATE OR REPLACE FUNCTION private_cells(lo timestamptz, hi timestamptz, k integer,
                                         ids text[], teams text[])
RETURNS TABLE (bucket timestamptz, team_id text, event_type text)
LANGUAGE sql STABLE AS $$
    SELECT a.bucket, a.team_id, a.event_type
      FROM activity_1d a
      JOIN unnest(ids, teams) AS m(id, team) ON m.id = a.user_id AND m.team = a.team_id
     WHERE a.bucket >= lo AND a.bucket < hi
     GROUP BY 1, 2, 3
    HAVING count(DISTINCT a.user_id) >= k
$$;
