//! W3C Trace Context on requests: accept a caller's `traceparent` (or start a trace) and pass a
//! child on (the context itself, its parsing and the sampler are `sagamesh_api::trace_context`).
//! `tracestate` is passed through untouched.
//!
//! Sampling is parent-based (OpenTelemetry's `ParentBased(TraceIdRatioBased)`): a caller's
//! sampled flag is kept, and a trace this sidecar starts is sampled by [`Sampler`] from its
//! trace id.

use http::{HeaderMap, HeaderName, HeaderValue};
pub use sagamesh_api::trace_context::{FLAG_SAMPLED, Sampler, TRACEPARENT, TraceContext};
/// [`TRACEPARENT`] as a header name (no parsing per request).
pub const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static(TRACEPARENT);

/// The `traceparent` header value. Marked sensitive so HPACK sends it as a literal that is
/// never indexed: a value unique to every request would only churn the HTTP/2 dynamic
/// table (an insert and an eviction per request) and push out headers that do repeat.
pub fn header_value(context: &TraceContext) -> HeaderValue {
    let mut v = match HeaderValue::from_bytes(&context.header_bytes()) {
        Ok(v) => v,
        // Unreachable: only hex digits and dashes are written.
        Err(_) => {
            HeaderValue::from_static("00-00000000000000000000000000000000-0000000000000000-00")
        }
    };
    v.set_sensitive(true);
    v
}

/// Replaces the request's `traceparent` with a child of it (or a new sampled root) and returns
/// the context sent on.
pub fn propagate(headers: &mut HeaderMap) -> TraceContext {
    propagate_with_parent(headers, Sampler::ALWAYS).1
}

/// Like [`propagate`], also returning the caller's context when it sent a valid one. The
/// caller's sampled flag is kept; a new root is sampled as `sampler` decides, written in the
/// flags sent on so the sidecars downstream follow it.
pub fn propagate_with_parent(
    headers: &mut HeaderMap,
    sampler: Sampler,
) -> (Option<TraceContext>, TraceContext) {
    let parent = headers
        .get(&TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let ctx = match parent {
        Some(p) => p.child(),
        None => TraceContext::new_root_sampled(sampler),
    };
    headers.insert(TRACEPARENT_HEADER, header_value(&ctx));
    (parent, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_keeps_trace_and_changes_span() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let c = propagate(&mut h);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let sent = h
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .expect("header");
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!sent.contains("00f067aa0ba902b7"));
        assert!(sent.ends_with("-01"));
        assert_eq!(TraceContext::parse(sent), Some(c));
    }

    #[test]
    fn header_is_the_w3c_form() {
        let c = TraceContext {
            trace_id: [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            flags: 1,
        };
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(c.to_header(), h);
        assert_eq!(header_value(&c), h);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let d = TraceContext { flags: 0xab, ..c };
        assert!(d.to_header().ends_with("-ab"));
        for _ in 0..100 {
            let r = TraceContext::new_root();
            assert_eq!(TraceContext::parse(&r.to_header()), Some(r));
        }
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn ids(value: &str) -> Option<(String, String, u8)> {
        TraceContext::parse(value).map(|c| (c.trace_id_hex(), c.span_id_hex(), c.flags))
    }

    /// The cases of W3C Trace Context's "Versioning of traceparent" and of its test suite
    /// (`test_traceparent_version_0x00`, `_0xcc`, `_0xff`).
    #[test]
    fn versions_are_parsed_as_the_spec_says() {
        let want = |flags| Some((TRACE.to_string(), SPAN.to_string(), flags));
        // Version 00: exactly four fields.
        assert_eq!(ids(&format!("00-{TRACE}-{SPAN}-01")), want(1));
        assert_eq!(ids(&format!("00-{TRACE}-{SPAN}-00")), want(0));
        for bad in [
            format!("00-{TRACE}-{SPAN}-01-what-the-future-will-be-like"),
            format!("00-{TRACE}-{SPAN}-01."),
            format!("00-{TRACE}-{SPAN}-01-"),
        ] {
            assert_eq!(ids(&bad), None, "{bad:?}");
        }
        // A higher version: the first four fields, followed by the end or a dash.
        assert_eq!(ids(&format!("cc-{TRACE}-{SPAN}-01")), want(1));
        assert_eq!(
            ids(&format!(
                "cc-{TRACE}-{SPAN}-01-what-the-future-will-be-like"
            )),
            want(1)
        );
        assert_eq!(ids(&format!("01-{TRACE}-{SPAN}-00-x")), want(0));
        // Unknown flag bits of a higher version are not carried on.
        assert_eq!(ids(&format!("cc-{TRACE}-{SPAN}-09-x")), want(1));
        for bad in [
            format!("cc-{TRACE}-{SPAN}-01.what-the-future-will-be-like"),
            format!("cc-{TRACE}-{SPAN}-1"),
            format!("cc-{TRACE}-{SPAN}"),
            format!("cc-{TRACE}-{SPAN}-0x-more"),
            format!("cc-{TRACE}x{SPAN}-01"),
            format!("cc-{TRACE}-{SPAN}x01-more"),
            format!("cc-00000000000000000000000000000000-{SPAN}-01-x"),
            format!("cc-{TRACE}-0000000000000000-01-x"),
            // Version ff is invalid, whatever follows.
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("ff-{TRACE}-{SPAN}-01-what-the-future-will-be-like"),
            // Versions are lower-case hex.
            format!("CC-{TRACE}-{SPAN}-01"),
            format!("0g-{TRACE}-{SPAN}-01"),
            format!("0-{TRACE}-{SPAN}-01"),
        ] {
            assert_eq!(ids(&bad), None, "{bad:?}");
        }
        // A higher version is passed on as version 00.
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_str(&format!("cc-{TRACE}-{SPAN}-01-more")).expect("value"),
        );
        let c = propagate(&mut h);
        assert_eq!(c.trace_id_hex(), TRACE);
        let sent = h[TRACEPARENT].to_str().expect("ascii");
        assert!(sent.starts_with(&format!("00-{TRACE}-")), "{sent}");
        assert!(sent.ends_with("-01"), "{sent}");
    }

    #[test]
    fn an_unsampled_parent_stays_unsampled() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_str(&format!("00-{TRACE}-{SPAN}-00")).expect("value"),
        );
        let (parent, c) = propagate_with_parent(&mut h, Sampler::ALWAYS);
        assert!(!parent.expect("parent").is_sampled());
        assert!(!c.is_sampled());
        assert!(h[TRACEPARENT].to_str().expect("ascii").ends_with("-00"));
        // And a sampled one stays sampled whatever this sidecar's ratio.
        h.insert(
            TRACEPARENT,
            HeaderValue::from_str(&format!("00-{TRACE}-{SPAN}-01")).expect("value"),
        );
        let (_, c) = propagate_with_parent(&mut h, Sampler::ratio(0.0));
        assert!(c.is_sampled());
    }

    #[test]
    fn roots_are_sampled_by_the_trace_id_ratio() {
        let id = |low: u64| {
            let mut id = [0xab; 16];
            id[8..].copy_from_slice(&low.to_be_bytes());
            id
        };
        let half = Sampler::ratio(0.5);
        // The 63-bit number: below 2^62 is sampled at 0.5.
        assert!(half.samples(&id(0)));
        assert!(half.samples(&id((1 << 63) - 2)));
        assert!(!half.samples(&id(1 << 63)));
        assert!(!half.samples(&id(u64::MAX)));
        assert!(Sampler::ratio(1.0).samples(&id(u64::MAX)));
        assert!(Sampler::ALWAYS.samples(&id(u64::MAX)));
        assert!(!Sampler::ratio(0.0).samples(&id(0)));
        assert!(!Sampler::ratio(f64::NAN).samples(&id(0)));

        let mut sampled = 0;
        for _ in 0..2000 {
            let mut h = HeaderMap::new();
            let (parent, c) = propagate_with_parent(&mut h, Sampler::ratio(0.25));
            assert_eq!(parent, None);
            assert_eq!(c.is_sampled(), Sampler::ratio(0.25).samples(&c.trace_id));
            let sent = h[TRACEPARENT].to_str().expect("ascii");
            assert!(sent.ends_with(if c.is_sampled() { "-01" } else { "-00" }));
            sampled += usize::from(c.is_sampled());
        }
        // 500 expected; the bounds are 10 standard deviations wide.
        assert!((300..700).contains(&sampled), "{sampled} of 2000");
        let mut h = HeaderMap::new();
        assert!(
            !propagate_with_parent(&mut h, Sampler::ratio(0.0))
                .1
                .is_sampled()
        );
    }

    #[test]
    fn invalid_parents_start_a_new_trace() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        let c = propagate(&mut h);
        assert_ne!(c.trace_id, [0; 16]);
    }
}
