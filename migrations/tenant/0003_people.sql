-- Read models of the control plane, projected from user.* and team.changed events: who the
-- tenant's people and teams are, for dashboards that name them.
CREATE TABLE users (
    user_id      uuid PRIMARY KEY,
    email        text NOT NULL,
    role         text NOT NULL,
    status       text NOT NULL,
    external_id  text NOT NULL,
    teams        text[] NOT NULL DEFAULT '{}',
    updated_at   timestamptz NOT NULL
);

CREATE TABLE teams (
    key         text PRIMARY KEY,
    name        text NOT NULL,
    members     uuid[] NOT NULL DEFAULT '{}',
    deleted     boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL
);
