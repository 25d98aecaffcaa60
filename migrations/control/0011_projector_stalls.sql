-- A partition whose batch keeps failing says so where `projector status` looks: since when,
-- and the last error. Cleared by the next batch that lands.
ALTER TABLE control.projector_offsets
    ADD COLUMN stalled_since timestamptz,
    ADD COLUMN last_error text;
