//! The run machine: `pending → running → success | failed | canceled`, and the run's phase,
//! derived from its jobs.
#![warn(clippy::wildcard_enum_match_arm)]

use std::fmt;

use super::{InvalidTransition, Machine};
use crate::domain::{JobStatus, JobType, RunPhase, RunStatus};

/// An event that a run's state machine reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunEvent {
    /// The first job started.
    Start,
    /// Every requested stage succeeded.
    Succeed,
    /// A stage failed, or the run could not be prepared.
    Fail,
    /// Cancellation was requested.
    Cancel,
}

impl RunEvent {
    /// Every event.
    pub const ALL: [RunEvent; 4] = [
        RunEvent::Start,
        RunEvent::Succeed,
        RunEvent::Fail,
        RunEvent::Cancel,
    ];

    /// Lowercase name, as used in messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            RunEvent::Start => "start",
            RunEvent::Succeed => "succeed",
            RunEvent::Fail => "fail",
            RunEvent::Cancel => "cancel",
        }
    }
}

impl fmt::Display for RunEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Applies `event` to a run in state `from`. Cancelling an ended run is a no-op, as is
/// repeating the event that ended it.
///
/// # Errors
/// [`InvalidTransition`] when the run cannot take the event in that state (`succeed` on a
/// pending run, `start` on an ended one, ...).
pub fn on(from: RunStatus, event: RunEvent) -> Result<RunStatus, InvalidTransition> {
    let invalid = Err(InvalidTransition {
        machine: Machine::Run,
        from: from.as_str(),
        event: event.as_str(),
    });
    match (from, event) {
        (RunStatus::Pending, RunEvent::Start) => Ok(RunStatus::Running),
        (RunStatus::Pending, RunEvent::Succeed) => invalid,
        (RunStatus::Pending, RunEvent::Fail) => Ok(RunStatus::Failed),
        (RunStatus::Pending, RunEvent::Cancel) => Ok(RunStatus::Canceled),

        (RunStatus::Running, RunEvent::Start) => Ok(RunStatus::Running),
        (RunStatus::Running, RunEvent::Succeed) => Ok(RunStatus::Success),
        (RunStatus::Running, RunEvent::Fail) => Ok(RunStatus::Failed),
        (RunStatus::Running, RunEvent::Cancel) => Ok(RunStatus::Canceled),

        (RunStatus::Success, RunEvent::Succeed | RunEvent::Cancel) => Ok(from),
        (RunStatus::Failed, RunEvent::Fail | RunEvent::Cancel) => Ok(from),
        (RunStatus::Canceled, RunEvent::Cancel) => Ok(from),
        (RunStatus::Success, RunEvent::Start | RunEvent::Fail)
        | (RunStatus::Failed, RunEvent::Start | RunEvent::Succeed)
        | (RunStatus::Canceled, RunEvent::Start | RunEvent::Succeed | RunEvent::Fail) => invalid,
    }
}

/// The phase of a run whose jobs (in stage order) are in these states, each with whether it
/// ever started: the running phase of the last stage that started and has not succeeded, else
/// the done phase of the last stage that succeeded, else `submitted`. A run that failed or was
/// cancelled while testing stays in phase `testing`; a stage cancelled before it started does
/// not count.
pub fn phase(jobs: impl IntoIterator<Item = (JobType, JobStatus, bool)>) -> RunPhase {
    let mut phase = RunPhase::Submitted;
    for (stage, status, started) in jobs {
        match status {
            JobStatus::Running | JobStatus::Failed => phase = stage.running_phase(),
            JobStatus::Canceled if started => phase = stage.running_phase(),
            JobStatus::Canceled => {}
            JobStatus::Succeeded => phase = stage.done_phase(),
            JobStatus::Pending | JobStatus::Skipped => {}
        }
    }
    phase
}
