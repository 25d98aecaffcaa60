-- A replay's bulk load drops the raw tables' secondary indexes and builds them again at the
-- end from the definitions `pg_get_indexdef` gave. For a partitioned table that text reads
-- `CREATE INDEX … ON ONLY table …`, and before this template the replay ran it as it was:
-- it made each parent's index alone, invalid (the planner does not use an invalid index),
-- and none on the partitions. A replayed schema's live feed (by feed position), session
-- lookups and time-and-user scans then read every partition whole. Partitions made after
-- the replay got their own indexes, but the parents stayed invalid.
--
-- This rebuilds every invalid partitioned index of the schema on the whole table: dropped
-- (with what partitions have of it) and made again without ONLY. The replay now builds them
-- so itself (`schema::create_indexes`). A schema without such an index is untouched; with
-- TimescaleDB there are none (a hypertable's indexes are ordinary ones). Idempotent, like
-- every template. It writes each table's rows once per index, under the table's lock: an
-- upgrade of a large replayed tenant takes that long, once.
DO $$
DECLARE
    ix record;
BEGIN
    FOR ix IN
        SELECT c.relname, pg_get_indexdef(i.indexrelid) AS def
          FROM pg_index i
          JOIN pg_class c ON c.oid = i.indexrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind = 'I' AND NOT i.indisvalid
         ORDER BY c.relname
    LOOP
        EXECUTE format('DROP INDEX %I', ix.relname);
        EXECUTE replace(ix.def, ' ON ONLY ', ' ON ');
    END LOOP;
END $$;
