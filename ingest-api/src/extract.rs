//! Extractors of the JSON routes (login, tokens, SSO, the control plane) whose rejections are
//! problems in the same format as every other error.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;
use shared::problem::Problem;
use uuid::Uuid;

/// The JSON body of a request as `T`; its problem (malformed, a field of the wrong type, the
/// wrong content type, larger than the route's limit) otherwise.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        json_body(Json::from_request(req, state).await).map(Body)
    }
}

/// [`Body`] for the handlers that must check the caller before they look at the body.
pub fn json_body<T>(r: Result<Json<T>, JsonRejection>) -> Result<T, Problem> {
    r.map(|Json(v)| v).map_err(|e| {
        let (slug, title) = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ("body-too-large", "Body too large"),
            _ => ("invalid-body", "Invalid request body"),
        };
        Problem::new(e.status(), slug, title, e.body_text())
    })
}

/// The id in a resource's path. A malformed id names nothing: 404, like an id of another
/// tenant.
pub struct Id(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Id(id))
            .map_err(|_| Problem::not_found("no such resource"))
    }
}
