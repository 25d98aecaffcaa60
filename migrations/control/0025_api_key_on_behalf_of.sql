-- The person whose rights an API key was made with: the person who made it, or the person
-- behind the key that made it. When they are no longer an owner or admin (demoted or
-- deactivated), their `admin` and `read` keys (the tenant's control plane, the whole
-- tenant's data) are revoked with them. NULL: made by an operator or the CLI.
ALTER TABLE control.api_keys ADD COLUMN on_behalf_of uuid REFERENCES control.users (id);
CREATE INDEX api_keys_on_behalf_of ON control.api_keys (on_behalf_of) WHERE on_behalf_of IS NOT NULL;
