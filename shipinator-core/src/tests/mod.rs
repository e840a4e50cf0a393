//! Core's unit and simulation tests.

mod config;
mod conformance;
mod fsm;
mod proptest;
mod sim;
