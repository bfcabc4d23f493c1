//! The `otel` feature (`cargo test -p forgemq --features otel --test otel`): a publish made
//! inside a span carries the span's W3C trace context; each attempt runs in a CONSUMER span
//! linked to the producer (a child of it with `Subscription::trace_parent`), and an attempt
//! after a failure records a `retry` event. Spans are exported to memory through the
//! `tracing-opentelemetry` layer, on a private `redis-server`.
#![cfg(feature = "otel")]

use std::time::{Duration, Instant};

use forgemq::{Backoff, Client, HandlerError, Message, PublishOptions, Subscription, Worker};
use forgemq_test_support::RedisServer;
use opentelemetry::trace::{SpanKind, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{json, Value};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

fn processed(spans: &[SpanData], topic: &str) -> Vec<SpanData> {
    spans
        .iter()
        .filter(|s| s.name == format!("process {topic}"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_publish_in_a_span_links_the_consumer_span_to_it() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("forgemq-test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = RedisServer::start();
    let mq = Client::connect(&server.url()).await.unwrap();
    let request = tracing::info_span!("http.request");
    let producer = request.context().span().span_context().clone();
    assert!(producer.is_valid());
    let chosen = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    async {
        mq.publish("order.created", json!({"fail_once": false}))
            .await
            .unwrap();
        mq.publish("order.created", json!({"fail_once": true}))
            .await
            .unwrap();
        mq.publish("order.parented", json!({})).await.unwrap();
        // A traceparent the caller set is kept as it is.
        mq.publish_with(
            "order.chosen",
            json!({}),
            PublishOptions::new().header("traceparent", chosen),
        )
        .await
        .unwrap();
    }
    .instrument(request.clone())
    .await;
    drop(request);
    // Outside any span: no trace context is added.
    mq.publish("order.untraced", json!({})).await.unwrap();

    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "order.created",
            Subscription::new().backoff(Backoff::fixed(Duration::from_millis(50))),
            |m: Message<Value>| async move {
                if m.data["fail_once"] == true && m.retry == 0 {
                    Err(HandlerError::retry("the first attempt fails"))
                } else {
                    Ok(())
                }
            },
        )
        .subscribe_with(
            "order.parented",
            Subscription::new().trace_parent(true),
            |_m: Message<Value>| async { Ok::<(), HandlerError>(()) },
        )
        .subscribe_with(
            "order.chosen",
            Subscription::new(),
            |m: Message<Value>| async move {
                assert_eq!(
                    m.headers.get("traceparent").map(String::as_str),
                    Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                );
                Ok::<(), HandlerError>(())
            },
        )
        .subscribe_with(
            "order.untraced",
            Subscription::new(),
            |m: Message<Value>| async move {
                assert!(!m.headers.contains_key("traceparent"), "{:?}", m.headers);
                Ok::<(), HandlerError>(())
            },
        )
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stop_rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut done = 0;
        for t in [
            "order.created",
            "order.parented",
            "order.chosen",
            "order.untraced",
        ] {
            done += mq.stats(t).await.unwrap().processed;
        }
        if done == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of 5 processed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    running.await.unwrap().unwrap();
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    // Three attempts on order.created (one failed, then its retry): CONSUMER spans in
    // their own traces, each linked to the request span.
    let created = processed(&spans, "order.created");
    assert_eq!(created.len(), 3, "{created:#?}");
    for s in &created {
        assert_eq!(s.span_kind, SpanKind::Consumer);
        let links: Vec<_> = s.links.iter().map(|l| l.span_context.clone()).collect();
        assert_eq!(links.len(), 1, "{s:#?}");
        assert_eq!(links[0].trace_id(), producer.trace_id());
        assert_eq!(links[0].span_id(), producer.span_id());
        assert_ne!(s.span_context.trace_id(), producer.trace_id());
    }
    let retried: Vec<_> = created
        .iter()
        .filter(|s| s.events.iter().any(|e| e.name == "retry"))
        .collect();
    assert_eq!(
        retried.len(),
        1,
        "exactly the second attempt records a retry"
    );

    // trace_parent(true): the consumer span is a child in the producer's trace.
    let parented = processed(&spans, "order.parented");
    assert_eq!(parented.len(), 1);
    assert_eq!(parented[0].span_context.trace_id(), producer.trace_id());
    assert_eq!(parented[0].parent_span_id, producer.span_id());

    // The caller's own traceparent is linked, not replaced.
    let chosen_spans = processed(&spans, "order.chosen");
    assert_eq!(chosen_spans.len(), 1);
    assert_eq!(
        chosen_spans[0]
            .links
            .iter()
            .next()
            .unwrap()
            .span_context
            .trace_id()
            .to_string(),
        "0af7651916cd43dd8448eb211c80319c"
    );
    let untraced = processed(&spans, "order.untraced");
    assert_eq!(untraced.len(), 1);
    assert_eq!(untraced[0].links.len(), 0);
}
