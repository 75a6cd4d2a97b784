//! libFuzzer target `virtio_mmio`: see `fuzz_harness::virtio_mmio`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::virtio_mmio::run(data));
