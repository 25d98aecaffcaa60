-- Who made an invitation: the person signed in, or the person whose rights the admin key
-- that made it carries (NULL for invitations made before this column, or by a key made
-- without a person). A person who stops being an admin, or an owner, has the open
-- invitations made with the rights they lost revoked with their keys (`store::revoke_keys_of`).
ALTER TABLE control.invitations ADD COLUMN invited_by uuid;
CREATE INDEX invitations_open_by ON control.invitations (invited_by)
    WHERE invited_by IS NOT NULL AND accepted_at IS NULL AND revoked_at IS NULL;
