-- A usage row is known by its kind as well as its session, time and event id (issue 14).
--
-- The raw tables keep an event id once per table, so a sender reusing one id for an agent
-- interaction and a tool run at the same time in the same session has two usage rows under one
-- `session_usage` key (template 0015 reads them both from the raw rows): one could not be
-- stored, and a later move would take the other's place for its own. The kind (1 an agent
-- interaction, 2 a tool run, 3 lines of code) joins the key, derived from the amounts, which
-- tell them apart: an interaction always counts a request, a tool run a tool run (readers
-- of `usage_rows` derive a row's kind from its amounts the same way). Idempotent, like every
-- template, and `usage_rows` is left as 0015 made it, so that 0015 can be applied again
-- after this one.

ALTER TABLE session_usage ADD COLUMN IF NOT EXISTS kind smallint NOT NULL
    GENERATED ALWAYS AS ((CASE WHEN requests <> 0 THEN 1 WHEN tool_runs <> 0 THEN 2
                               ELSE 3 END)::smallint) STORED;

DO $$
BEGIN
    IF (SELECT array_length(conkey, 1) FROM pg_constraint
         WHERE conrelid = 'session_usage'::regclass AND contype = 'p') = 3 THEN
        ALTER TABLE session_usage DROP CONSTRAINT session_usage_pkey,
            ADD CONSTRAINT session_usage_pkey PRIMARY KEY (session_id, occurred_at, event_id, kind);
    END IF;
END
$$;
