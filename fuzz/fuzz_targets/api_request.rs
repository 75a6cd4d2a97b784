//! libFuzzer target `api_request`: see `fuzz_harness::api_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::api_request::run(data));
