//! The user and team snapshots that user and team events carry in their `extra` (`user`,
//! `team`): written by ingest-api's control plane, read by the projector into the tenant's
//! `users` and `teams` read models. One definition for both sides.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::events::FieldError;

/// A user as the control plane has them when the event is written (`extra.user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSnapshot {
    pub user_id: Uuid,
    pub email: String,
    pub role: String,
    pub status: String,
    pub external_id: String,
    #[serde(default)]
    pub teams: Vec<String>,
}

/// A team as the control plane has it when the event is written (`extra.team`); a deleted
/// team has no name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamSnapshot {
    pub key: String,
    pub name: Option<String>,
    #[serde(default)]
    pub members: Vec<Uuid>,
    #[serde(default)]
    pub deleted: bool,
}

/// A snapshot stored under one key of an event's `extra`.
pub trait Snapshot: Serialize + for<'de> Deserialize<'de> {
    /// Its key in `extra`.
    const KEY: &'static str;

    /// The snapshot `extra` carries, if any; one that is there but does not parse is an error
    /// naming `extra.<KEY>` (decoding then refuses the event, which dead-letters it).
    fn from_extra(extra: &Map<String, Value>) -> Result<Option<Self>, FieldError> {
        extra
            .get(Self::KEY)
            .map(|v| Self::deserialize(v))
            .transpose()
            .map_err(|e| FieldError::new(format!("extra.{}", Self::KEY), e.to_string()))
    }

    /// `extra` holding this snapshot, for the event that carries it.
    fn into_extra(self) -> Map<String, Value> {
        let mut extra = Map::new();
        extra.insert(
            Self::KEY.into(),
            serde_json::to_value(self).expect("snapshots serialize"),
        );
        extra
    }
}

impl Snapshot for UserSnapshot {
    const KEY: &'static str = "user";
}

impl Snapshot for TeamSnapshot {
    const KEY: &'static str = "team";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snapshots_round_trip_through_extra() {
        let user = UserSnapshot {
            user_id: Uuid::now_v7(),
            email: "a@example.com".into(),
            role: "member".into(),
            status: "active".into(),
            external_id: String::new(),
            teams: vec!["core".into()],
        };
        let extra = user.clone().into_extra();
        assert_eq!(extra["user"]["email"], "a@example.com");
        assert_eq!(UserSnapshot::from_extra(&extra).unwrap(), Some(user));
        assert_eq!(TeamSnapshot::from_extra(&extra).unwrap(), None);

        let gone = TeamSnapshot {
            key: "core".into(),
            name: None,
            members: vec![],
            deleted: true,
        };
        let extra = gone.clone().into_extra();
        assert_eq!(
            extra["team"],
            json!({"key": "core", "name": null, "members": [], "deleted": true})
        );
        assert_eq!(TeamSnapshot::from_extra(&extra).unwrap(), Some(gone));
    }

    #[test]
    fn a_snapshot_that_does_not_parse_is_named() {
        let mut extra = Map::new();
        extra.insert(
            "user".into(),
            json!({"user_id": "not-a-uuid", "email": "a"}),
        );
        let e = UserSnapshot::from_extra(&extra).unwrap_err();
        assert_eq!(e.field, "extra.user");
        assert!(!e.reason.is_empty());
        extra.insert("team".into(), json!(["no"]));
        assert_eq!(
            TeamSnapshot::from_extra(&extra).unwrap_err().field,
            "extra.team"
        );
    }

    /// An event whose snapshot the projector could not use does not decode: the projector
    /// dead-letters it (with the reason) instead of skipping the snapshot unseen.
    #[test]
    fn an_event_with_a_bad_snapshot_does_not_decode() {
        use crate::events::{AuthKind, EventType, Payload};
        let t = EventType::Auth(AuthKind::UserUpdated);
        let bad = json!({"extra": {"user": {"user_id": "u", "email": "a"}}});
        let errors = Payload::decode(t, 1, bad, "data").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "data.extra.user");
        let team = TeamSnapshot {
            key: "core".into(),
            name: Some("Core".into()),
            members: vec![Uuid::now_v7()],
            deleted: false,
        };
        let good = json!({"extra": team.clone().into_extra()});
        let Payload::Auth(_, event) = Payload::decode(t, 1, good, "data").unwrap() else {
            panic!("an auth payload")
        };
        assert_eq!(TeamSnapshot::from_extra(&event.extra).unwrap(), Some(team));
    }
}
