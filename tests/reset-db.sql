-- Run by `make test` before the tests: a fresh test database, and no reader roles left over
-- from earlier runs (roles are cluster-wide; those still used by another database stay).
DROP DATABASE IF EXISTS tally_test WITH (FORCE);
DO $$
DECLARE
    r text;
BEGIN
    FOR r IN SELECT rolname FROM pg_roles WHERE rolname LIKE 'tally\_t\_%' LOOP
        BEGIN
            EXECUTE format('DROP ROLE %I', r);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            NULL;
        END;
    END LOOP;
END
$$;
