//! Tests: proptest.
