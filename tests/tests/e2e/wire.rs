//! Answers on the wire: compressed for a client that accepts gzip and the same answer for
//! one that does not, and not sent again (304) while the projection has not moved; another
//! tenant's validator gets nothing.

use std::io::Read;
use std::time::Duration;

use reqwest::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, IF_NONE_MATCH};
use serde_json::Value;
use tally_tests::*;

fn inflate(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .expect("a gzip body");
    out
}

/// `GET url` with `key` and the extra headers `with`: status, headers, body as sent.
async fn get(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    with: &[(reqwest::header::HeaderName, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = client.get(url).bearer_auth(key);
    for (name, value) in with {
        req = req.header(name, *value);
    }
    let res = req.send().await.expect("GET");
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    (status, headers, res.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_are_sent_compressed_and_not_again_while_the_projection_stands() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let (a, b) = (
        create_tenant(&pool, "wire-a").await,
        create_tenant(&pool, "wire-b").await,
    );
    // Twenty people's commands: the per-person series make an answer well over 1 KiB (and
    // their long names a CSV export of them).
    let batch = |tenant: &str| {
        Value::Array(
            (0..40)
                .map(|i| {
                    command(
                        &format!("{tenant}-user-with-a-longer-name-{}", i % 20),
                        "build",
                        i,
                        true,
                    )
                })
                .collect(),
        )
    };
    for t in [&a, &b] {
        post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch("x")).await;
        wait_projected(&pool, t.id, 40, Duration::from_secs(60)).await;
    }
    // A named window (`range=24h` moves with each minute).
    let now = chrono::Utc::now();
    let hour = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:00:00Z").to_string();
    let url = format!(
        "{}/v1/dashboard/timeseries?from={}&to={}&bucket=1h&group_by=user",
        query.url(),
        hour(now - chrono::TimeDelta::hours(25)),
        hour(now + chrono::TimeDelta::hours(2)),
    );

    // Computed (a miss) for a client that takes gzip: sent compressed.
    let gzip = [(ACCEPT_ENCODING, "gzip")];
    let (st, first_headers, first) = get(&client, &url, &a.read_key, &gzip).await;
    assert_eq!(st, 200);
    assert_eq!(first_headers["x-cache"], "miss");
    assert_eq!(first_headers[CONTENT_ENCODING], "gzip");

    // Cached, for a client without Accept-Encoding: the same JSON, as it is, with the same
    // validator.
    let (st, plain_headers, plain) = get(&client, &url, &a.read_key, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(plain_headers["x-cache"], "hit");
    assert!(plain_headers.get(CONTENT_ENCODING).is_none());
    assert_eq!(inflate(&first), plain);
    assert_eq!(plain_headers[ETAG], first_headers[ETAG]);
    assert!(plain.len() > 1024, "the answer is {} bytes", plain.len());
    let answer: Value = serde_json::from_slice(&plain).expect("JSON");
    assert_eq!(answer["groups"], 20, "{answer}");
    let tag = plain_headers[ETAG].to_str().unwrap().to_string();
    assert!(tag.starts_with("W/\""), "{tag}");
    assert_eq!(plain_headers["cache-control"], "private, no-cache");

    // Cached, with gzip accepted in other words: the same bytes, compressed, under the same
    // validator.
    for accept in ["gzip", "br, gzip;q=0.5", "*"] {
        let (st, h, sent) = get(&client, &url, &a.read_key, &[(ACCEPT_ENCODING, accept)]).await;
        assert_eq!(st, 200);
        assert_eq!(h["x-cache"], "hit");
        assert_eq!(h[CONTENT_ENCODING], "gzip", "{accept}");
        assert_eq!(h[ETAG].to_str().unwrap(), tag);
        assert!(
            sent.len() * 3 < plain.len(),
            "{} of {}",
            sent.len(),
            plain.len()
        );
        assert_eq!(inflate(&sent), plain, "{accept}");
    }
    for refused in ["gzip;q=0", "identity", "*;q=0", "br"] {
        let (st, h, sent) = get(&client, &url, &a.read_key, &[(ACCEPT_ENCODING, refused)]).await;
        assert_eq!(st, 200);
        assert!(h.get(CONTENT_ENCODING).is_none(), "{refused}");
        assert_eq!(sent, plain, "{refused}");
    }

    // The client holds it: 304, no body.
    for held in [
        tag.clone(),
        tag.trim_start_matches("W/").to_string(),
        format!("\"x\", {tag}"),
    ] {
        let (st, h, sent) = get(&client, &url, &a.read_key, &[(IF_NONE_MATCH, &held)]).await;
        assert_eq!(st, 304, "{held}");
        assert!(sent.is_empty());
        assert_eq!(h[ETAG].to_str().unwrap(), tag);
        assert!(h.get(CONTENT_LENGTH).is_none(), "{held}: {h:?}");
    }
    // And to a HEAD: no length either (it would say the answer's is 0).
    let res = client
        .head(&url)
        .bearer_auth(&a.read_key)
        .header(IF_NONE_MATCH, &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);
    assert!(res.headers().get(CONTENT_LENGTH).is_none(), "{res:?}");
    let (st, _, _) = get(
        &client,
        &url,
        &a.read_key,
        &[(IF_NONE_MATCH, "W/\"other\"")],
    )
    .await;
    assert_eq!(st, 200);

    // Tenant B, sending A's validator for the same request, gets B's own answer.
    let (st, h, sent) = get(&client, &url, &b.read_key, &[(IF_NONE_MATCH, &tag)]).await;
    assert_eq!(st, 200);
    assert_ne!(h[ETAG].to_str().unwrap(), tag);
    let theirs: Value = serde_json::from_slice(&sent).unwrap();
    assert_ne!(theirs["tenant_id"], answer["tenant_id"]);

    // The projection moves: the validator is no longer current.
    post_events_accepted(
        &client,
        &ingest.url(),
        &a.ingest_key,
        &Value::Array(vec![command(
            "x-user-with-a-longer-name-0",
            "build",
            5,
            true,
        )]),
    )
    .await;
    wait_projected(&pool, a.id, 41, Duration::from_secs(30)).await;
    let (st, h, sent) = get(&client, &url, &a.read_key, &[(IF_NONE_MATCH, &tag)]).await;
    assert_eq!(st, 200, "the answer changed: it is sent");
    assert_ne!(h[ETAG].to_str().unwrap(), tag);
    let after: Value = serde_json::from_slice(&sent).unwrap();
    let count = |v: &Value| -> i64 {
        v["series"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["points"].as_array().unwrap())
            .map(|p| p["count"].as_i64().unwrap())
            .sum()
    };
    assert_eq!(count(&after), count(&answer) + 1);

    // A table exported as CSV from a compressed answer: a header and one line a person.
    let top = format!(
        "{}/v1/dashboard/top?range=24h&dimension=user&limit=50",
        query.url()
    );
    let (_, h, sent) = get(&client, &top, &a.read_key, &[(ACCEPT_ENCODING, "gzip")]).await;
    assert_eq!(h[CONTENT_ENCODING], "gzip", "the JSON table is compressed");
    let items: Value = serde_json::from_slice(&inflate(&sent)).unwrap();
    assert_eq!(items["items"].as_array().unwrap().len(), 20, "{items}");
    let csv_url = format!("{top}&format=csv");
    let (st, h, csv) = get(&client, &csv_url, &a.read_key, &[]).await;
    assert_eq!(st, 200);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert!(h.get(CONTENT_ENCODING).is_none() && h.get(ETAG).is_none());
    let csv = String::from_utf8(csv).expect("CSV text");
    assert_eq!(csv.lines().count(), 21, "{csv}");
    assert!(csv.lines().skip(1).all(|l| l.contains("x-user-")), "{csv}");
    // The export, built for each request, is compressed as it is sent to a client taking gzip.
    assert!(csv.len() > 1024, "the export is {} bytes", csv.len());
    let (st, h, sent) = get(&client, &csv_url, &a.read_key, &[(ACCEPT_ENCODING, "gzip")]).await;
    assert_eq!(st, 200);
    assert_eq!(h[CONTENT_ENCODING], "gzip");
    assert_eq!(String::from_utf8(inflate(&sent)).unwrap(), csv);

    // The page's files: compressed once, and revalidated.
    for path in ["/vendor/uplot.js", "/dashboard.js", "/openapi.json"] {
        let url = format!("{}{path}", query.url());
        let (_, plain_h, plain) = get(&client, &url, "", &[]).await;
        let (st, h, sent) = get(&client, &url, "", &[(ACCEPT_ENCODING, "gzip")]).await;
        assert_eq!(st, 200, "{path}");
        assert_eq!(h[CONTENT_ENCODING], "gzip", "{path}");
        assert_eq!(inflate(&sent), plain, "{path}");
        let tag = plain_h[ETAG].to_str().unwrap();
        let (st, _, _) = get(&client, &url, "", &[(IF_NONE_MATCH, tag)]).await;
        assert_eq!(st, 304, "{path}");
    }
    stop_all([projector, ingest, query]).await;
}

/// An answer is bounded in what it may carry: a session of 2 000 prompts, each stored with
/// 4 000 control characters (six bytes of JSON each, each text shown twice), would make a
/// timeline of about 96 MB. It is refused with 422 `answer-too-large` naming `range`, and
/// again from the cached refusal, while a session of short prompts in the same tenant is
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_over_its_limit_is_refused_not_built() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "wire-answer-limit").await;
    let (_, admin) = ingest_api::control::store::create_api_key(
        &pool,
        "",
        t.id,
        shared::apikey::Scope::Admin,
        "settings",
    )
    .await
    .unwrap();
    let (st, body) = status_and_json(
        client
            .patch(format!("{}/v1/admin/settings", ingest.url()))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"store_prompt_text": true})),
    )
    .await;
    assert_eq!(st, 200, "{body}");

    let prompt = |session: &str, i: usize, text: &str| {
        serde_json::json!({
            "type": "metric.sample",
            "occurred_at": ago(600 - (i / 10) as i64),
            "data": {
                "name": "claude_code.user_prompt",
                "value": 1,
                "labels": {"session.id": session, "prompt.id": format!("p{i}"), "user.id": "u"},
                "extra": {"prompt": text},
            },
        })
    };
    let wide = "\u{1}".repeat(4000);
    for first in (0..2000).step_by(400) {
        let batch: Vec<Value> = (first..first + 400)
            .map(|i| prompt("wide", i, &wide))
            .collect();
        post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(batch)).await;
    }
    let short: Vec<Value> = (0..3).map(|i| prompt("short", i, "a plan")).collect();
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(short)).await;
    wait_projected(&pool, t.id, 2003, Duration::from_secs(120)).await;

    let timeline = |s: &str| format!("{}/v1/dashboard/sessions/{s}/timeline", query.url());
    let (st, problem) =
        status_and_json(client.get(timeline("wide")).bearer_auth(&t.read_key)).await;
    assert_eq!(st, 422, "{problem}");
    assert!(
        problem["type"]
            .as_str()
            .unwrap_or_default()
            .ends_with("answer-too-large"),
        "{problem}"
    );
    assert_eq!(problem["errors"][0]["field"], "range", "{problem}");
    // Asked again: refused again (the refusal is what was cached, not a part of the answer).
    let (st, _) = status_and_json(client.get(timeline("wide")).bearer_auth(&t.read_key)).await;
    assert_eq!(st, 422);

    let (st, answer) =
        status_and_json(client.get(timeline("short")).bearer_auth(&t.read_key)).await;
    assert_eq!(st, 200, "{answer}");
    assert_eq!(
        answer["prompts"].as_array().map(Vec::len),
        Some(3),
        "{answer}"
    );
    assert_eq!(answer["prompts"][0]["text"], "a plan", "{answer}");

    stop_all([projector, ingest, query]).await;
}
