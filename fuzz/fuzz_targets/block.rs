//! libFuzzer target `block`: see `fuzz_harness::block`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::block::run(data));
