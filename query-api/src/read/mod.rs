//! The read context every dashboard endpoint runs in: the reader (from the credential), the
//! query parameters, the range, and the answer — computed in one read-only transaction in
//! the reader's tenant schema and cached under the tenant's watermark and the reader's scope.

pub mod cache;
pub mod context;
pub mod csv;
pub mod encoding;
pub mod errors;
pub mod privacy;
pub mod scope;
pub mod tenant;

pub(crate) use context::ranged;
pub use context::{parse_range, Admin, Params, Ranged, Read};
pub use errors::{db_error, invalid};
pub use tenant::TenantRead;
