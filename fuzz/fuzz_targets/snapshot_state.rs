//! libFuzzer target `snapshot_state`: see `fuzz_harness::snapshot_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::snapshot_state::run(data));
