//! Conformance suites every backend runs. Not semver-stable.
