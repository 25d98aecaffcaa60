//! The replay's filter of other tenants' records (`shared::events::may_belong_to`): on any
//! payload it returns without a panic, and it never skips a record whose whole decode
//! names the tenant being replayed, with no key, another tenant's key or the payload as key.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use shared::events::{may_belong_to, Envelope};
use shared::tenant::TenantId;
use uuid::Uuid;

fuzz_target!(|payload: &[u8]| {
    let other = TenantId(Uuid::from_u128(0x0f00_d000_0000_4000_8000_0000_0000_0009));
    let other_key = format!("{other}:u");
    let keys: [Option<&[u8]>; 3] = [None, Some(other_key.as_bytes()), Some(payload)];
    let someone = HashSet::from([other]);
    for key in keys {
        let _ = may_belong_to(&someone, key, Some(payload));
    }
    // The whole decode as the projector's `consumer::decode_envelope` does it (this crate
    // does not depend on the projector's): keep the two in step.
    if let Ok(env) = serde_json::from_slice::<Envelope>(payload) {
        let replayed = HashSet::from([env.tenant_id]);
        for key in keys {
            assert!(
                may_belong_to(&replayed, key, Some(payload)),
                "skipped a record of the replayed tenant {} (key {key:?})",
                env.tenant_id
            );
        }
    }
});
