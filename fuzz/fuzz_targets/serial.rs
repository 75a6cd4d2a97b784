//! libFuzzer target `serial`: see `fuzz_harness::serial`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::serial::run(data));
