//! The async driver: the only code that spawns tasks or sleeps.
