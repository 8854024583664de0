//! W3C Trace Context: accept a caller's `traceparent` (or start a trace) and pass a child on.
//! Version 00 is parsed strictly; a higher version by its first four fields, as the spec's
//! "Versioning of traceparent" asks, and passed on as version 00. `tracestate` is passed
//! through untouched.
//!
//! Sampling is parent-based (OpenTelemetry's `ParentBased(TraceIdRatioBased)`): a caller's
//! sampled flag is kept, and a trace this sidecar starts is sampled by [`Sampler`] from its
//! trace id, so every sidecar with the same ratio decides the same way.

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

pub const TRACEPARENT: &str = "traceparent";
/// [`TRACEPARENT`] as a header name (no parsing per request).
pub const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static(TRACEPARENT);

/// A parsed `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `bytes` into `out` (twice as long). Runs on every proxied request, so no
/// formatting machinery and no allocation.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = HEX[usize::from(b >> 4)];
        o[1] = HEX[usize::from(b & 0x0f)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    // Only ASCII hex digits were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Length of a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const TRACEPARENT_LEN: usize = 55;

/// The `sampled` bit of the trace flags.
pub const FLAG_SAMPLED: u8 = 0x01;

impl TraceContext {
    /// Parses a `traceparent` value; `None` when invalid (all-zero ids are invalid).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let version = hex_decode::<1>(value.get(..2)?)?[0];
        if value.as_bytes().get(2) != Some(&b'-') || version == 0xff {
            return None;
        }
        let fields = if version == 0 {
            // Version 00 is exactly four fields.
            if value.len() != TRACEPARENT_LEN {
                return None;
            }
            value
        } else {
            // A higher version: its first four fields, which must end the value or be
            // followed by a dash; what comes after is for that version only.
            match value.len().cmp(&TRACEPARENT_LEN) {
                std::cmp::Ordering::Less => return None,
                std::cmp::Ordering::Equal => value,
                std::cmp::Ordering::Greater if value.as_bytes()[TRACEPARENT_LEN] == b'-' => {
                    &value[..TRACEPARENT_LEN]
                }
                std::cmp::Ordering::Greater => return None,
            }
        };
        let mut parts = fields.split('-').skip(1);
        let trace_id = hex_decode::<16>(parts.next()?)?;
        let span_id = hex_decode::<8>(parts.next()?)?;
        let mut flags = hex_decode::<1>(parts.next()?)?[0];
        if parts.next().is_some() || trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        if version != 0 {
            // Only the sampled bit is known; the other bits may mean something else there.
            flags &= FLAG_SAMPLED;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// Whether the caller (or this sidecar, for a root) records this trace.
    pub fn is_sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED == FLAG_SAMPLED
    }

    /// A new root, sampled or not as `sampler` decides from its trace id.
    pub fn new_root_sampled(sampler: Sampler) -> Self {
        let mut root = Self::new_root();
        root.flags = if sampler.samples(&root.trace_id) {
            FLAG_SAMPLED
        } else {
            0
        };
        root
    }

    /// A new sampled root.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        while trace_id == [0; 16] {
            rng.fill(&mut trace_id);
        }
        while span_id == [0; 8] {
            rng.fill(&mut span_id);
        }
        TraceContext {
            trace_id,
            span_id,
            flags: 1,
        }
    }

    /// A child: same trace, new span id.
    pub fn child(&self) -> Self {
        let mut c = Self::new_root();
        c.trace_id = self.trace_id;
        c.flags = self.flags;
        c
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn to_header(&self) -> String {
        String::from_utf8(self.header_bytes().to_vec()).unwrap_or_default()
    }

    fn header_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut b = [b'-'; TRACEPARENT_LEN];
        b[0] = b'0';
        b[1] = b'0';
        hex_into(&self.trace_id, &mut b[3..35]);
        hex_into(&self.span_id, &mut b[36..52]);
        hex_into(&[self.flags], &mut b[53..55]);
        b
    }

    /// The `traceparent` header value. Marked sensitive so HPACK sends it as a literal that is
    /// never indexed: a value unique to every request would only churn the HTTP/2 dynamic
    /// table (an insert and an eviction per request) and push out headers that do repeat.
    pub fn to_header_value(&self) -> HeaderValue {
        let mut v = match HeaderValue::from_bytes(&self.header_bytes()) {
            Ok(v) => v,
            // Unreachable: only hex digits and dashes are written.
            Err(_) => {
                HeaderValue::from_static("00-00000000000000000000000000000000-0000000000000000-00")
            }
        };
        v.set_sensitive(true);
        v
    }
}

/// Decides whether a trace this sidecar starts is sampled: a trace-id ratio as in
/// OpenTelemetry's `TraceIdRatioBased` (the trace id's last 8 bytes, big-endian, shifted right
/// by one, below `ratio * 2^63`), so the decision follows from the id alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    /// Sampled when the trace id's 63-bit number is below this; `None`: always sampled.
    upper_bound: Option<u64>,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::ALWAYS
    }
}

impl Sampler {
    /// Samples every trace (ratio 1.0).
    pub const ALWAYS: Sampler = Sampler { upper_bound: None };

    /// Samples `ratio` of the traces, clamped to 0.0..=1.0 (validated where it is configured).
    pub fn ratio(ratio: f64) -> Self {
        if ratio >= 1.0 {
            return Sampler::ALWAYS;
        }
        // NaN and negatives sample nothing; the cast saturates.
        let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
        Sampler {
            upper_bound: Some(bound),
        }
    }

    /// Whether the trace `trace_id` is sampled.
    pub fn samples(&self, trace_id: &[u8; 16]) -> bool {
        let Some(bound) = self.upper_bound else {
            return true;
        };
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        (u64::from_be_bytes(low) >> 1) < bound
    }
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
    headers.insert(TRACEPARENT_HEADER, ctx.to_header_value());
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
        assert_eq!(c.to_header_value(), h);
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
        TraceContext::parse(value).map(|c| (c.trace_id_hex(), hex(&c.span_id), c.flags))
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
