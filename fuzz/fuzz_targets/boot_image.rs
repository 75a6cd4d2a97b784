//! libFuzzer target `boot_image`: see `fuzz_harness::boot_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::boot_image::run(data));
