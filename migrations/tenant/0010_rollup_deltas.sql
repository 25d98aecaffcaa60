-- Per-key rollups written by COPY instead of per-row upserts (issue 14, goal 1).
--
-- A batch used to upsert one row per (bucket, type, user, team, project, name) and grain,
-- each an index probe, a row lock and a histogram merge: about 20–25 µs a row, and a batch
-- of a busy tenant writes about as many such rows as it has events. Appending costs a third
-- of that, so:
--
-- `activity_1m`: append-only. A key may have a row per batch that touched it in that minute;
--   every reader sums (the rows are few: at most one per batch and key, and minutes are
--   read over hours at most).
-- `activity_1h`, `activity_1d`: views of two tables each. A batch appends its deltas to
--   `activity_1h_pending`; the projector's compactor moves them into `activity_1h_folded`
--   (one row per key, summed and merged) every few seconds, in one transaction, so a reader
--   always sees every event once: the view is read in one statement, under one snapshot.
--
-- The tenant-wide cubes (`activity_all_*`) and active users are still upserted by each
-- batch: they are small, and their sums are where an overflowing value is refused.

-- Its key stays indexed, not unique: for the readers' ranges and filters, and so that a
-- key too wide for a btree (54000) is refused with its batch, as the hour's and the day's
-- folded keys would refuse it later, when no event could be dead-lettered for it.
ALTER TABLE activity_1m DROP CONSTRAINT IF EXISTS activity_1m_pkey;
CREATE INDEX IF NOT EXISTS activity_1m_key
    ON activity_1m (bucket, event_type, user_id, team_id, project_id, name);

-- Idempotent, like every template (a schema may be taken back to an older template version
-- and brought forward again).
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('activity_1h')) = 'r' THEN
        ALTER TABLE activity_1h RENAME TO activity_1h_folded;
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('activity_1d')) = 'r' THEN
        ALTER TABLE activity_1d RENAME TO activity_1d_folded;
    END IF;
END $$;
-- The deltas: no key (a batch appends, the compactor deletes what it folds), an index for
-- the readers' time ranges.
CREATE TABLE IF NOT EXISTS activity_1h_pending (LIKE activity_1h_folded INCLUDING DEFAULTS);
CREATE TABLE IF NOT EXISTS activity_1d_pending (LIKE activity_1d_folded INCLUDING DEFAULTS);
CREATE INDEX IF NOT EXISTS activity_1h_pending_bucket ON activity_1h_pending (bucket);
CREATE INDEX IF NOT EXISTS activity_1d_pending_bucket ON activity_1d_pending (bucket);

CREATE OR REPLACE VIEW activity_1h AS
    SELECT * FROM activity_1h_folded UNION ALL SELECT * FROM activity_1h_pending;
CREATE OR REPLACE VIEW activity_1d AS
    SELECT * FROM activity_1d_folded UNION ALL SELECT * FROM activity_1d_pending;
