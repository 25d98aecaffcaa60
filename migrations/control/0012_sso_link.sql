-- An SSO login started from a password-authenticated session links the identity to that
-- person (an identity never links itself to an account with more rights than SSO grants).
ALTER TABLE control.sso_logins
    ADD COLUMN link_user_id uuid REFERENCES control.users (id) ON DELETE CASCADE;
