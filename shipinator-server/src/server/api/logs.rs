//! Step logs: a page of lines, or (`follow=true`) Server-Sent Events until the log ends,
//! resumable with `Last-Event-ID` (each event's id is the line's sequence number).

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, stream};
use shipinator_core::domain::{Execution, RunId, StepId, TokenRole};
use shipinator_core::logs::LogFollow;

use super::runs::visible_run;
use super::{ApiPath, ApiQuery};
use crate::server::AppState;
use crate::server::auth::Caller;
use crate::server::dto::{LogEvent, LogLineDto, LogPage, LogQuery};
use crate::server::error::{ApiError, ApiResult, ErrorBody};

/// How often a follower waiting for a step to start looks again.
const START_POLL: Duration = Duration::from_millis(250);
/// Lines of a page when `limit` is absent.
const DEFAULT_LIMIT: usize = 1000;
/// The largest `limit`.
pub(crate) const MAX_LIMIT: usize = 10_000;

/// The execution of `step` for `attempt` (default the step's current attempt), if it exists.
async fn execution_of(
    state: &AppState,
    run: RunId,
    step: StepId,
    attempt: Option<u32>,
) -> ApiResult<(bool, Option<Execution>)> {
    let record = state.store.load_run(run).await?;
    let Some(s) = record.steps.iter().find(|s| s.id == step) else {
        return Err(ApiError::not_found(format!("run {run} has no step {step}")));
    };
    let attempt = attempt.unwrap_or(s.attempt);
    let execution = record
        .executions
        .into_iter()
        .filter(|e| e.job_step_id == step && e.attempt == attempt)
        .max_by_key(|e| e.submitted_at);
    Ok((s.status.is_terminal(), execution))
}

/// A step's log lines.
#[utoipa::path(get, path = "/v1/pipeline-runs/{id}/steps/{step_id}/logs", tag = "runs",
    params(
        ("id" = String, Path, format = Uuid, description = "Run id"),
        ("step_id" = String, Path, format = Uuid, description = "Step id"),
        LogQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "With follow=true: resume after this line"),
    ),
    responses(
        (status = 200, description = "Lines (JSON), or with follow=true an event stream: `line` events (JSON data, id = seq) then one `end` event",
            content((LogPage = "application/json"), (LogEvent = "text/event-stream"))),
        (status = 404, description = "No such run or step, or the step has not started", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn step_logs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((run, step)): ApiPath<(RunId, StepId)>,
    ApiQuery(q): ApiQuery<LogQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("limit must be between 1 and {MAX_LIMIT}"),
        ));
    }
    visible_run(&state, &caller, TokenRole::Viewer, run).await?;
    let (step_done, execution) = execution_of(&state, run, step, q.attempt).await?;
    if q.follow.unwrap_or(false) {
        let resume = match headers.get("last-event-id") {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        ApiError::field("Last-Event-ID", "Last-Event-ID must be a line number")
                    })?,
            ),
        };
        let from = resume.map_or(q.from_seq.unwrap_or(0), |seq| seq.saturating_add(1));
        // Without `limit` the stream runs until the log ends; with it, it closes after that
        // many lines without an `end` event, to be resumed with `Last-Event-ID`.
        let target = Follow {
            run,
            step,
            attempt: q.attempt,
            from,
            lines: q.limit.unwrap_or(usize::MAX),
        };
        return Ok(follow(state, target, execution, step_done).into_response());
    }
    let Some(execution) = execution else {
        return Err(ApiError::not_found(format!(
            "step {step} has not started: it has no execution{}",
            q.attempt
                .map(|a| format!(" for attempt {a}"))
                .unwrap_or_default()
        )));
    };
    let from = q.from_seq.unwrap_or(0);
    let lines = state.logs.read(execution.id, from, limit).await?;
    let next_seq = lines.last().map_or(from, |l| l.seq + 1);
    Ok(Json(LogPage {
        execution_id: execution.id,
        lines: lines.into_iter().map(LogLineDto::from).collect(),
        next_seq,
    })
    .into_response())
}

enum FollowState {
    /// Waiting for the step's execution to exist.
    Waiting,
    Following(LogFollow),
    Done,
}

/// What a follower streams.
#[derive(Debug, Clone, Copy)]
struct Follow {
    run: RunId,
    step: StepId,
    attempt: Option<u32>,
    /// The first sequence number.
    from: u64,
    /// Most `line` events before the stream closes (`usize::MAX`: until the log ends).
    lines: usize,
}

fn follow(
    state: AppState,
    target: Follow,
    execution: Option<Execution>,
    step_done: bool,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let Follow {
        run,
        step,
        attempt,
        from,
        lines: most,
    } = target;
    let mut shutdown = state.shutdown.clone();
    let initial = (step_done, execution);
    let events = stream::unfold(
        (FollowState::Waiting, Some(initial), state, 0_usize),
        move |(mut phase, mut first, state, mut sent)| async move {
            loop {
                match phase {
                    FollowState::Done => return None,
                    FollowState::Waiting => {
                        let found = match first.take() {
                            Some(found) => Ok(found),
                            None => {
                                tokio::time::sleep(START_POLL).await;
                                execution_of(&state, run, step, attempt).await
                            }
                        };
                        match found {
                            Ok((_, Some(execution))) => {
                                match state.logs.follow(execution.id, from).await {
                                    Ok(f) => phase = FollowState::Following(f),
                                    Err(e) => {
                                        let event =
                                            Event::default().event("error").data(e.to_string());
                                        return Some((
                                            Ok(event),
                                            (FollowState::Done, None, state, sent),
                                        ));
                                    }
                                }
                            }
                            // The step ended without ever running (skipped, cancelled).
                            Ok((true, None)) => {
                                let event = Event::default().event("end").data("{}");
                                return Some((Ok(event), (FollowState::Done, None, state, sent)));
                            }
                            Ok((false, None)) => phase = FollowState::Waiting,
                            Err(e) => {
                                let event = Event::default().event("error").data(e.message);
                                return Some((Ok(event), (FollowState::Done, None, state, sent)));
                            }
                        }
                    }
                    FollowState::Following(_) if sent >= most => return None,
                    FollowState::Following(mut lines) => match lines.next().await {
                        Some(Ok(line)) => {
                            sent += 1;
                            let seq = line.seq;
                            let event = Event::default()
                                .id(seq.to_string())
                                .event("line")
                                .json_data(LogLineDto::from(line))
                                .unwrap_or_else(|e| {
                                    Event::default().event("error").data(e.to_string())
                                });
                            return Some((
                                Ok(event),
                                (FollowState::Following(lines), None, state, sent),
                            ));
                        }
                        Some(Err(e)) => {
                            let event = Event::default().event("error").data(e.to_string());
                            return Some((Ok(event), (FollowState::Done, None, state, sent)));
                        }
                        None => {
                            let event = Event::default().event("end").data("{}");
                            return Some((Ok(event), (FollowState::Done, None, state, sent)));
                        }
                    },
                }
            }
        },
    )
    .take_until(async move {
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
