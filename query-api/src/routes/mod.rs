pub mod access;
pub mod audit;
pub mod budgets;
pub mod dashboard;
pub mod explore;
pub mod health;
pub mod mcp;
pub mod people;
pub mod repos;
pub mod stream;
pub mod tables;
pub mod timeline;

use axum::extract::{Query, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shared::events::FieldError;

use crate::read::invalid;

/// Longest query string a read takes: the dashboard's and the API's filters fit many times
/// over; a longer one is only ever a filter no stored text can match.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// Refuses a query parameter holding NUL with a 400 naming it: PostgreSQL cannot store or
/// compare text with NUL, and would otherwise fail the query (a 503 for the sender's fault).
/// Refuses a query string over [`MAX_QUERY_BYTES`] too (400 naming `query`).
pub async fn refuse_nul(request: Request, next: Next) -> Response {
    if request
        .uri()
        .query()
        .is_some_and(|q| q.len() > MAX_QUERY_BYTES)
    {
        let e = FieldError::new("query", format!("at most {MAX_QUERY_BYTES} bytes"));
        return invalid(e).into_response();
    }
    if let Ok(Query(pairs)) = Query::<Vec<(String, String)>>::try_from_uri(request.uri()) {
        if let Some((name, _)) = pairs
            .iter()
            .find(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            let e = FieldError::new(name.replace('\0', "\\0"), "must not contain NUL");
            return invalid(e).into_response();
        }
    }
    next.run(request).await
}
