-- People removed from a tenant (`DELETE /v1/admin/users/{id}`), by a SHA-256 of their address:
-- single sign-on does not provision them again at their next login, as it did not while their
-- deactivated account was there. An admin who creates or invites the address again lifts it.
CREATE TABLE control.removed_people (
    tenant_id   uuid NOT NULL REFERENCES control.tenants (id),
    email_hash  bytea NOT NULL,
    removed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, email_hash)
);

-- What names a person by their id, for their removal (and the foreign keys' checks of it),
-- which otherwise read these tables whole.
CREATE INDEX user_identities_user ON control.user_identities (user_id);
CREATE INDEX invitations_user ON control.invitations (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX sso_logins_link_user ON control.sso_logins (link_user_id)
    WHERE link_user_id IS NOT NULL;

-- An identity's person is a person of the identity's tenant.
CREATE UNIQUE INDEX users_id_tenant ON control.users (id, tenant_id);
ALTER TABLE control.user_identities ADD CONSTRAINT user_identities_person_in_tenant
    FOREIGN KEY (user_id, tenant_id) REFERENCES control.users (id, tenant_id);
