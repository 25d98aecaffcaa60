-- `GET /v1/auth/sso/start` (which answers anyone) deletes the logins started over ten minutes
-- ago before it starts one: by their age, which nothing indexed, so each start read the
-- whole table.
CREATE INDEX IF NOT EXISTS sso_logins_created_at ON control.sso_logins (created_at);
