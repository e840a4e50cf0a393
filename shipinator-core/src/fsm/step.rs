//! The step machine: `pending → running → succeeded | failed | canceled`, and
//! `pending → skipped` for steps that never start because an earlier one failed. A step stays
//! running across attempts; its attempt number lives beside the state.
#![warn(clippy::wildcard_enum_match_arm)]

use super::{InvalidTransition, Machine, WorkEvent};
use crate::domain::StepStatus;

/// Applies `event` to a step in state `from`.
///
/// # Errors
/// [`InvalidTransition`] when the step cannot take the event in that state.
pub fn on(from: StepStatus, event: WorkEvent) -> Result<StepStatus, InvalidTransition> {
    super::work_on(Machine::Step, from, event, false, true)
}
