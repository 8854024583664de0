//! The demo's verdicts and its two reports: the terminal one and a self-contained HTML page with
//! charts (inline SVG, no scripts, no external files).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use sagamesh_api::saga::{CallPhase, SagaPhase};
use sagamesh_saga::file_store::StoredSaga;

use super::{Findings, ended, traffic::Sample};
use crate::style::{Style, table};

pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

fn shares(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut shares = BTreeMap::new();
    for s in samples.iter().filter(|s| s.ok()) {
        *shares
            .entry(s.instance.clone().unwrap_or_else(|| "?".into()))
            .or_insert(0) += 1;
    }
    shares
}

fn percentile(samples: &[Sample], p: f64) -> Duration {
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    latencies.sort();
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
    latencies[index.min(latencies.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Compensations in the order they completed.
fn compensations(saga: &StoredSaga) -> Vec<String> {
    saga.record
        .status
        .history
        .iter()
        .filter(|e| e.kind == "CompensationSucceeded")
        .filter_map(|e| e.step.clone())
        .collect()
}

fn saga<'a>(findings: &'a Findings, name: &str) -> Option<&'a StoredSaga> {
    findings.sagas.iter().find(|s| s.name == name)
}

pub fn checks(f: &Findings) -> Vec<Check> {
    let mut checks = Vec::new();
    let users = f.instances.iter().filter(|i| i.service == "users").count();
    let ok = f.balance.iter().filter(|s| s.ok()).count();
    let shares = shares(&f.balance);
    let third = ok as f64 / users as f64;
    let balanced = shares.len() == users
        && shares
            .values()
            .all(|&n| (n as f64 - third).abs() <= 0.1 * third);
    checks.push(Check {
        name: "traffic balanced over the 3 users instances (each within 10% of a third)".into(),
        passed: balanced,
        detail: shares
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    });
    let failed_balance = f.balance.len() - ok;
    checks.push(Check {
        name: "no failed request while balancing".into(),
        passed: failed_balance == 0 && !f.balance.is_empty(),
        detail: format!("{failed_balance} of {} failed", f.balance.len()),
    });
    let failed_kill = f.kill.iter().filter(|s| !s.ok()).count();
    let mut causes: Vec<String> = f
        .kill
        .iter()
        .filter(|s| !s.ok())
        .map(|s| format!("{} {}", s.status, s.error.as_deref().unwrap_or("")))
        .collect();
    causes.sort();
    causes.dedup();
    checks.push(Check {
        name: "no failed request while users-2 was killed".into(),
        passed: failed_kill == 0 && !f.kill.is_empty(),
        detail: format!(
            "{failed_kill} of {} failed{}",
            f.kill.len(),
            if causes.is_empty() {
                String::new()
            } else {
                format!(": {}", causes.join("; "))
            }
        ),
    });
    let after_kill = f
        .kill
        .iter()
        .filter(|s| s.at > f.kill_at + Duration::from_millis(500))
        .count();
    checks.push(Check {
        name: format!("{} ({}) ejected by the client's circuit breaker", f.victim.name, f.victim.endpoint()),
        passed: f.victim_ejections >= 1 && after_kill > 0,
        detail: format!("{} ejection(s) in the client sidecar's metrics; {after_kill} requests served by the others afterwards", f.victim_ejections),
    });
    let ok_saga = saga(f, "order-1001");
    checks.push(Check {
        name: "order-1001 Succeeded".into(),
        passed: ok_saga.is_some_and(|s| ended(s, SagaPhase::Succeeded)),
        detail: ok_saga
            .map(|s| format!("{:?}", s.record.status.phase))
            .unwrap_or_else(|| "missing".into()),
    });
    let declined = saga(f, "order-1002");
    let order = declined.map(compensations).unwrap_or_default();
    checks.push(Check {
        name: "order-1002 declined at payment and Compensated in reverse order".into(),
        passed: declined.is_some_and(|s| ended(s, SagaPhase::Compensated))
            && order == ["reserve-stock", "create-order"],
        detail: format!(
            "compensated: {}",
            if order.is_empty() {
                "nothing".into()
            } else {
                order.join(" then ")
            }
        ),
    });
    checks
}

fn bar(count: usize, max: usize, width: usize) -> String {
    let filled = (count * width).checked_div(max).unwrap_or(0).min(width);
    format!("{}{}", "█".repeat(filled), "·".repeat(width - filled))
}

pub fn terminal(f: &Findings, checks: &[Check], style: &Style) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{}", style.bold("━━ Sagamesh demo report ━━"));

    let _ = writeln!(
        out,
        "\n{}",
        style.bold("Balancing (RoundRobin, through the client sidecar)")
    );
    let balance = shares(&f.balance);
    let total: usize = balance.values().sum();
    let max = balance.values().copied().max().unwrap_or(0);
    let mut rows = vec![
        ["INSTANCE", "REQUESTS", "SHARE", ""]
            .map(String::from)
            .to_vec(),
    ];
    for (instance, count) in &balance {
        rows.push(vec![
            instance.clone(),
            count.to_string(),
            format!("{:.1}%", 100.0 * *count as f64 / total.max(1) as f64),
            bar(*count, max, 30),
        ]);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "latency p50 {}  p99 {}",
        ms(percentile(&f.balance, 0.5)),
        ms(percentile(&f.balance, 0.99))
    );

    let _ = writeln!(
        out,
        "\n{}",
        style.bold(&format!(
            "Failure: {} killed (SIGKILL) at {:.1}s",
            f.victim.name,
            f.kill_at.as_secs_f64()
        ))
    );
    let before: Vec<Sample> = f
        .kill
        .iter()
        .filter(|s| s.at < f.kill_at)
        .cloned()
        .collect();
    let after: Vec<Sample> = f
        .kill
        .iter()
        .filter(|s| s.at >= f.kill_at)
        .cloned()
        .collect();
    let mut rows = vec![
        ["", "REQUESTS", "FAILED", "P50", "P99", "SERVED BY"]
            .map(String::from)
            .to_vec(),
    ];
    for (label, samples) in [("before the kill", &before), ("after the kill", &after)] {
        let served: Vec<String> = shares(samples).keys().cloned().collect();
        rows.push(vec![
            label.into(),
            samples.len().to_string(),
            samples.iter().filter(|s| !s.ok()).count().to_string(),
            ms(percentile(samples, 0.5)),
            ms(percentile(samples, 0.99)),
            served.join(" "),
        ]);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "ejections of {} in the client sidecar: {}",
        f.victim.endpoint(),
        f.victim_ejections
    );

    let _ = writeln!(out, "\n{}", style.bold("Sagas"));
    for saga in &f.sagas {
        out.push_str(&crate::saga_cmd::describe(
            &saga.namespace,
            &saga.name,
            &saga.record.status,
            style,
        ));
        out.push('\n');
    }

    let _ = writeln!(out, "{}", style.bold("Checks"));
    for check in checks {
        let mark = if check.passed {
            style.green("✔")
        } else {
            style.red("✘")
        };
        let _ = writeln!(out, "  {mark} {}  {}", check.name, style.dim(&check.detail));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLOURS: [&str; 6] = [
    "#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#dc2626",
];

/// Latency of each request over time, one colour per instance, the kill marked.
fn latency_chart(samples: &[Sample], kill_at: Option<Duration>) -> String {
    let (w, h, pad) = (760.0, 260.0, 40.0);
    let t_max = samples
        .iter()
        .map(|s| s.at.as_secs_f64())
        .fold(0.1, f64::max);
    let l_max = samples
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .fold(1.0, f64::max);
    let instances: Vec<String> = shares(samples).keys().cloned().collect();
    let mut svg = format!(
        r##"<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="latency over time"><rect x="{pad}" y="10" width="{}" height="{}" fill="#f8fafc" stroke="#cbd5e1"/>"##,
        w - pad - 10.0,
        h - pad - 10.0
    );
    for s in samples {
        let x = pad + s.at.as_secs_f64() / t_max * (w - pad - 10.0);
        let y = h - pad - (s.latency.as_secs_f64() * 1000.0 / l_max) * (h - pad - 20.0);
        let colour = if !s.ok() {
            "#dc2626"
        } else {
            let i = s
                .instance
                .as_ref()
                .and_then(|n| instances.iter().position(|x| x == n))
                .unwrap_or(0);
            COLOURS[i % COLOURS.len()]
        };
        let _ = write!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="1.8" fill="{colour}" fill-opacity="0.7"/>"#
        );
    }
    if let Some(kill) = kill_at {
        let x = pad + kill.as_secs_f64() / t_max * (w - pad - 10.0);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="10" x2="{x:.1}" y2="{}" stroke="#dc2626" stroke-dasharray="4 3"/><text x="{:.1}" y="24" font-size="12" fill="#dc2626">instance killed</text>"##,
            h - pad,
            x + 4.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{pad}" y="{}" font-size="12">0 s</text><text x="{}" y="{}" font-size="12" text-anchor="end">{t_max:.1} s</text><text x="4" y="20" font-size="12">{l_max:.1} ms</text><text x="4" y="{}" font-size="12">0</text>"#,
        h - 22.0,
        w - 10.0,
        h - 22.0,
        h - pad
    );
    for (i, name) in instances.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<circle cx="{}" cy="{}" r="5" fill="{}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            pad + 10.0 + 120.0 * i as f64,
            h - 6.0,
            COLOURS[i % COLOURS.len()],
            pad + 18.0 + 120.0 * i as f64,
            h - 2.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn share_chart(samples: &[Sample]) -> String {
    let shares = shares(samples);
    let max = shares.values().copied().max().unwrap_or(1).max(1) as f64;
    let mut svg = format!(
        r#"<svg viewBox="0 0 760 {}" width="100%" role="img" aria-label="requests per instance">"#,
        30 * shares.len() + 10
    );
    for (i, (name, count)) in shares.iter().enumerate() {
        let y = 10 + 30 * i;
        let width = 500.0 * *count as f64 / max;
        let _ = write!(
            svg,
            r#"<text x="0" y="{}" font-size="13">{}</text><rect x="120" y="{y}" width="{width:.1}" height="20" fill="{}"/><text x="{:.1}" y="{}" font-size="13">{count}</text>"#,
            y + 15,
            escape(name),
            COLOURS[i % COLOURS.len()],
            126.0 + width,
            y + 15
        );
    }
    svg.push_str("</svg>");
    svg
}

fn saga_html(saga: &StoredSaga) -> String {
    let status = &saga.record.status;
    let phase_class = |p: CallPhase| match p {
        CallPhase::Succeeded => "ok",
        CallPhase::Failed => "bad",
        _ => "dim",
    };
    let mut html = format!(
        "<h3>{}/{} — <span class=\"{}\">{:?}</span></h3><table><tr><th>step</th><th>action</th><th>compensation</th><th>error</th></tr>",
        escape(&saga.namespace),
        escape(&saga.name),
        if status.phase == SagaPhase::Failed {
            "bad"
        } else {
            "ok"
        },
        status.phase
    );
    for step in &status.steps {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"{}\">{:?}{}</td><td class=\"{}\">{:?}</td><td>{}</td></tr>",
            escape(&step.name),
            phase_class(step.action.phase),
            step.action.phase,
            step.action
                .http_status
                .map(|s| format!(" ({s})"))
                .unwrap_or_default(),
            phase_class(step.compensation.phase),
            step.compensation.phase,
            escape(step.action.error.as_deref().unwrap_or(""))
        );
    }
    html.push_str("</table><ol class=\"history\">");
    for event in &status.history {
        let _ = write!(
            html,
            "<li>{} {}</li>",
            escape(&event.kind),
            escape(event.step.as_deref().unwrap_or(""))
        );
    }
    html.push_str("</ol>");
    html
}

pub fn html(f: &Findings, checks: &[Check]) -> String {
    let mut html = String::from(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sagamesh demo report</title><style>
body{font:15px/1.5 system-ui,sans-serif;max-width:820px;margin:2em auto;padding:0 1em;color:#0f172a}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #e2e8f0}table{border-collapse:collapse;margin:.5em 0}
td,th{padding:.25em .8em;border-bottom:1px solid #e2e8f0;text-align:left}.ok{color:#15803d}.bad{color:#b91c1c}.dim{color:#64748b}
.history{columns:2;font-size:.9em;color:#334155}</style></head><body><h1>Sagamesh demo report</h1>"#,
    );
    let passed = checks.iter().filter(|c| c.passed).count();
    let _ = write!(
        html,
        "<p>{passed} of {} checks passed, in {:.0} s. Working directory: <code>{}</code></p><ul>",
        checks.len(),
        f.started.elapsed().as_secs_f64(),
        escape(&f.dir.display().to_string())
    );
    for check in checks {
        let _ = write!(
            html,
            "<li class=\"{}\">{} {} <span class=\"dim\">— {}</span></li>",
            if check.passed { "ok" } else { "bad" },
            if check.passed { "✔" } else { "✘" },
            escape(&check.name),
            escape(&check.detail)
        );
    }
    let _ = write!(
        html,
        "</ul><h2>Balancing</h2><p>{} requests to <code>users</code> through the client's sidecar (RoundRobin). p50 {}, p99 {}.</p>{}",
        f.balance.len(),
        ms(percentile(&f.balance, 0.5)),
        ms(percentile(&f.balance, 0.99)),
        share_chart(&f.balance)
    );
    let _ = write!(
        html,
        "<h2>Latency while an instance is killed</h2><p>Each dot is a request; colour is the instance that answered (red: failed). {} was killed with SIGKILL at {:.1} s; {} ejection(s) of it were recorded by the client sidecar's circuit breaker.</p>{}",
        escape(&f.victim.name),
        f.kill_at.as_secs_f64(),
        f.victim_ejections,
        latency_chart(&f.kill, Some(f.kill_at))
    );
    html.push_str("<h2>Latency while balancing</h2>");
    html.push_str(&latency_chart(&f.balance, None));
    html.push_str("<h2>Sagas</h2>");
    for saga in &f.sagas {
        html.push_str(&saga_html(saga));
    }
    html.push_str("</body></html>\n");
    html
}
