//! Fuzz target `snapshot_state`: bytes as a snapshot state file, through
//! `vmm::snapshot::format::decode::<VmState>` twice — as given (the header
//! checks), and as the payload behind a valid header (so the decoder itself
//! gets the input without the fuzzer computing a CRC).
//!
//! Invariants: no panic, no allocation the input cannot account for
//! (libFuzzer's RSS limit), and a state that decodes encodes again and
//! decodes to a state of the same shape.

use vmm::snapshot::format::{decode, encode, seal};
use vmm::snapshot::state::VmState;

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let _ = decode::<VmState>(data);
    if let Ok(state) = decode::<VmState>(&seal(data)) {
        let again = encode(&state).expect("a decoded state encodes");
        let back: VmState = decode(&again).expect("and decodes");
        assert_eq!(back.vcpus.len(), state.vcpus.len());
        assert_eq!(back.devices, state.devices);
        assert_eq!(back.regions, state.regions);
    }
}
