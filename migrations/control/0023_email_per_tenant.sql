-- An e-mail address is unique within its tenant, not across tenants. Unique across tenants,
-- one tenant's admin could take another tenant's people's addresses first (their invitation,
-- their creation and their single sign-on then failed) and learn from a 409 which addresses
-- another tenant has. A login finds the address's accounts in every tenant and takes the one
-- whose password matches (`tenant` chooses when several do).
DROP INDEX control.users_email;
CREATE UNIQUE INDEX users_tenant_email ON control.users (tenant_id, email);
CREATE INDEX users_email ON control.users (email);
