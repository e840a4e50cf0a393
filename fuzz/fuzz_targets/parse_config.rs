//! Fuzzes the `.shipinator.yaml` parser: any input must yield a spec or located errors,
//! never a panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(errors) = shipinator_core::config::parse("fuzz.yaml", &text) {
        for e in errors.errors() {
            assert!(e.line >= 1 && e.column >= 1, "unlocated error: {e}");
            assert!(!e.message.is_empty(), "empty message: {e:?}");
        }
    }
});
