-- Where a delivery's current round of attempts began: a redelivery starts a new round (the
-- full schedule again), with its attempts numbered on from the earlier ones.
ALTER TABLE control.deliveries ADD COLUMN round_start integer NOT NULL DEFAULT 0;
