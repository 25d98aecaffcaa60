-- An invitation an owner or admin took back (`DELETE /v1/admin/invitations/{id}`): it can no
-- longer be accepted, and no longer counts among the tenant's open invitations.
ALTER TABLE control.invitations ADD COLUMN revoked_at timestamptz;
-- The tenant's invitations listed in pages, oldest first.
CREATE INDEX invitations_tenant_created ON control.invitations (tenant_id, created_at, id);

-- Housekeeping (the projector's retention pass) removes what only grew with use: relayed
-- outbox rows, refresh-token families wholly expired, closed invitations, revoked keys, and
-- finished deliveries with their firings, each found by its age through these indexes.
CREATE INDEX outbox_sent_at ON control.outbox (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX refresh_tokens_expires_at ON control.refresh_tokens (expires_at);
CREATE INDEX api_keys_revoked_at ON control.api_keys (revoked_at) WHERE revoked_at IS NOT NULL;
CREATE INDEX deliveries_finished ON control.deliveries (created_at) WHERE status <> 'pending';
CREATE INDEX firings_fired_at ON control.firings (fired_at);
