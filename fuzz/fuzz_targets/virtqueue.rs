//! libFuzzer target `virtqueue`: see `fuzz_harness::virtqueue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::virtqueue::run(data));
