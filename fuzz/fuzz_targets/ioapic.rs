//! libFuzzer target `ioapic`: see `fuzz_harness::ioapic`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::ioapic::run(data));
