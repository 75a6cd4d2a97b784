//! libFuzzer target `queue_differential`: see `fuzz_harness::queue_differential`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::queue_differential::run(data));
