-- A replay's bulk load drops the raw tables' secondary indexes and builds them again at the
-- end from the definitions `pg_get_indexdef` gave. For a partitioned table that text reads
-- `CREATE INDEX … ON ONLY table …`, and before this template the replay ran it as it was:
-- it made each parent's index alone, invalid (the planner does not use an invalid index),
-- and none on the partitions. A replayed schema's live feed (by feed position), session
-- lookups and time-and-user scans then read every partition whole. Partitions made after
-- the replay got their own indexes, attached to the invalid parent.
--
-- This completes every such index: each partition without it gets it (built from the
-- parent's definition) and attached, and PostgreSQL marks the parent valid once every
-- partition has it. PostgreSQL checks that only when it attaches one: where every partition
-- has it already (retention dropped those of the load), the parent stays marked invalid,
-- which no query notices (the planner uses the partitions' indexes, never the parent's own).
-- Nothing is dropped, and the locks taken let the tenant's reads go on
-- (a partition's writes wait for its build). Only invalid non-unique indexes of the schema's
-- own partitioned tables, backing no constraint, are touched; a schema without one is
-- untouched, and so are TimescaleDB's (a hypertable's indexes are ordinary ones). The
-- replay now builds them on the whole table itself (`schema::create_indexes`). Idempotent,
-- like every template.
DO $$
DECLARE
    ix record;
    part record;
    child text;
BEGIN
    FOR ix IN
        SELECT i.indexrelid, i.indrelid, c.relname AS name, pg_get_indexdef(i.indexrelid) AS def
          FROM pg_index i
          JOIN pg_class c ON c.oid = i.indexrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind = 'I' AND NOT i.indisvalid
           AND NOT i.indisunique
           AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
         ORDER BY c.relname
    LOOP
        FOR part IN
            SELECT p.relname
              FROM pg_inherits h
              JOIN pg_class p ON p.oid = h.inhrelid
             WHERE h.inhparent = ix.indrelid
               AND NOT EXISTS (SELECT 1 FROM pg_inherits a
                                 JOIN pg_index pi ON pi.indexrelid = a.inhrelid
                                WHERE a.inhparent = ix.indexrelid AND pi.indrelid = p.oid)
             ORDER BY p.relname
        LOOP
            child := left(part.relname || '_' || ix.name, 63);
            EXECUTE regexp_replace(ix.def, '^CREATE INDEX \S+ ON ONLY \S+ ',
                format('CREATE INDEX %I ON %I.%I ', child, current_schema(), part.relname));
            EXECUTE format('ALTER INDEX %I.%I ATTACH PARTITION %I.%I',
                current_schema(), ix.name, current_schema(), child);
        END LOOP;
    END LOOP;
END $$;
