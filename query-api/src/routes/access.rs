//! `GET /v1/dashboard/access`: what the caller may see — their role, the rows they see, and
//! the tenant's privacy mode — so that a page or an agent shows only what it may.

use axum::Json;
use serde::Serialize;
use shared::auth::Privacy;
use shared::problem::Problem;
use shared::tenant::TenantId;

use crate::auth::{Reader, Visibility};

#[derive(Debug, Serialize)]
pub struct Access {
    pub tenant_id: TenantId,
    /// `owner`, `admin`, `manager`, `developer` or `viewer`; `null` for a read key.
    pub role: Option<&'static str>,
    /// `tenant`, `teams` or `own`.
    pub sees: &'static str,
    /// The teams seen (with `teams`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teams: Option<Vec<String>>,
    /// The user id the caller's own events carry (people only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub privacy: Privacy,
    /// Whether individual views (per-user lists, sessions, timelines, activity, live feed,
    /// repositories and pull requests) answer; if not they answer 403 `privacy-mode`.
    pub individual_views: bool,
    /// The smallest group an aggregate shown to the caller covers (privacy mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_group: Option<u32>,
    /// Whether the caller's reads of other people's data are written to the audit log.
    pub reads_audited: bool,
}

impl Access {
    pub fn of(reader: &Reader) -> Access {
        let (sees, teams) = match &reader.visibility {
            Visibility::Tenant => ("tenant", None),
            Visibility::Teams(t) => ("teams", Some(t.clone())),
            Visibility::Own(_) => ("own", None),
        };
        Access {
            tenant_id: reader.tenant,
            role: reader.role.map(|r| r.as_str()),
            sees,
            teams,
            user_id: reader.person.clone(),
            privacy: reader.privacy,
            individual_views: reader.aggregates_only().is_none(),
            min_group: reader.aggregates_only(),
            reads_audited: reader.audits_individual_reads(),
        }
    }
}

/// `GET /v1/dashboard/access`
pub async fn access(reader: Reader) -> Result<Json<Access>, Problem> {
    Ok(Json(Access::of(&reader)))
}
