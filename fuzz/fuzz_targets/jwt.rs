//! Access tokens at the verifier: any bearer text is claims or a 401, never a panic. Besides
//! the input as sent, its header and claims are signed with the verifier's own key (kid
//! `fuzz`), so mutations reach the claim checks behind the signature; what then passes must
//! carry Tally's issuer and audience.
#![no_main]

use std::sync::OnceLock;

use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use shared::jwt::{self, Jwks, KeySource, Verifier};

struct Fixture {
    runtime: tokio::runtime::Runtime,
    verifier: Verifier,
    signer: EncodingKey,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = ingest_api::keys::generate_key();
        let verifier = Verifier::new(KeySource::Static);
        verifier.set_keys(&Jwks {
            keys: vec![Jwks::ed25519("fuzz", &key.public_key)],
        });
        Fixture {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
            verifier,
            signer: EncodingKey::from_ed_der(&key.private_pkcs8),
        }
    })
}

fuzz_target!(|token: &str| {
    let f = fixture();
    let _ = f.runtime.block_on(f.verifier.verify(token));
    let mut parts = token.splitn(3, '.');
    let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
        return;
    };
    let message = format!("{header}.{claims}");
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &f.signer, Algorithm::EdDSA)
        .expect("Ed25519 signs any message");
    if let Ok(claims) = f
        .runtime
        .block_on(f.verifier.verify(&format!("{message}.{signature}")))
    {
        assert_eq!(
            (claims.iss.as_str(), claims.aud.as_str()),
            (jwt::ISSUER, jwt::AUDIENCE)
        );
    }
});
