//! W3C trace context, with the `otel` feature: a publish made inside a `tracing` span
//! carries that span's context as the `traceparent` (and `tracestate`) headers, and each
//! attempt runs in a CONSUMER span linked to it (parented to it with
//! [`Subscription::trace_parent`](crate::Subscription::trace_parent)). The spans reach
//! OpenTelemetry through the `tracing-opentelemetry` layer the application installs.

use std::borrow::Cow;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{Headers, Message};

/// The headers to publish: `given`, plus the current span's `traceparent` and `tracestate`
/// unless the caller set a `traceparent` or no span with a valid context is current.
pub(crate) fn with_current_context(given: &Headers) -> Cow<'_, Headers> {
    if given.contains_key("traceparent") {
        return Cow::Borrowed(given);
    }
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return Cow::Borrowed(given);
    }
    let mut headers = given.clone();
    headers.insert(
        "traceparent".to_owned(),
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        headers.insert("tracestate".to_owned(), state);
    }
    Cow::Owned(headers)
}

/// The producer's span context from a message's `traceparent` (and `tracestate`), if it is
/// a valid W3C trace context.
pub(crate) fn producer_context(headers: &Headers) -> Option<SpanContext> {
    let mut parts = headers.get("traceparent")?.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; a later version may add more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = headers
        .get("tracestate")
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        state,
    ))
}

/// The CONSUMER span of one attempt at `message`: linked to the producer's context, or
/// its child when `parent` is set; an attempt after a failure records a `retry` event.
pub(crate) fn attempt_span<T>(message: &Message<T>, parent: bool) -> tracing::Span {
    let span = tracing::info_span!(
        "forgemq.process",
        otel.name = %format!("process {}", message.topic),
        otel.kind = "consumer",
        messaging.system = "forgemq",
        messaging.operation.type = "process",
        messaging.destination.name = %message.topic,
        messaging.message.id = %message.id,
        messaging.forgemq.retry = message.retry,
    );
    if let Some(producer) = producer_context(&message.headers) {
        if parent {
            let _ =
                span.set_parent(opentelemetry::Context::new().with_remote_span_context(producer));
        } else {
            span.add_link(producer);
        }
    }
    if message.retry > 0 || message.recoveries > 0 {
        tracing::info!(
            parent: &span,
            retry = message.retry,
            recoveries = message.recoveries,
            "retry"
        );
    }
    span
}

/// The CONSUMER span of one batch: linked to the producer of every message in it.
pub(crate) fn batch_span<T>(topic: &str, messages: &[Message<T>]) -> tracing::Span {
    let span = tracing::info_span!(
        "forgemq.process",
        otel.name = %format!("process {topic}"),
        otel.kind = "consumer",
        messaging.system = "forgemq",
        messaging.operation.type = "process",
        messaging.destination.name = %topic,
        messaging.batch.message_count = messages.len(),
    );
    for m in messages {
        if let Some(producer) = producer_context(&m.headers) {
            span.add_link(producer);
        }
        if m.retry > 0 {
            tracing::info!(parent: &span, id = %m.id, retry = m.retry, "retry");
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_per_w3c() {
        let mut h = Headers::new();
        h.insert(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        h.insert("tracestate".into(), "congo=t61rcWkgMzE".into());
        let sc = producer_context(&h).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "nonsense",
        ] {
            h.insert("traceparent".into(), bad.into());
            assert!(producer_context(&h).is_none(), "{bad}");
        }
    }
}
