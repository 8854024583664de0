//! W3C Trace Context: accept a caller's `traceparent` (or start a trace) and pass a child on.
//! Only `traceparent` version 00 is parsed; `tracestate` is passed through untouched.

use http::{HeaderMap, HeaderValue};
use rand::Rng;

pub const TRACEPARENT: &str = "traceparent";

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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

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
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
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
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let ctx = match parent {
        Some(p) => p.child(),
        None => TraceContext::new_root(),
    };
    if let Ok(v) = HeaderValue::from_str(&ctx.to_header()) {
        headers.insert(TRACEPARENT, v);
    }
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
