//! Tenant identifiers and the names of their PostgreSQL schemas.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A tenant's id. Always taken from the caller's credential, never from a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub Uuid);

impl TenantId {
    pub fn new() -> Self {
        TenantId(Uuid::now_v7())
    }

    /// The tenant's projection schema for a projection version, e.g. `tenant_0f3a…_v1`.
    /// Only lowercase hex and digits go into it, so it never needs quoting.
    pub fn schema(&self, version: i32) -> SchemaName {
        SchemaName(format!("tenant_{}_v{version}", self.0.simple()))
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TenantId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TenantId)
    }
}

/// A schema name built by [`TenantId::schema`]: safe to splice into SQL as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        let t = TenantId::new();
        let s = t.schema(3);
        assert!(s.as_str().starts_with("tenant_"));
        assert!(s.as_str().ends_with("_v3"));
        assert!(s
            .as_str()
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert!(
            s.as_str().len() < 63,
            "PostgreSQL truncates identifiers at 63 bytes"
        );
    }
}
