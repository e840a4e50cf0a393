//! The pure (sans-IO) orchestrator: facts in, intentions out.
