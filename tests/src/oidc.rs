//! A small OpenID Connect provider the tests start on loopback: discovery, JWKS (RS256),
//! an authorization endpoint that "logs in" whoever the test says and redirects back with a
//! code, and a token endpoint that checks the client secret and the PKCE verifier before it
//! signs an ID token. Flags make it misbehave the ways a hostile or broken provider would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{Form, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const CLIENT_ID: &str = "tally-test-client";
pub const CLIENT_SECRET: &str = "s3cret-of-the-test-client";

/// Who the next authorization logs in as.
#[derive(Clone, Debug)]
pub struct Person {
    pub sub: String,
    pub email: String,
    pub email_verified: bool,
}

/// Ways to misbehave.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub wrong_nonce: bool,
    pub wrong_audience: bool,
    pub foreign_key: bool,
    /// Discovery documents of over 1 MiB (a field no one reads, padded).
    pub huge_discovery: bool,
    /// Token answers of over 1 MiB, likewise.
    pub huge_token: bool,
    /// Discovery names this token endpoint instead of the provider's own.
    pub token_endpoint_at: Option<String>,
    /// Discovery names this JWKS instead of the provider's own.
    pub jwks_uri_at: Option<String>,
}

/// A field of `n` bytes that no relying party reads.
fn padding(n: usize) -> Value {
    Value::String("x".repeat(n))
}

struct Grant {
    nonce: String,
    challenge: String,
    redirect_uri: String,
    person: Person,
}

#[derive(Clone)]
struct Idp {
    base: String,
    person: Arc<Mutex<Option<Person>>>,
    faults: Arc<Mutex<Faults>>,
    codes: Arc<Mutex<HashMap<String, Grant>>>,
}

/// A running provider.
pub struct TestIdp {
    pub issuer: String,
    idp: Idp,
}

impl TestIdp {
    pub async fn start() -> TestIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let idp = Idp {
            base: format!("http://{addr}"),
            person: Arc::default(),
            faults: Arc::default(),
            codes: Arc::default(),
        };
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(idp.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        TestIdp {
            issuer: idp.base.clone(),
            idp,
        }
    }

    /// The next login is this person.
    pub fn log_in_as(&self, sub: &str, email: &str, verified: bool) {
        *self.idp.person.lock().unwrap() = Some(Person {
            sub: sub.into(),
            email: email.into(),
            email_verified: verified,
        });
    }

    pub fn set_faults(&self, f: Faults) {
        *self.idp.faults.lock().unwrap() = f;
    }
}

struct Keys {
    pem: String,
    n: String,
    e: String,
}

fn keys() -> &'static (Keys, Keys) {
    static KEYS: OnceLock<(Keys, Keys)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let make = || {
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
            Keys {
                pem: key
                    .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
                    .expect("pem")
                    .to_string(),
                n: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                e: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            }
        };
        (make(), make())
    })
}

async fn discovery(State(idp): State<Idp>) -> Json<Value> {
    let faults = idp.faults.lock().unwrap().clone();
    Json(json!({
        "x-padding": if faults.huge_discovery { padding(1 << 20) } else { Value::Null },
        "issuer": idp.base,
        "authorization_endpoint": format!("{}/authorize", idp.base),
        "token_endpoint": faults.token_endpoint_at.unwrap_or(format!("{}/token", idp.base)),
        "jwks_uri": faults.jwks_uri_at.unwrap_or(format!("{}/jwks", idp.base)),
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
    }))
}

async fn jwks() -> Json<Value> {
    let (k, _) = keys();
    Json(
        json!({"keys": [{"kty": "RSA", "kid": "idp-1", "alg": "RS256", "use": "sig", "n": k.n, "e": k.e}]}),
    )
}

async fn authorize(State(idp): State<Idp>, Query(q): Query<HashMap<String, String>>) -> Response {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("client_id") != CLIENT_ID
        || get("response_type") != "code"
        || get("code_challenge_method") != "S256"
        || get("code_challenge").is_empty()
        || get("nonce").is_empty()
        || get("state").is_empty()
    {
        return (StatusCode::BAD_REQUEST, "bad authorization request").into_response();
    }
    let Some(person) = idp.person.lock().unwrap().clone() else {
        return (StatusCode::FORBIDDEN, "nobody is logged in").into_response();
    };
    let code = uuid::Uuid::new_v4().simple().to_string();
    idp.codes.lock().unwrap().insert(
        code.clone(),
        Grant {
            nonce: get("nonce"),
            challenge: get("code_challenge"),
            redirect_uri: get("redirect_uri"),
            person,
        },
    );
    let mut to = reqwest::Url::parse(&get("redirect_uri")).expect("redirect_uri");
    to.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &get("state"));
    (StatusCode::FOUND, [(header::LOCATION, to.to_string())]).into_response()
}

async fn token(State(idp): State<Idp>, Form(f): Form<HashMap<String, String>>) -> Response {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let refuse = || {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response()
    };
    if get("client_id") != CLIENT_ID || get("client_secret") != CLIENT_SECRET {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let Some(grant) = idp.codes.lock().unwrap().remove(&get("code")) else {
        return refuse();
    };
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(get("code_verifier").as_bytes()));
    if challenge != grant.challenge || get("redirect_uri") != grant.redirect_uri {
        return refuse();
    }
    let faults = idp.faults.lock().unwrap().clone();
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "iss": idp.base,
        "aud": if faults.wrong_audience { "someone-else" } else { CLIENT_ID },
        "sub": grant.person.sub,
        "email": grant.person.email,
        "email_verified": grant.person.email_verified,
        "nonce": if faults.wrong_nonce { "not-the-nonce".to_string() } else { grant.nonce },
        "iat": now,
        "exp": now + 300,
    });
    let (ours, foreign) = keys();
    let pem = if faults.foreign_key {
        &foreign.pem
    } else {
        &ours.pem
    };
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("idp-1".into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem");
    let id_token = jsonwebtoken::encode(&h, &claims, &key).expect("sign");
    let pad = if faults.huge_token {
        padding(1 << 20)
    } else {
        Value::Null
    };
    Json(
        json!({"access_token": "opaque", "token_type": "Bearer", "id_token": id_token,
                "x-padding": pad}),
    )
    .into_response()
}
