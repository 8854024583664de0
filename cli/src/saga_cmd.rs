//! `sagamesh saga list|get`: saga status from a local state directory, like `kubectl get`.

use std::path::Path;

use anyhow::{Context, bail};
use clap::Subcommand;
use k8s_openapi::jiff::Timestamp;
use sagamesh_api::saga::{CallStatus, SagaStatus};
use sagamesh_saga::file_store::{FileStore, StoredSaga};

use crate::style::{Style, table};

#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// List sagas.
    List {
        /// Only this namespace (default: all).
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Show one saga: its steps and history.
    Get {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Output format: table or json.
        #[arg(short, long, default_value = "table")]
        output: String,
    },
}

pub fn run(command: SagaCommand, state: &Path) -> anyhow::Result<()> {
    if !state.exists() {
        bail!(
            "no saga state in {} (start `sagamesh local` or pass --state)",
            state.display()
        );
    }
    let store = FileStore::open(state).with_context(|| format!("opening {}", state.display()))?;
    let style = Style::detect();
    match command {
        SagaCommand::List { namespace } => {
            let sagas: Vec<StoredSaga> = store
                .list()?
                .into_iter()
                .filter(|s| namespace.as_ref().is_none_or(|ns| &s.namespace == ns))
                .collect();
            if sagas.is_empty() {
                println!("No sagas found.");
                return Ok(());
            }
            print!("{}", list_table(&sagas, &style));
        }
        SagaCommand::Get {
            name,
            namespace,
            output,
        } => {
            let record = store
                .load(&namespace, &name)?
                .with_context(|| format!("saga {namespace}/{name} not found"))?;
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&record.status)?),
                "table" => print!("{}", describe(&namespace, &name, &record.status, &style)),
                other => bail!("unknown output format {other:?}: use table or json"),
            }
        }
    }
    Ok(())
}

fn age(status: &SagaStatus) -> String {
    let Some(started) = status.started_at.as_ref().map(|t| t.0) else {
        return "-".into();
    };
    let secs = Timestamp::now().duration_since(started).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

pub fn list_table(sagas: &[StoredSaga], style: &Style) -> String {
    let mut rows = vec![
        ["NAMESPACE", "NAME", "PHASE", "STEP", "AGE"]
            .map(String::from)
            .to_vec(),
    ];
    for saga in sagas {
        let status = &saga.record.status;
        rows.push(vec![
            saga.namespace.clone(),
            saga.name.clone(),
            style.phase(&format!("{:?}", status.phase)),
            status.current_step.clone().unwrap_or_else(|| "-".into()),
            age(status),
        ]);
    }
    table(&rows)
}

fn call_cell(call: &CallStatus, style: &Style) -> String {
    let phase = format!("{:?}", call.phase);
    let mut cell = style.phase(&phase);
    if let Some(status) = call.http_status {
        cell.push_str(&format!(" ({status})"));
    }
    if call.attempts > 1 {
        cell.push_str(&format!(" x{}", call.attempts));
    }
    cell
}

/// The steps and history of one saga.
pub fn describe(namespace: &str, name: &str, status: &SagaStatus, style: &Style) -> String {
    let mut out = format!(
        "{} {namespace}/{name}   phase {}{}\n",
        style.bold("Saga"),
        style.phase(&format!("{:?}", status.phase)),
        status
            .trace_id
            .as_ref()
            .map(|t| format!("   trace {t}"))
            .unwrap_or_default()
    );
    let mut rows = vec![
        ["STEP", "ACTION", "COMPENSATION", "ERROR"]
            .map(String::from)
            .to_vec(),
    ];
    for step in &status.steps {
        rows.push(vec![
            step.name.clone(),
            call_cell(&step.action, style),
            call_cell(&step.compensation, style),
            step.action
                .error
                .clone()
                .or_else(|| step.compensation.error.clone())
                .unwrap_or_default(),
        ]);
    }
    out.push_str(&table(&rows));
    out.push_str(&format!("\n{}\n", style.bold("History")));
    for event in &status.history {
        let step = event
            .step
            .as_deref()
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        let message = event
            .message
            .as_deref()
            .map(|m| format!("  {}", style.dim(m)))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:>3}  {}{step}{message}\n",
            event.seq, event.kind
        ));
    }
    for condition in &status.conditions {
        out.push_str(&format!(
            "\n{} {}: {}\n",
            style.red("!"),
            condition.reason,
            condition.message
        ));
    }
    out
}
