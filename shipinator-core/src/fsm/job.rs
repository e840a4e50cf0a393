//! The job (stage) machine: `pending → running → succeeded | failed | canceled`, and
//! `pending → skipped` for stages never reached because an earlier one failed.
#![warn(clippy::wildcard_enum_match_arm)]

use super::{InvalidTransition, Machine, WorkEvent};
use crate::domain::JobStatus;

/// Applies `event` to a job in state `from`.
///
/// # Errors
/// [`InvalidTransition`] when the job cannot take the event in that state (for example
/// `succeed` on a pending job, or anything but a no-op on a terminal job).
pub fn on(from: JobStatus, event: WorkEvent) -> Result<JobStatus, InvalidTransition> {
    super::work_on(Machine::Job, from, event, false, true)
}
