//! W3C Trace Context (`traceparent`) and the hex and random-id helpers every Sagamesh part
//! uses: the sidecar continues or starts traces per request, the saga engine sends one trace
//! per saga, the OTLP exporter writes the ids, the file store names sagas.
//!
//! Version 00 is parsed strictly; a higher version by its first four fields, as the spec's
//! "Versioning of traceparent" asks, and passed on as version 00. Sampling of new roots is
//! OpenTelemetry's `TraceIdRatioBased` ([`Sampler`]), so every sidecar with the same ratio
//! decides the same way from the trace id alone.

use rand::Rng;

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// `N` bytes from exactly `2 * N` lower-case hex digits.
pub fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
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
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = HEX[usize::from(b >> 4)];
        o[1] = HEX[usize::from(b & 0x0f)];
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    // Only ASCII hex digits were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Length of a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
pub const TRACEPARENT_LEN: usize = 55;

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

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    pub fn to_header(&self) -> String {
        String::from_utf8(self.header_bytes().to_vec()).unwrap_or_default()
    }

    /// The `traceparent` value as bytes (no allocation: it is written on every request).
    pub fn header_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut b = [b'-'; TRACEPARENT_LEN];
        b[0] = b'0';
        b[1] = b'0';
        hex_into(&self.trace_id, &mut b[3..35]);
        hex_into(&self.span_id, &mut b[36..52]);
        hex_into(&[self.flags], &mut b[53..55]);
        b
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

/// A random id in the UUID version 4 form (`8-4-4-4-12` lower-case hex), as Kubernetes gives
/// objects their `uid`.
pub fn random_uid() -> String {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex = hex(&bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_upper_case_or_odd_lengths() {
        let bytes = [0x00, 0x0f, 0xa5, 0xff];
        assert_eq!(hex(&bytes), "000fa5ff");
        assert_eq!(hex_decode::<4>("000fa5ff"), Some(bytes));
        assert_eq!(hex_decode::<4>("000FA5FF"), None);
        assert_eq!(hex_decode::<4>("000fa5f"), None);
        assert_eq!(hex_decode::<4>("000fa5fg"), None);
    }

    #[test]
    fn header_form_parses_back() {
        let root = TraceContext::new_root();
        let header = root.to_header();
        assert_eq!(header.len(), TRACEPARENT_LEN);
        assert_eq!(TraceContext::parse(&header), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }

    #[test]
    fn uids_are_version_4() {
        let uid = random_uid();
        let parts: Vec<_> = uid.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{uid}");
        assert_eq!(&uid[14..15], "4", "{uid}");
        assert!(matches!(&uid[19..20], "8" | "9" | "a" | "b"), "{uid}");
        assert_ne!(random_uid(), uid);
    }
}
