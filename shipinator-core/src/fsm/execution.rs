//! The execution machine: `pending → running → succeeded | failed | canceled`. A pending
//! execution may end directly (its finished report overtook the started one); executions are
//! never skipped (a skipped step has none).
#![warn(clippy::wildcard_enum_match_arm)]

use super::{InvalidTransition, Machine, WorkEvent};
use crate::domain::ExecutionStatus;

/// Applies `event` to an execution in state `from`.
///
/// # Errors
/// [`InvalidTransition`] when the execution cannot take the event in that state.
pub fn on(from: ExecutionStatus, event: WorkEvent) -> Result<ExecutionStatus, InvalidTransition> {
    super::work_on(Machine::Execution, from, event, true, false)
}
