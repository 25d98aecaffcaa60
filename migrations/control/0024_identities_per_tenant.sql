-- A person as a tenant's identity provider knows them: one identity (issuer, subject) may be
-- a person in each tenant that uses the same provider (Google, Entra), as an e-mail address
-- may (0023). Keyed across tenants, the first tenant whose sign-on a person completed held
-- their identity for good, and every other tenant's sign-on refused them.
ALTER TABLE control.user_identities ADD COLUMN tenant_id uuid REFERENCES control.tenants (id);
UPDATE control.user_identities i SET tenant_id = u.tenant_id
  FROM control.users u WHERE u.id = i.user_id;
ALTER TABLE control.user_identities ALTER COLUMN tenant_id SET NOT NULL;
ALTER TABLE control.user_identities DROP CONSTRAINT user_identities_pkey;
ALTER TABLE control.user_identities ADD PRIMARY KEY (tenant_id, issuer, subject);
