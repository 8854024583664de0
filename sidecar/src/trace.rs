//! W3C Trace Context: accept a caller's `traceparent` (or start a trace) and pass a child on.
//! Only `traceparent` version 00 is parsed; `tracestate` is passed through untouched.

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

impl TraceContext {
    /// Parses a `traceparent` value; `None` when invalid (all-zero ids are invalid).
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        if version != "00" {
            return None;
        }
        let trace_id = hex_decode::<16>(parts.next()?)?;
        let span_id = hex_decode::<8>(parts.next()?)?;
        let flags = hex_decode::<1>(parts.next()?)?[0];
        if parts.next().is_some() || trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
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

/// Replaces the request's `traceparent` with a child of it (or a new root) and returns the
/// context sent on.
pub fn propagate(headers: &mut HeaderMap) -> TraceContext {
    propagate_with_parent(headers).1
}

/// Like [`propagate`], also returning the caller's context when it sent a valid one.
pub fn propagate_with_parent(headers: &mut HeaderMap) -> (Option<TraceContext>, TraceContext) {
    let parent = headers
        .get(&TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let ctx = match parent {
        Some(p) => p.child(),
        None => TraceContext::new_root(),
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

    #[test]
    fn invalid_parents_start_a_new_trace() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
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
