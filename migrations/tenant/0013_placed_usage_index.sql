-- The index by repository, branch and time serves the pull-request views, which read usage
-- placed in a repository only (a pull request always names one). Usage no context has placed
-- yet (repository '') is never read through it: a sender without the hook, e.g. telemetry
-- alone, stores every usage row unplaced, and keeping them in this index cost the projector
-- about a fifth of its usage statement (issue 14, goal 1). Reattribution moves a row into
-- the index when a context places it. Idempotent, like every template.
DROP INDEX IF EXISTS session_usage_branch;
CREATE INDEX IF NOT EXISTS session_usage_placed ON session_usage (repository, branch, occurred_at)
    WHERE repository <> '';
