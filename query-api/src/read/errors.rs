//! How a read fails, as the client sees it.

use axum::extract::rejection::QueryRejection;
use shared::events::FieldError;
use shared::problem::Problem;

/// A parameter the endpoint cannot take: a 400 naming it.
pub fn invalid(e: FieldError) -> Problem {
    Problem::invalid_parameter(&e.field, e.reason)
}

/// A query string that does not deserialize into the endpoint's parameters: a 400 saying why.
pub fn invalid_query(e: QueryRejection) -> Problem {
    Problem::bad_request("invalid-parameter", e.body_text())
}

/// A failed read: always a 503 with `Retry-After` (the cause is logged). A statement
/// cancelled by `statement_timeout` says so.
pub fn db_error(e: sqlx::Error) -> Problem {
    if has_sqlstate(&e, "57014") {
        tracing::warn!(error = %e, "query cancelled by statement_timeout");
        metrics::counter!("query_timeouts_total").increment(1);
        return Problem::unavailable(
            "the query took longer than this service allows; try a shorter range or later",
            5,
        );
    }
    if matches!(e, sqlx::Error::PoolTimedOut) {
        tracing::warn!("no database connection came free in time");
        return Problem::unavailable(
            "every database connection this read may use is busy; retry shortly",
            1,
        );
    }
    if has_sqlstate(&e, "22003") {
        // Values the doors refuse now (beyond ±1e200) may still be in the log from before:
        // a sum over them leaves float8's range. The reader's range, not the database, is
        // what can change.
        tracing::warn!(error = %e, "a sum left float8's range");
        return Problem::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "out-of-range",
            "Out of range",
            "a sum over this range is beyond what a double can hold; read a shorter range",
        )
        .with_errors(vec![FieldError::new("range", "its sums overflow")]);
    }
    tracing::error!(error = %e, "query failed");
    Problem::unavailable("the projection database is unavailable", 2)
}

/// Whether the database refused with SQLSTATE `code`: 57014 (`query_canceled`) is what
/// `statement_timeout` raises, 22003 (`numeric_value_out_of_range`) a float8 sum that
/// overflowed.
fn has_sqlstate(e: &sqlx::Error, code: &str) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == code)
}
