//! A poison record written straight to the topic lands in the DLQ with its origin in the
//! headers, and the partition keeps flowing behind it.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::{json, Value};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_are_dead_lettered_and_do_not_block() {
    let TestEnv { pool, common } = test_env().await;
    shared::kafka::ensure_topics(
        &common,
        &[common.metrics_topic(), common.metrics_dlq_topic()],
    )
    .await
    .unwrap();
    let t = create_tenant(&pool, "poisoned").await;
    let producer: FutureProducer =
        shared::kafka::producer(&common, Duration::from_secs(10)).unwrap();
    let topic = common.metrics_topic();
    let ctx = api_context(t.id);
    let valid = |i: i64| {
        let env = ctx.envelope(0, command("u", "build", i, true)).unwrap();
        serde_json::to_vec(&env).unwrap()
    };
    // A valid envelope whose payload breaks the contract (as an old buggy writer might).
    let mut bad_env =
        serde_json::to_value(ctx.envelope(0, command("u", "build", 1, true)).unwrap()).unwrap();
    bad_env["data"]["duration_ms"] = json!(-5);
    let poison: Vec<Vec<u8>> = vec![
        b"\x00\x01 not json".to_vec(),
        serde_json::to_vec(&bad_env).unwrap(),
        br#"{"id": "x", "type": "command.executed"}"#.to_vec(),
    ];
    let mut sends: Vec<Vec<u8>> = vec![valid(1)];
    sends.extend(poison.iter().cloned());
    sends.extend((2..=20).map(valid));
    for payload in &sends {
        producer
            .send(
                FutureRecord::<str, [u8]>::to(&topic)
                    .partition(1)
                    .key("k")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }

    let projector = start_projector(&common).await;
    wait_projected(&pool, t.id, 20, Duration::from_secs(60)).await;
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        20
    );

    // The DLQ holds exactly the three poison records, with where they came from and why.
    let consumer: BaseConsumer = shared::kafka::client_config(&common)
        .set("group.id", format!("{}dlq-reader", common.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&common.metrics_dlq_topic()]).unwrap();
    let dead: Vec<(Vec<u8>, String, String, String)> = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while out.len() < 3 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let h = |k| {
                    String::from_utf8(projector::consumer::header(&m, k).unwrap().to_vec()).unwrap()
                };
                out.push((
                    m.payload().unwrap().to_vec(),
                    h("tally-source-partition"),
                    h("tally-source-offset"),
                    h("tally-error"),
                ));
            }
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (i, (payload, partition, offset, error)) in dead.iter().enumerate() {
        assert_eq!(payload, &poison[i]);
        assert_eq!(partition, "1");
        assert_eq!(offset, &(i + 1).to_string());
        assert!(!error.is_empty());
    }
    assert!(dead[1].3.contains("data.duration_ms"), "{}", dead[1].3);
    let _: Value = json!(null);
    projector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_and_redriven_after_a_fix() {
    let TestEnv { pool, common } = test_env().await;
    shared::kafka::ensure_topics(&common, &common.all_topics())
        .await
        .unwrap();
    let config = projector_config(&common);
    let projector = start_projector(&common).await;
    // Events of a tenant the control plane does not know (yet) are dead-lettered.
    let tenant = shared::tenant::TenantId::new();
    let ctx = api_context(tenant);
    let producer: FutureProducer =
        shared::kafka::producer(&common, Duration::from_secs(10)).unwrap();
    for i in 0..3 {
        let env = ctx.envelope(0, command("u", "build", i, true)).unwrap();
        let payload = serde_json::to_vec(&env).unwrap();
        producer
            .send(
                FutureRecord::<str, [u8]>::to(&common.metrics_topic())
                    .key(&env.kafka_key())
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let dlq = common.metrics_dlq_topic();
    let since = std::time::Instant::now();
    let letters = loop {
        let l = projector::tools::dead_letters(&config, &dlq).await.unwrap();
        if l.len() == 3 {
            break l;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "{} dead letters",
            l.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(letters
        .iter()
        .all(|d| d.error.contains("unknown tenant") && d.source_topic == common.metrics_topic()));

    // The fix: the tenant now exists. Redrive, twice — still counted once.
    sqlx::query("INSERT INTO control.tenants (id, name) VALUES ($1, 'late')")
        .bind(tenant.0)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        projector::tools::redrive(&config, &letters).await.unwrap(),
        3
    );
    wait_projected(&pool, tenant, 3, Duration::from_secs(60)).await;
    assert_eq!(
        projector::tools::redrive(&config, &letters).await.unwrap(),
        3
    );

    // Status: once everything is projected, no partition lags.
    let since = std::time::Instant::now();
    loop {
        let rows = projector::tools::status(&config, &pool).await.unwrap();
        assert_eq!(
            rows.len(),
            8,
            "4 partitions of the metrics and of the auth topic"
        );
        let lag: i64 = rows.iter().map(|r| r.lag).sum();
        let end: i64 = rows
            .iter()
            .filter(|r| r.topic == common.metrics_topic())
            .map(|r| r.log_end)
            .sum();
        if lag == 0 {
            assert_eq!(end, 9, "3 originals and 6 redriven records");
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(30), "lag {lag}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        projected_events(&pool, tenant).await,
        Some(3),
        "redriven twice, counted once"
    );
    projector.stop().await.unwrap();
}
