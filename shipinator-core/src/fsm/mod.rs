//! Transition functions for runs, jobs, steps and executions: transitions are values.
