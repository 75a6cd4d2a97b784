//! libFuzzer target `net`: see `fuzz_harness::net`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::net::run(data));
