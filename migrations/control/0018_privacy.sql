-- Privacy mode (issue 17). With it on, a tenant's managers, viewers and read keys see only
-- aggregates of at least `privacy_k` people (team × day cells; smaller ones are withheld),
-- individual views are for the person themself and — when `privacy_admins_see_individuals`
-- — for owners and admins, whose every read of someone else's data is audited. Off for the
-- tenants that exist (today's behaviour); a new tenant chooses at creation.
ALTER TABLE control.tenants
    ADD COLUMN privacy_mode boolean NOT NULL DEFAULT false,
    ADD COLUMN privacy_k integer NOT NULL DEFAULT 5 CHECK (privacy_k BETWEEN 2 AND 1000),
    ADD COLUMN privacy_admins_see_individuals boolean NOT NULL DEFAULT true,
    -- Whether command arguments (the hook's commands, `command.executed` args, Claude Code's
    -- tool parameters) are stored; off: the doors drop them after validation.
    ADD COLUMN store_command_text boolean NOT NULL DEFAULT false;

-- A user id (as events carry it) names one active member of a tenant: no one can be given an
-- account that sees someone else's data as their own.
CREATE UNIQUE INDEX users_external_id ON control.users (tenant_id, external_id)
    WHERE status = 'active';
