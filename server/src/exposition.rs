//! `/metrics` content negotiation, shared by every admin server (sidecar, operator, local mode).
//!
//! The registries encode OpenMetrics text only. A scraper that asks for OpenMetrics (Prometheus
//! does, at the highest q-value) gets that text unchanged; everyone else (older scrapers, curl,
//! `*/*`, no `Accept` at all) gets the Prometheus text format 0.0.4, as Prometheus' own client
//! libraries negotiate. Reading OpenMetrics as 0.0.4 is what made counters untyped: in
//! OpenMetrics `# TYPE x counter` names the family and its sample is `x_total`, while in 0.0.4
//! the TYPE line must name the sample itself.
//!
//! Why the conversion is hand-written: prometheus-client 0.25 has no 0.0.4 text encoder (its
//! `encoding::text` is OpenMetrics; the other encoders are protobuf), and the registries are
//! built elsewhere, so converting the OpenMetrics text keeps this independent of how they are
//! made. The input is what prometheus-client writes, which is strict OpenMetrics; lines this
//! does not understand are passed on unchanged rather than dropped.

use std::fmt::Write as _;

/// Content type of the OpenMetrics 1.0.0 answer.
pub const OPENMETRICS_1_0_0: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the OpenMetrics 0.0.1 answer (the draft; same text, older scrapers ask it).
pub const OPENMETRICS_0_0_1: &str = "application/openmetrics-text; version=0.0.1; charset=utf-8";
/// Content type of the Prometheus text format 0.0.4 answer.
pub const PROMETHEUS_TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition formats `/metrics` can answer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics1_0_0,
    OpenMetrics0_0_1,
    PrometheusText0_0_4,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics1_0_0 => OPENMETRICS_1_0_0,
            Format::OpenMetrics0_0_1 => OPENMETRICS_0_0_1,
            Format::PrometheusText0_0_4 => PROMETHEUS_TEXT_0_0_4,
        }
    }
}

/// The format an `Accept` header asks for: its media ranges sorted by q-value (ties keep their
/// order), the first one this server can produce wins; nothing matching means 0.0.4 text, the
/// format every Prometheus scraper understands. As Prometheus' `expfmt.Negotiate`, `*/*` does
/// not pick OpenMetrics.
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::PrometheusText0_0_4;
    };
    let mut ranges: Vec<(f32, Format)> = accept
        .split(',')
        .filter_map(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media_type = parts.next()?.to_ascii_lowercase();
            let mut q = 1.0_f32;
            let mut version = None;
            for param in parts {
                let Some((name, value)) = param.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match name.trim().to_ascii_lowercase().as_str() {
                    // An unparsable q counts as 0 (not acceptable) rather than 1.
                    "q" => q = value.parse().unwrap_or(0.0),
                    "version" => version = Some(value.to_string()),
                    _ => {}
                }
            }
            let format = match (media_type.as_str(), version.as_deref()) {
                ("application/openmetrics-text", None | Some("1.0.0")) => Format::OpenMetrics1_0_0,
                ("application/openmetrics-text", Some("0.0.1")) => Format::OpenMetrics0_0_1,
                ("text/plain", None | Some("0.0.4")) => Format::PrometheusText0_0_4,
                _ => return None,
            };
            (q > 0.0).then_some((q, format))
        })
        .collect();
    // Stable: equal q-values keep the order the client listed them in.
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranges
        .first()
        .map_or(Format::PrometheusText0_0_4, |(_, format)| *format)
}

/// The `/metrics` answer for a request with `accept`: the content type and the body, from the
/// OpenMetrics text a registry encoded.
pub fn render(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    let format = negotiate(accept);
    let body = match format {
        Format::OpenMetrics1_0_0 | Format::OpenMetrics0_0_1 => openmetrics,
        Format::PrometheusText0_0_4 => to_prometheus_text(&openmetrics),
    };
    (format.content_type(), body)
}

/// The OpenMetrics metric types and what 0.0.4 makes of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// Samples `x_total` (and `x_created`): typed under the name `x_total`.
    Counter,
    /// `x_info{...} 1`: a gauge named `x_info`.
    Info,
    /// Same names in both formats.
    Same(&'static str),
    /// gaugehistogram: 0.0.4 has no type for `_gcount`/`_gsum` buckets, so its samples are
    /// passed on without a TYPE line (untyped).
    Untyped,
}

impl Family {
    fn parse(openmetrics_type: &str) -> Self {
        match openmetrics_type {
            "counter" => Family::Counter,
            "info" => Family::Info,
            "gauge" => Family::Same("gauge"),
            "histogram" => Family::Same("histogram"),
            "summary" => Family::Same("summary"),
            // A stateset's samples are 0/1 per state label: a gauge in 0.0.4.
            "stateset" => Family::Same("gauge"),
            "unknown" => Family::Same("untyped"),
            _ => Family::Untyped,
        }
    }

    /// The name 0.0.4's HELP and TYPE lines carry for the family named `name`.
    fn sample_name(self, name: &str) -> String {
        match self {
            Family::Counter => format!("{name}_total"),
            Family::Info => format!("{name}_info"),
            Family::Same(_) | Family::Untyped => name.to_string(),
        }
    }

    fn type_0_0_4(self) -> Option<&'static str> {
        match self {
            Family::Counter => Some("counter"),
            Family::Info => Some("gauge"),
            Family::Same(t) => Some(t),
            Family::Untyped => None,
        }
    }
}

/// One family's metadata lines, held until its TYPE line says how to name them.
#[derive(Default)]
struct Metadata<'a> {
    name: &'a str,
    help: Option<&'a str>,
}

/// Converts OpenMetrics text to the Prometheus text format 0.0.4: HELP and TYPE lines name the
/// sample (`x_total` for counters, `x_info` for info), `_created` samples, `# UNIT`, `# EOF`
/// and exemplars are dropped, timestamps turn from seconds into milliseconds.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending = Metadata::default();
    let mut family: Option<(&str, Family)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            flush_help(&mut out, &mut pending, None);
            pending = Metadata {
                name,
                help: Some(help),
            };
            // HELP after TYPE (OpenMetrics allows either order): the type is known already.
            if let Some((family_name, kind)) = family
                && family_name == name
            {
                flush_help(&mut out, &mut pending, Some(kind));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = Family::parse(kind.trim());
            if pending.name != name {
                flush_help(&mut out, &mut pending, None);
            }
            pending.name = name;
            flush_help(&mut out, &mut pending, Some(kind));
            if let Some(t) = kind.type_0_0_4() {
                let _ = writeln!(out, "# TYPE {} {t}", kind.sample_name(name));
            }
            family = Some((name, kind));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else if line.starts_with('#') || line.trim().is_empty() {
            // Other comments mean nothing to either format.
            continue;
        } else {
            flush_help(&mut out, &mut pending, None);
            write_sample(&mut out, line, family);
        }
    }
    flush_help(&mut out, &mut pending, None);
    out
}

/// Writes a held HELP line, under the name 0.0.4 gives the family of type `kind`.
fn flush_help(out: &mut String, pending: &mut Metadata<'_>, kind: Option<Family>) {
    if let Some(help) = pending.help.take() {
        let name = kind.map_or_else(|| pending.name.to_string(), |k| k.sample_name(pending.name));
        let _ = writeln!(out, "# HELP {name} {}", help_0_0_4(help));
    }
    pending.name = "";
}

/// OpenMetrics escapes `\\`, `\n` and `"` in HELP; 0.0.4 knows only the first two there.
fn help_0_0_4(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('"')) => {
                out.push('"');
                chars.next();
            }
            ('\\', Some(escaped)) => {
                out.push('\\');
                out.push(escaped);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// Writes one sample line in 0.0.4 form, or nothing for a `_created` sample.
fn write_sample(out: &mut String, line: &str, family: Option<(&str, Family)>) {
    let (series, rest) = split_series(line);
    let name = series.split('{').next().unwrap_or(series);
    if let Some((family_name, kind)) = family
        && name.strip_suffix("_created") == Some(family_name)
        && matches!(
            kind,
            Family::Counter | Family::Same("histogram" | "summary") | Family::Untyped
        )
    {
        return;
    }
    // What follows the series: value, optional timestamp, optional `# exemplar`.
    let rest = rest.split(" # ").next().unwrap_or(rest);
    let mut fields = rest.split_ascii_whitespace();
    let Some(value) = fields.next() else {
        // Not a sample this understands: pass it on.
        let _ = writeln!(out, "{line}");
        return;
    };
    match fields.next().and_then(|t| t.parse::<f64>().ok()) {
        // OpenMetrics timestamps are seconds, 0.0.4's are integer milliseconds.
        Some(seconds) => {
            let _ = writeln!(
                out,
                "{series} {value} {}",
                (seconds * 1000.0).round() as i64
            );
        }
        None => {
            let _ = writeln!(out, "{series} {value}");
        }
    }
}

/// Splits a sample line after its name and label set; label values may hold spaces, `}` and
/// escaped quotes.
fn split_series(line: &str) -> (&str, &str) {
    let bytes = line.as_bytes();
    let mut in_labels = false;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_quotes {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_quotes = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'{' => in_labels = true,
            b'"' if in_labels => in_quotes = true,
            b'}' if in_labels => return (&line[..=i], &line[i + 1..]),
            b' ' if !in_labels => return (&line[..i], &line[i..]),
            _ => {}
        }
    }
    (line, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_3: &str = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
    const PROMETHEUS_2: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

    #[test]
    fn negotiation_follows_the_q_values() {
        use Format::*;
        for (accept, want) in [
            (None, PrometheusText0_0_4),
            (Some(""), PrometheusText0_0_4),
            (Some("*/*"), PrometheusText0_0_4),
            (Some("text/plain"), PrometheusText0_0_4),
            (Some("text/plain;version=0.0.4"), PrometheusText0_0_4),
            (Some(PROMETHEUS_2), OpenMetrics1_0_0),
            (Some(PROMETHEUS_3), OpenMetrics1_0_0),
            (Some("application/openmetrics-text"), OpenMetrics1_0_0),
            (
                Some("Application/OpenMetrics-Text; Version=\"1.0.0\""),
                OpenMetrics1_0_0,
            ),
            // Prometheus 2.0's header.
            (
                Some(
                    "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics0_0_1,
            ),
            // Text preferred by q-value, whatever the order.
            (
                Some("application/openmetrics-text;q=0.3,text/plain;version=0.0.4;q=0.7"),
                PrometheusText0_0_4,
            ),
            // Equal q-values: the first listed wins.
            (
                Some("text/plain;version=0.0.4,application/openmetrics-text"),
                PrometheusText0_0_4,
            ),
            (
                Some("application/openmetrics-text, text/plain;version=0.0.4"),
                OpenMetrics1_0_0,
            ),
            // q=0 means "not acceptable".
            (
                Some("application/openmetrics-text;q=0,*/*"),
                PrometheusText0_0_4,
            ),
            // Versions this server cannot produce do not match.
            (
                Some("application/openmetrics-text;version=2.0.0,*/*;q=0.1"),
                PrometheusText0_0_4,
            ),
            (
                Some("text/plain;version=1.0.0,application/openmetrics-text;q=0.5"),
                OpenMetrics1_0_0,
            ),
            (
                Some(
                    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,text/plain;version=0.0.4;q=0.3",
                ),
                PrometheusText0_0_4,
            ),
        ] {
            assert_eq!(negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn openmetrics_is_passed_on_unchanged() {
        let text = "# TYPE a counter\na_total 1\n# EOF\n".to_string();
        assert_eq!(
            render(text.clone(), Some(PROMETHEUS_2)),
            (OPENMETRICS_1_0_0, text.clone())
        );
        let (content_type, body) = render(text, Some("*/*"));
        assert_eq!(content_type, PROMETHEUS_TEXT_0_0_4);
        assert_eq!(body, "# TYPE a_total counter\na_total 1\n");
    }

    #[test]
    fn converts_every_openmetrics_type() {
        let openmetrics = concat!(
            "# HELP requests Requests answered.\n",
            "# TYPE requests counter\n",
            "requests_total{direction=\"outbound\",destination=\"web\"} 3\n",
            "requests_created{direction=\"outbound\",destination=\"web\"} 1700000000.5\n",
            "# HELP bytes Bytes \\\"sent\\\"\\\\n.\n",
            "# TYPE bytes counter\n",
            "# UNIT bytes bytes\n",
            "bytes_total 7 # {trace_id=\"4bf9\"} 1.0 1700000000.123\n",
            "# HELP in_flight Requests in flight.\n",
            "# TYPE in_flight gauge\n",
            "in_flight{destination=\"a b}c \\\"q\\\" # x\"} 2\n",
            "# HELP latency_seconds Latency.\n",
            "# TYPE latency_seconds histogram\n",
            "# UNIT latency_seconds seconds\n",
            "latency_seconds_sum 0.5\n",
            "latency_seconds_count 2\n",
            "latency_seconds_bucket{le=\"0.1\"} 1\n",
            "latency_seconds_bucket{le=\"+Inf\"} 2\n",
            "latency_seconds_created 1700000000\n",
            "# TYPE build info\n",
            "build_info{version=\"1.2\"} 1\n",
            "# TYPE mode stateset\n",
            "mode{mode=\"on\"} 1\n",
            "mode{mode=\"off\"} 0\n",
            "# TYPE queue gaugehistogram\n",
            "queue_bucket{le=\"+Inf\"} 3\n",
            "queue_gcount 3\n",
            "queue_gsum 9\n",
            "# TYPE other unknown\n",
            "other 1.5 1700000000.25\n",
            "# EOF\n",
        );
        let want = concat!(
            "# HELP requests_total Requests answered.\n",
            "# TYPE requests_total counter\n",
            "requests_total{direction=\"outbound\",destination=\"web\"} 3\n",
            "# HELP bytes_total Bytes \"sent\"\\\\n.\n",
            "# TYPE bytes_total counter\n",
            "bytes_total 7\n",
            "# HELP in_flight Requests in flight.\n",
            "# TYPE in_flight gauge\n",
            "in_flight{destination=\"a b}c \\\"q\\\" # x\"} 2\n",
            "# HELP latency_seconds Latency.\n",
            "# TYPE latency_seconds histogram\n",
            "latency_seconds_sum 0.5\n",
            "latency_seconds_count 2\n",
            "latency_seconds_bucket{le=\"0.1\"} 1\n",
            "latency_seconds_bucket{le=\"+Inf\"} 2\n",
            "# TYPE build_info gauge\n",
            "build_info{version=\"1.2\"} 1\n",
            "# TYPE mode gauge\n",
            "mode{mode=\"on\"} 1\n",
            "mode{mode=\"off\"} 0\n",
            "queue_bucket{le=\"+Inf\"} 3\n",
            "queue_gcount 3\n",
            "queue_gsum 9\n",
            "# TYPE other untyped\n",
            "other 1.5 1700000000250\n",
        );
        assert_eq!(to_prometheus_text(openmetrics), want);
    }

    #[test]
    fn the_converted_text_parses_with_typed_counters() {
        use prometheus_parse::{Scrape, Value};
        let openmetrics = concat!(
            "# HELP requests Requests answered.\n",
            "# TYPE requests counter\n",
            "requests_total{destination=\"web\"} 3\n",
            "# HELP latency_seconds Latency.\n",
            "# TYPE latency_seconds histogram\n",
            "latency_seconds_sum 0.5\n",
            "latency_seconds_count 2\n",
            "latency_seconds_bucket{le=\"+Inf\"} 2\n",
            "# EOF\n",
        );
        let text = to_prometheus_text(openmetrics);
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("0.0.4 parses");
        let requests = scrape
            .samples
            .iter()
            .find(|s| s.metric == "requests_total")
            .expect("requests_total");
        assert!(matches!(requests.value, Value::Counter(v) if v == 3.0));
        assert_eq!(scrape.docs["requests_total"], "Requests answered.");
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == "latency_seconds" && matches!(s.value, Value::Histogram(_)))
        );
    }
}
