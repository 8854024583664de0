//! The saga as an event-sourced state machine over [`SagaStatus`].
//!
//! [`apply`] folds one [`Event`] into the status (per-step records, phase, bounded history,
//! conditions); [`next`] reads the status and says what to do next. Both are pure, so the
//! engine's durability argument is simple: every event is written to the store before the engine
//! acts on it, and whatever was written, [`next`] picks up from there after a restart.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use sagamesh_api::saga::{
    CallPhase, CallStatus, MAX_HISTORY, SagaEvent, SagaPhase, SagaSpec, SagaStatus, StepStatus,
};
use serde_json::Value;

/// Something that happened to a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Validation passed; the saga starts with this trace id.
    Started { trace_id: String },
    /// The saga can never run (unknown service, bad template, ...).
    Invalid { reason: String },
    /// An attempt of a call is about to be sent.
    CallStarted { call: Call, attempt: u32 },
    /// A call answered with success.
    CallSucceeded {
        call: Call,
        http_status: u16,
        output: Option<Value>,
        note: Option<String>,
    },
    /// One attempt failed; another may follow.
    AttemptFailed {
        call: Call,
        http_status: Option<u16>,
        error: String,
    },
    /// The call failed for good.
    CallFailed {
        call: Call,
        http_status: Option<u16>,
        error: String,
        in_doubt: bool,
    },
    /// The step has no compensation to run.
    CompensationSkipped { step: usize },
    /// `spec.deadline` passed while steps were still running.
    DeadlineExceeded,
}

/// Which call of which step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Action(usize),
    Compensation(usize),
}

impl Call {
    pub fn step(self) -> usize {
        match self {
            Call::Action(i) | Call::Compensation(i) => i,
        }
    }
    /// `action` or `compensation`, as in the idempotency key.
    pub fn kind(self) -> &'static str {
        match self {
            Call::Action(_) => "action",
            Call::Compensation(_) => "compensation",
        }
    }
}

/// What the engine should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Validate the saga, then record `Started` or `Invalid`.
    Start,
    /// Send attempt `attempt` of a call (attempts beyond the first re-send with the same key).
    Send { call: Call, attempt: u32 },
    /// Nothing left to do: the saga is in this terminal phase.
    Done(SagaPhase),
}

/// Condition type set when a person must look at a saga.
pub const FAILED_CONDITION: &str = "Failed";

fn now_time(now: Timestamp) -> Time {
    Time(now)
}

fn record_mut(status: &mut SagaStatus, call: Call) -> Option<&mut CallStatus> {
    let step = status.steps.get_mut(call.step())?;
    Some(match call {
        Call::Action(_) => &mut step.action,
        Call::Compensation(_) => &mut step.compensation,
    })
}

fn step_name(status: &SagaStatus, step: usize) -> Option<String> {
    status.steps.get(step).map(|s| s.name.clone())
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn push_history(
    status: &mut SagaStatus,
    now: Timestamp,
    kind: &str,
    step: Option<String>,
    attempt: Option<u32>,
    message: Option<String>,
) {
    let dropped = status.history_dropped.unwrap_or(0);
    let seq = dropped + status.history.len() as u64 + 1;
    status.history.push(SagaEvent {
        seq,
        time: now_time(now),
        kind: kind.to_string(),
        step,
        attempt,
        message: message.map(|m| truncate(&m, 500)),
    });
    if status.history.len() > MAX_HISTORY {
        let excess = status.history.len() - MAX_HISTORY;
        status.history.drain(..excess);
        status.history_dropped = Some(dropped + excess as u64);
    }
}

fn set_failed_condition(status: &mut SagaStatus, now: Timestamp, reason: &str, message: String) {
    status.conditions.retain(|c| c.type_ != FAILED_CONDITION);
    status.conditions.push(Condition {
        type_: FAILED_CONDITION.to_string(),
        status: "True".to_string(),
        reason: reason.to_string(),
        message: truncate(&message, 1000),
        last_transition_time: now_time(now),
        observed_generation: status.observed_generation,
    });
}

fn finish(status: &mut SagaStatus, now: Timestamp, phase: SagaPhase) {
    status.phase = phase;
    status.current_step = None;
    status.finished_at = Some(now_time(now));
    for step in &mut status.steps {
        for call in [&mut step.action, &mut step.compensation] {
            if call.phase == CallPhase::Pending {
                call.phase = CallPhase::Skipped;
            }
        }
    }
    push_history(status, now, &format!("Saga{phase:?}"), None, None, None);
}

/// Folds `event` into `status`. The spec gives step names and sizes.
pub fn apply(spec: &SagaSpec, status: &mut SagaStatus, event: &Event, now: Timestamp) {
    match event {
        Event::Started { trace_id } => {
            status.phase = SagaPhase::Running;
            status.started_at = Some(now_time(now));
            status.trace_id = Some(trace_id.clone());
            status.steps = spec
                .steps
                .iter()
                .map(|s| StepStatus {
                    name: s.name.clone(),
                    ..Default::default()
                })
                .collect();
            push_history(status, now, "SagaStarted", None, None, None);
        }
        Event::Invalid { reason } => {
            status.phase = SagaPhase::Failed;
            status.finished_at = Some(now_time(now));
            set_failed_condition(
                status,
                now,
                "Invalid",
                format!(
                    "the saga cannot run: {reason}. No call was made; fix the spec and create a new Saga."
                ),
            );
            push_history(status, now, "SagaInvalid", None, None, Some(reason.clone()));
        }
        Event::CallStarted { call, attempt } => {
            status.current_step = step_name(status, call.step());
            if let Some(record) = record_mut(status, *call) {
                record.phase = CallPhase::Running;
                record.attempts = *attempt;
                record.started_at.get_or_insert(now_time(now));
            }
            let kind = match call {
                Call::Action(_) => "ActionStarted",
                Call::Compensation(_) => "CompensationStarted",
            };
            let name = step_name(status, call.step());
            push_history(status, now, kind, name, Some(*attempt), None);
        }
        Event::CallSucceeded {
            call,
            http_status,
            output,
            note,
        } => {
            if let Some(record) = record_mut(status, *call) {
                record.phase = CallPhase::Succeeded;
                record.http_status = Some(*http_status);
                record.finished_at = Some(now_time(now));
                record.output = output.clone();
                record.error = note.clone();
            }
            let kind = match call {
                Call::Action(_) => "ActionSucceeded",
                Call::Compensation(_) => "CompensationSucceeded",
            };
            let name = step_name(status, call.step());
            push_history(
                status,
                now,
                kind,
                name,
                None,
                Some(format!("HTTP {http_status}")),
            );
        }
        Event::AttemptFailed {
            call,
            http_status,
            error,
        } => {
            let attempt = record_mut(status, *call).map(|record| {
                record.http_status = *http_status;
                record.error = Some(truncate(error, 1000));
                record.attempts
            });
            let name = step_name(status, call.step());
            push_history(
                status,
                now,
                "AttemptFailed",
                name,
                attempt,
                Some(error.clone()),
            );
        }
        Event::CallFailed {
            call,
            http_status,
            error,
            in_doubt,
        } => {
            if let Some(record) = record_mut(status, *call) {
                record.phase = CallPhase::Failed;
                record.http_status = *http_status;
                record.error = Some(truncate(error, 1000));
                record.finished_at = Some(now_time(now));
                record.in_doubt = in_doubt.then_some(true);
            }
            let name = step_name(status, call.step()).unwrap_or_default();
            match call {
                Call::Action(_) => {
                    status.phase = SagaPhase::Compensating;
                    push_history(
                        status,
                        now,
                        "ActionFailed",
                        Some(name),
                        None,
                        Some(error.clone()),
                    );
                }
                Call::Compensation(_) => {
                    push_history(
                        status,
                        now,
                        "CompensationFailed",
                        Some(name.clone()),
                        None,
                        Some(error.clone()),
                    );
                    let message = format!(
                        "compensation of step {name:?} failed for good: {error}. Its effect and that \
                         of any step not yet compensated remain: undo them by hand (see \
                         status.steps), then delete this Saga."
                    );
                    status.phase = SagaPhase::Failed;
                    status.current_step = Some(name);
                    status.finished_at = Some(now_time(now));
                    set_failed_condition(status, now, "CompensationFailed", message);
                }
            }
        }
        Event::CompensationSkipped { step } => {
            if let Some(record) = record_mut(status, Call::Compensation(*step)) {
                record.phase = CallPhase::Skipped;
            }
        }
        Event::DeadlineExceeded => {
            // The call in flight is abandoned; it may have taken effect, so it is compensated.
            for step in &mut status.steps {
                if step.action.phase == CallPhase::Running {
                    step.action.phase = CallPhase::Failed;
                    step.action.in_doubt = Some(true);
                    step.action.error = Some("saga deadline exceeded".to_string());
                    step.action.finished_at = Some(now_time(now));
                }
            }
            status.phase = SagaPhase::Compensating;
            push_history(status, now, "DeadlineExceeded", None, None, None);
        }
    }
    // Reaching the end is itself a transition: record it when `next` says there is no more.
    if !status.phase.is_terminal()
        && let Next::Done(phase) = next(spec, status)
    {
        finish(status, now, phase);
    }
}

/// How far a saga has got, from its status alone: it grows by at least one with every event
/// [`apply`] folds in and never decreases, so of two versions of one saga's status, the one with
/// less progress is the older. It counts the history entries ever written (kept or dropped) and
/// the compensations skipped (`CompensationSkipped` is the one event that writes no history).
pub fn progress(status: &SagaStatus) -> u64 {
    let history = status.history_dropped.unwrap_or(0) + status.history.len() as u64;
    let skipped = status
        .steps
        .iter()
        .filter(|s| s.compensation.phase == CallPhase::Skipped)
        .count() as u64;
    history + skipped
}

/// What a call's record asks for: nothing (done or skipped), its first attempt, the next attempt
/// (in flight or between attempts: same idempotency key), or a stop (failed for good).
fn resume(call: Call, record: &CallStatus) -> Option<Next> {
    match record.phase {
        CallPhase::Succeeded | CallPhase::Skipped => None,
        CallPhase::Pending => Some(Next::Send { call, attempt: 1 }),
        CallPhase::Running => Some(Next::Send {
            call,
            attempt: record.attempts + 1,
        }),
        CallPhase::Failed => Some(Next::Done(SagaPhase::Failed)),
    }
}

/// What to do next, from the status alone.
pub fn next(spec: &SagaSpec, status: &SagaStatus) -> Next {
    match status.phase {
        phase if phase.is_terminal() => Next::Done(phase),
        SagaPhase::Pending => Next::Start,
        SagaPhase::Running => {
            for (i, step) in status.steps.iter().enumerate() {
                // A final failure switches the phase to Compensating, so Failed is not reached.
                if let Some(next) = resume(Call::Action(i), &step.action) {
                    return next;
                }
            }
            if status.steps.len() == spec.steps.len() {
                Next::Done(SagaPhase::Succeeded)
            } else {
                Next::Done(SagaPhase::Failed)
            }
        }
        _ => {
            // Compensating: undo, last first, every step whose action took (or may have taken)
            // effect.
            for (i, step) in status.steps.iter().enumerate().rev() {
                let took_effect = step.action.phase == CallPhase::Succeeded
                    || (step.action.phase == CallPhase::Failed
                        && step.action.in_doubt == Some(true));
                if !took_effect {
                    continue;
                }
                if let Some(next) = resume(Call::Compensation(i), &step.compensation) {
                    return next;
                }
            }
            Next::Done(SagaPhase::Compensated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamesh_api::saga::{HttpCall, SagaStep};
    use serde_json::json;

    fn spec(steps: &[&str]) -> SagaSpec {
        SagaSpec {
            steps: steps
                .iter()
                .map(|name| SagaStep {
                    name: name.to_string(),
                    action: HttpCall {
                        service: "svc".into(),
                        path: "/".into(),
                        ..Default::default()
                    },
                    compensation: Some(HttpCall {
                        service: "svc".into(),
                        path: "/undo".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid timestamp")
    }

    /// Runs the machine, answering each call with `answer`, and returns the calls made.
    /// Runs the machine as the engine does (a step without compensation is skipped, not sent),
    /// checking that every event applied increases [`progress`]. Returns the final status, the
    /// calls sent and the number of events applied.
    fn drive(
        spec: &SagaSpec,
        answer: impl Fn(Call, u32) -> Event,
    ) -> (SagaStatus, Vec<(Call, u32)>, usize) {
        let mut status = SagaStatus::default();
        let mut calls = Vec::new();
        let mut events = 0;
        let mut step = |status: &mut SagaStatus, event: Event, tick: i64| {
            let before = progress(status);
            apply(spec, status, &event, at(tick));
            assert!(
                progress(status) > before,
                "{event:?} did not increase progress ({before})"
            );
            events += 1;
        };
        for tick in 0..1000 {
            match next(spec, &status) {
                Next::Start => step(
                    &mut status,
                    Event::Started {
                        trace_id: "t".into(),
                    },
                    tick,
                ),
                Next::Send {
                    call: Call::Compensation(i),
                    ..
                } if spec.steps[i].compensation.is_none() => {
                    step(&mut status, Event::CompensationSkipped { step: i }, tick)
                }
                Next::Send { call, attempt } => {
                    step(&mut status, Event::CallStarted { call, attempt }, tick);
                    calls.push((call, attempt));
                    step(&mut status, answer(call, attempt), tick);
                }
                Next::Done(_) => return (status, calls, events),
            }
        }
        panic!("the machine did not finish");
    }

    fn ok(call: Call) -> Event {
        Event::CallSucceeded {
            call,
            http_status: 200,
            output: Some(json!({"id": call.step()})),
            note: None,
        }
    }

    #[test]
    fn all_steps_succeed_in_order() {
        let spec = spec(&["a", "b", "c", "d"]);
        let (status, calls, _) = drive(&spec, |call, _| ok(call));
        assert_eq!(status.phase, SagaPhase::Succeeded);
        assert_eq!(
            calls,
            (0..4).map(|i| (Call::Action(i), 1)).collect::<Vec<_>>()
        );
        assert!(
            status
                .steps
                .iter()
                .all(|s| s.compensation.phase == CallPhase::Skipped)
        );
        assert_eq!(
            status.history.last().map(|e| e.kind.as_str()),
            Some("SagaSucceeded")
        );
        assert!(status.finished_at.is_some() && status.current_step.is_none());
    }

    #[test]
    fn a_final_failure_compensates_completed_steps_in_reverse() {
        let spec = spec(&["a", "b", "c", "d"]);
        let (status, calls, _) = drive(&spec, |call, _| match call {
            Call::Action(2) => Event::CallFailed {
                call,
                http_status: Some(500),
                error: "boom".into(),
                in_doubt: false,
            },
            other => ok(other),
        });
        assert_eq!(status.phase, SagaPhase::Compensated);
        assert_eq!(
            calls,
            vec![
                (Call::Action(0), 1),
                (Call::Action(1), 1),
                (Call::Action(2), 1),
                (Call::Compensation(1), 1),
                (Call::Compensation(0), 1)
            ]
        );
        assert_eq!(status.steps[3].action.phase, CallPhase::Skipped);
        assert_eq!(status.steps[2].compensation.phase, CallPhase::Skipped);
    }

    #[test]
    fn an_action_in_doubt_is_compensated_too() {
        let spec = spec(&["a", "b"]);
        let (status, calls, _) = drive(&spec, |call, _| match call {
            Call::Action(1) => Event::CallFailed {
                call,
                http_status: None,
                error: "timeout".into(),
                in_doubt: true,
            },
            other => ok(other),
        });
        assert_eq!(status.phase, SagaPhase::Compensated);
        assert_eq!(
            calls[2..],
            [(Call::Compensation(1), 1), (Call::Compensation(0), 1)]
        );
    }

    #[test]
    fn a_compensation_that_fails_leaves_failed_with_a_condition() {
        let spec = spec(&["a", "b", "c"]);
        let (status, calls, _) = drive(&spec, |call, _| match call {
            Call::Action(2) => Event::CallFailed {
                call,
                http_status: Some(409),
                error: "no".into(),
                in_doubt: false,
            },
            Call::Compensation(1) => Event::CallFailed {
                call,
                http_status: Some(500),
                error: "refund service down".into(),
                in_doubt: false,
            },
            other => ok(other),
        });
        assert_eq!(status.phase, SagaPhase::Failed);
        // Step a is not compensated: the machine stops for a person at the first stuck compensation.
        assert_eq!(calls.last(), Some(&(Call::Compensation(1), 1)));
        let condition = &status.conditions[0];
        assert_eq!(
            (condition.type_.as_str(), condition.reason.as_str()),
            (FAILED_CONDITION, "CompensationFailed")
        );
        assert!(
            condition.message.contains("\"b\"")
                && condition.message.contains("refund service down")
        );
        assert_eq!(status.current_step.as_deref(), Some("b"));
    }

    #[test]
    fn a_restart_mid_call_resends_the_same_call_as_the_next_attempt() {
        let spec = spec(&["a", "b"]);
        let mut status = SagaStatus::default();
        apply(
            &spec,
            &mut status,
            &Event::Started {
                trace_id: "t".into(),
            },
            at(0),
        );
        apply(
            &spec,
            &mut status,
            &Event::CallStarted {
                call: Call::Action(0),
                attempt: 1,
            },
            at(1),
        );
        // Crash here: the start is recorded, the result is not.
        let reloaded: SagaStatus =
            serde_json::from_value(serde_json::to_value(&status).unwrap()).unwrap();
        assert_eq!(
            next(&spec, &reloaded),
            Next::Send {
                call: Call::Action(0),
                attempt: 2
            }
        );
    }

    #[test]
    fn the_deadline_abandons_the_running_step_and_compensates() {
        let spec = spec(&["a", "b", "c"]);
        let mut status = SagaStatus::default();
        apply(
            &spec,
            &mut status,
            &Event::Started {
                trace_id: "t".into(),
            },
            at(0),
        );
        apply(
            &spec,
            &mut status,
            &Event::CallStarted {
                call: Call::Action(0),
                attempt: 1,
            },
            at(0),
        );
        apply(&spec, &mut status, &ok(Call::Action(0)), at(0));
        apply(
            &spec,
            &mut status,
            &Event::CallStarted {
                call: Call::Action(1),
                attempt: 1,
            },
            at(1),
        );
        apply(&spec, &mut status, &Event::DeadlineExceeded, at(30));
        assert_eq!(status.phase, SagaPhase::Compensating);
        assert_eq!(
            next(&spec, &status),
            Next::Send {
                call: Call::Compensation(1),
                attempt: 1
            }
        );
    }

    #[test]
    fn invalid_sagas_fail_before_any_call() {
        let spec = spec(&["a"]);
        let mut status = SagaStatus::default();
        apply(
            &spec,
            &mut status,
            &Event::Invalid {
                reason: "step \"a\": unknown service \"svc\"".into(),
            },
            at(0),
        );
        assert_eq!(status.phase, SagaPhase::Failed);
        assert_eq!(next(&spec, &status), Next::Done(SagaPhase::Failed));
        assert_eq!(status.conditions[0].reason, "Invalid");
        assert!(status.steps.is_empty());
    }

    #[test]
    fn history_is_bounded() {
        let spec = spec(&["a"]);
        let (status, calls, _) = drive(&spec, |call, attempt| {
            if attempt < 200 {
                Event::AttemptFailed {
                    call,
                    http_status: Some(503),
                    error: "busy".into(),
                }
            } else {
                ok(call)
            }
        });
        assert_eq!(status.phase, SagaPhase::Succeeded);
        assert_eq!(calls.len(), 200);
        assert_eq!(status.history.len(), MAX_HISTORY);
        let dropped = status.history_dropped.unwrap_or(0);
        assert_eq!(status.history[0].seq, dropped + 1);
        assert_eq!(
            status.history.last().map(|e| e.seq),
            Some(dropped + MAX_HISTORY as u64)
        );
    }

    #[test]
    fn progress_grows_with_every_event() {
        let mut spec = spec(&["a", "b", "c", "d"]);
        spec.steps[0].compensation = None;
        spec.steps[1].compensation = None;
        let fail = |call| Event::CallFailed {
            call,
            http_status: Some(400),
            error: "bad".into(),
            in_doubt: false,
        };
        // Success; retries beyond the history's bound; compensation with skips; a compensation
        // failing for good.
        let (status, _, _) = drive(&spec, |call, _| ok(call));
        assert_eq!(status.phase, SagaPhase::Succeeded);
        let (status, _, events) = drive(&spec, |call, attempt| {
            if attempt < 150 {
                Event::AttemptFailed {
                    call,
                    http_status: Some(503),
                    error: "busy".into(),
                }
            } else {
                ok(call)
            }
        });
        assert_eq!(status.phase, SagaPhase::Succeeded);
        assert!(status.history_dropped.is_some() && events > MAX_HISTORY);
        let (status, _, _) = drive(&spec, |call, _| match call {
            Call::Action(3) => fail(call),
            other => ok(other),
        });
        assert_eq!(status.phase, SagaPhase::Compensated);
        assert_eq!(status.steps[1].compensation.phase, CallPhase::Skipped);
        let (status, _, _) = drive(&spec, |call, _| match call {
            Call::Action(3) | Call::Compensation(2) => fail(call),
            other => ok(other),
        });
        assert_eq!(status.phase, SagaPhase::Failed);
        // The deadline, and an invalid saga.
        let mut status = SagaStatus::default();
        for event in [
            Event::Started {
                trace_id: "t".into(),
            },
            Event::CallStarted {
                call: Call::Action(0),
                attempt: 1,
            },
            Event::DeadlineExceeded,
        ] {
            let before = progress(&status);
            apply(&spec, &mut status, &event, at(0));
            assert!(progress(&status) > before, "{event:?}");
        }
        let mut status = SagaStatus::default();
        apply(
            &spec,
            &mut status,
            &Event::Invalid { reason: "x".into() },
            at(0),
        );
        assert!(progress(&status) > 0);
    }

    #[test]
    fn steps_without_compensation_are_skipped() {
        let mut spec = spec(&["a", "b", "c"]);
        spec.steps[1].compensation = None;
        let (status, calls, _) = drive(&spec, |call, _| match call {
            Call::Action(2) => Event::CallFailed {
                call,
                http_status: Some(400),
                error: "bad".into(),
                in_doubt: false,
            },
            other => ok(other),
        });
        assert_eq!(status.phase, SagaPhase::Compensated);
        // Like the engine, the driver records a skip instead of sending.
        assert!(calls.contains(&(Call::Compensation(0), 1)));
        assert!(!calls.iter().any(|(call, _)| *call == Call::Compensation(1)));
        assert_eq!(status.steps[1].compensation.phase, CallPhase::Skipped);
    }
}
