//! Transition functions for runs, jobs, steps and executions: transitions are values.
//!
//! Each machine is a pure function `(state, event) -> Result<state, InvalidTransition>`:
//! - an illegal transition is an [`InvalidTransition`] error, never a panic;
//! - terminal states are absorbing: no event moves a terminal state anywhere else;
//! - applying the same transition twice changes nothing (`Start` on a running state, `Fail`
//!   on a failed one, and `Cancel` on any terminal state return the state unchanged).
//!
//! Every `match` here names each state and event, so a new state breaks compilation at every
//! decision point. This module does not know that a `Store` or an executor exists.
#![warn(clippy::wildcard_enum_match_arm)]

use std::fmt;

pub mod execution;
pub mod job;
pub mod run;
pub mod step;

/// Which state machine rejected a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Machine {
    /// A pipeline run ([`RunStatus`](crate::domain::RunStatus)).
    Run,
    /// A job (stage).
    Job,
    /// A job step.
    Step,
    /// An execution (one attempt of one step).
    Execution,
}

impl Machine {
    /// Lowercase name, as used in messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Machine::Run => "run",
            Machine::Job => "job",
            Machine::Step => "step",
            Machine::Execution => "execution",
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that the state machine of a job, step or execution reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkEvent {
    /// Work began (a job's first step was submitted, a step's first attempt was submitted, an
    /// execution was reported running).
    Start,
    /// Work ended successfully.
    Succeed,
    /// Work ended unsuccessfully.
    Fail,
    /// Work was cancelled (before or while running).
    Cancel,
    /// Work will never start because something earlier failed.
    Skip,
}

impl WorkEvent {
    /// Every event.
    pub const ALL: [WorkEvent; 5] = [
        WorkEvent::Start,
        WorkEvent::Succeed,
        WorkEvent::Fail,
        WorkEvent::Cancel,
        WorkEvent::Skip,
    ];

    /// Lowercase name, as used in messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            WorkEvent::Start => "start",
            WorkEvent::Succeed => "succeed",
            WorkEvent::Fail => "fail",
            WorkEvent::Cancel => "cancel",
            WorkEvent::Skip => "skip",
        }
    }
}

impl fmt::Display for WorkEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition the state machine does not allow. The state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} a {from} {machine}")]
pub struct InvalidTransition {
    /// The machine.
    pub machine: Machine,
    /// The state the event was applied to (its stored spelling).
    pub from: &'static str,
    /// The event (its lowercase name).
    pub event: &'static str,
}

/// The transitions shared by jobs, steps and executions. `pending_may_end` lets a pending
/// execution end without a `Start` (a finished report can overtake the started one); `skippable`
/// allows `Skip` from pending.
fn work_on(
    machine: Machine,
    from: crate::domain::Status,
    event: WorkEvent,
    pending_may_end: bool,
    skippable: bool,
) -> Result<crate::domain::Status, InvalidTransition> {
    use crate::domain::Status;
    let invalid = Err(InvalidTransition {
        machine,
        from: from.as_str(),
        event: event.as_str(),
    });
    match (from, event) {
        (Status::Pending, WorkEvent::Start) => Ok(Status::Running),
        (Status::Pending, WorkEvent::Succeed) if pending_may_end => Ok(Status::Succeeded),
        (Status::Pending, WorkEvent::Fail) if pending_may_end => Ok(Status::Failed),
        (Status::Pending, WorkEvent::Succeed | WorkEvent::Fail) => invalid,
        (Status::Pending, WorkEvent::Cancel) => Ok(Status::Canceled),
        (Status::Pending, WorkEvent::Skip) if skippable => Ok(Status::Skipped),
        (Status::Pending, WorkEvent::Skip) => invalid,

        (Status::Running, WorkEvent::Start) => Ok(Status::Running),
        (Status::Running, WorkEvent::Succeed) => Ok(Status::Succeeded),
        (Status::Running, WorkEvent::Fail) => Ok(Status::Failed),
        (Status::Running, WorkEvent::Cancel) => Ok(Status::Canceled),
        (Status::Running, WorkEvent::Skip) => invalid,

        // Terminal states are absorbing: the event that led there, or a cancel, is a no-op.
        (Status::Succeeded, WorkEvent::Succeed | WorkEvent::Cancel) => Ok(from),
        (Status::Failed, WorkEvent::Fail | WorkEvent::Cancel) => Ok(from),
        (Status::Canceled, WorkEvent::Cancel) => Ok(from),
        (Status::Skipped, WorkEvent::Skip | WorkEvent::Cancel) => Ok(from),
        (
            Status::Succeeded | Status::Failed | Status::Canceled | Status::Skipped,
            WorkEvent::Start | WorkEvent::Succeed | WorkEvent::Fail | WorkEvent::Skip,
        ) => invalid,
    }
}
