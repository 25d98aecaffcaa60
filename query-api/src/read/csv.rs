//! CSV export of table answers (`format=csv`).

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use shared::events::FieldError;
use shared::problem::Problem;

use super::errors::invalid;

/// `format=json` (default) or `format=csv`.
pub fn wants_csv(format: Option<&str>) -> Result<bool, Problem> {
    match format {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(_) => Err(invalid(FieldError::new("format", "use json or csv"))),
    }
}

/// The answer as computed (JSON), or as CSV of its array `field` when `csv` was asked for.
pub async fn respond(res: Response, csv: bool, field: &str) -> Result<Response, Problem> {
    if csv {
        as_csv(res, field).await
    } else {
        Ok(res)
    }
}

/// Turns a JSON answer into CSV (RFC 4180 quoting): the rows are the objects of its array
/// `field`; the columns are their keys, in alphabetical order; nested values are written as
/// JSON.
pub async fn as_csv(res: Response, field: &str) -> Result<Response, Problem> {
    let (_, _, json) = super::encoding::read_back(res, 64 * 1024 * 1024)
        .await
        .ok_or_else(Problem::internal)?;
    let mut v: Value = serde_json::from_slice(&json).map_err(|_| Problem::internal())?;
    drop(json);
    // Taken, not copied: the answer's tree is the largest thing an export holds.
    let rows = match v.get_mut(field).map(Value::take) {
        Some(Value::Array(rows)) => rows,
        _ => Vec::new(),
    };
    let mut columns: Vec<String> = Vec::new();
    for r in &rows {
        if let Some(o) = r.as_object() {
            for k in o.keys() {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    let cell = |v: Option<&Value>| -> String {
        match v {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => csv_cell(s),
            Some(other) => csv_cell(&other.to_string()),
        }
    };
    let header: Vec<String> = columns.iter().map(|c| csv_cell(c)).collect();
    let mut out = header.join(",");
    out.push('\n');
    for r in &rows {
        let line: Vec<String> = columns.iter().map(|c| cell(r.get(c))).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    let mut res = out.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    Ok(res)
}

/// One CSV field: RFC 4180 quoting, and a text that a spreadsheet would run as a formula
/// (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) gets a leading `'`, so it
/// is shown as text. JSON numbers are written as they are: `-5` is a number, not a formula.
pub fn csv_cell(raw: &str) -> String {
    let numeric = raw.parse::<f64>().is_ok() && !raw.starts_with(['+', '@', '=', '\t', '\r']);
    let text = if !numeric && raw.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{raw}")
    } else {
        raw.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn formulas_are_neutralised_and_numbers_kept() {
        let cases = [
            (
                "=HYPERLINK(\"http://x\")",
                "\"'=HYPERLINK(\"\"http://x\"\")\"",
            ),
            ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "\"'\r=1\""),
            ("plain", "plain"),
            ("a,b", "\"a,b\""),
            ("-5", "-5"),
            ("-1.5e3", "-1.5e3"),
            ("12", "12"),
            ("", ""),
        ];
        for (raw, want) in cases {
            assert_eq!(csv_cell(raw), want, "{raw:?}");
        }
    }
}
