//! Sessions: the session events a batch really inserted, folded into one row per session,
//! and the upsert that merges them into `sessions`.

use chrono::{DateTime, Utc};
use shared::events::{Envelope, Payload};
use sqlx::PgConnection;

use super::raw::s;

/// The session row a batch's session events fold into.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionUpdate {
    pub session_id: String,
    pub user_id: String,
    pub team_id: String,
    pub project_id: String,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub commands_executed: Option<i64>,
    pub productivity_score: Option<f64>,
    pub agents_used: Vec<String>,
}

/// Folds session events (already deduplicated) into one update per session, so that one
/// upsert statement never touches the same row twice.
pub fn fold<'a>(events: impl Iterator<Item = (&'a Envelope, &'a Payload)>) -> Vec<SessionUpdate> {
    let mut by_id: std::collections::BTreeMap<String, SessionUpdate> = Default::default();
    for (env, payload) in events {
        match payload {
            Payload::SessionStarted(p) => {
                let u = by_id.entry(p.session_id.clone()).or_default();
                u.session_id = p.session_id.clone();
                u.user_id = p.user_id.clone();
                u.team_id = s(&p.team_id).to_owned();
                u.project_id = s(&p.project_id).to_owned();
                u.started_at = Some(
                    u.started_at
                        .map_or(env.occurred_at, |t| t.min(env.occurred_at)),
                );
            }
            Payload::SessionEnded(p) => {
                let u = by_id.entry(p.session_id.clone()).or_default();
                u.session_id = p.session_id.clone();
                u.user_id = p.user_id.clone();
                u.team_id = s(&p.team_id).to_owned();
                u.project_id = s(&p.project_id).to_owned();
                u.ended_at = Some(
                    u.ended_at
                        .map_or(env.occurred_at, |t| t.max(env.occurred_at)),
                );
                u.commands_executed = p.commands_executed.or(u.commands_executed);
                u.productivity_score = p.productivity_score.or(u.productivity_score);
                if !p.agents_used.is_empty() {
                    // As many as ingest takes now (a record from before that may list more).
                    let most = shared::events::MAX_AGENTS_USED;
                    u.agents_used = p.agents_used.iter().take(most).cloned().collect();
                }
            }
            _ => {}
        }
    }
    by_id.into_values().collect()
}

/// Upserts the folded sessions (search_path already points at the tenant's schema): the
/// earliest start and latest end win, an end's counts and agents replace what was known.
pub async fn upsert(conn: &mut PgConnection, sessions: &[SessionUpdate]) -> sqlx::Result<()> {
    if sessions.is_empty() {
        return Ok(());
    }
    let agents: Vec<String> = sessions
        .iter()
        .map(|s| serde_json::to_string(&s.agents_used).expect("strings serialize"))
        .collect();
    sqlx::query(
        "INSERT INTO sessions AS s (session_id, user_id, team_id, project_id, started_at,
                                    ended_at, commands_executed, productivity_score, agents_used)
         SELECT x.sid, x.uid, x.tid, x.pid, x.st, x.en, x.ce, x.ps,
                ARRAY(SELECT jsonb_array_elements_text(x.ag::jsonb))
           FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                       $6::timestamptz[], $7::bigint[], $8::float8[], $9::text[])
                AS x(sid, uid, tid, pid, st, en, ce, ps, ag)
         ON CONFLICT (session_id) DO UPDATE SET
            started_at = LEAST(s.started_at, EXCLUDED.started_at),
            ended_at = GREATEST(s.ended_at, EXCLUDED.ended_at),
            commands_executed = COALESCE(EXCLUDED.commands_executed, s.commands_executed),
            productivity_score = COALESCE(EXCLUDED.productivity_score, s.productivity_score),
            agents_used = CASE WHEN cardinality(EXCLUDED.agents_used) > 0
                               THEN EXCLUDED.agents_used ELSE s.agents_used END",
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.user_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.team_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.project_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(sessions.iter().map(|s| s.started_at).collect::<Vec<_>>())
    .bind(sessions.iter().map(|s| s.ended_at).collect::<Vec<_>>())
    .bind(
        sessions
            .iter()
            .map(|s| s.commands_executed)
            .collect::<Vec<_>>(),
    )
    .bind(
        sessions
            .iter()
            .map(|s| s.productivity_score)
            .collect::<Vec<_>>(),
    )
    .bind(agents)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session event of session `s1` at `minute` past 10:00, decoded as the projector does.
    fn event(kind: &str, minute: u32, data: serde_json::Value) -> (Envelope, Payload) {
        let env: Envelope = serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::new_v4(),
            "tenant_id": uuid::Uuid::nil(),
            "type": kind,
            "schema_version": 1,
            "occurred_at": format!("2026-11-25T10:{minute:02}:00Z"),
            "received_at": "2026-11-25T11:00:00Z",
            "actor": {},
            "source": "api",
            "data": data,
        }))
        .expect("an envelope");
        let payload = env.payload().expect("a valid payload");
        (env, payload)
    }

    #[test]
    fn one_update_per_session_with_the_earliest_start_and_latest_end() {
        let events = [
            event(
                "session.started",
                5,
                serde_json::json!({"session_id": "s1", "user_id": "u", "team_id": "t"}),
            ),
            event(
                "session.started",
                2,
                serde_json::json!({"session_id": "s1", "user_id": "u", "team_id": "t"}),
            ),
            event(
                "session.ended",
                30,
                serde_json::json!({"session_id": "s1", "user_id": "u", "commands_executed": 4,
                                   "agents_used": ["claude"]}),
            ),
            event(
                "session.ended",
                20,
                serde_json::json!({"session_id": "s1", "user_id": "u", "productivity_score": 0.5}),
            ),
            event(
                "session.started",
                1,
                serde_json::json!({"session_id": "s2", "user_id": "v"}),
            ),
        ];
        let folded = fold(events.iter().map(|(e, p)| (e, p)));
        assert_eq!(folded.len(), 2, "{folded:?}");
        let s1 = &folded[0];
        assert_eq!(s1.session_id, "s1");
        assert_eq!(s1.started_at, Some(events[1].0.occurred_at));
        assert_eq!(s1.ended_at, Some(events[2].0.occurred_at));
        // An end without a value keeps what an earlier end said.
        assert_eq!(s1.commands_executed, Some(4));
        assert_eq!(s1.productivity_score, Some(0.5));
        assert_eq!(s1.agents_used, ["claude"]);
        let s2 = &folded[1];
        assert_eq!((s2.session_id.as_str(), s2.ended_at), ("s2", None));
    }
}
