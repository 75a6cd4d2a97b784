//! Fuzz target `snapshot_state`: bytes as a snapshot state file, through
//! `vmm::snapshot::format::decode::<VmState>` twice — as given (the header
//! checks), and as the payload behind a valid header (so the decoder itself
//! gets the input without the fuzzer computing a CRC).
//!
//! A state that decodes then goes through what restore does with it before
//! and without KVM: `restore::validate`, the saved frame runs placed again
//! on guest RAM of the state's size (when it validates), the I/O APIC's
//! registers restored.
//!
//! Invariants: no panic, no allocation the input cannot account for
//! (libFuzzer's RSS limit), and a state that decodes encodes again and
//! decodes to a state of the same shape.

use std::sync::Arc;

use devices::ioapic::{IOAPIC_PINS, IoApic, MsiMessage, MsiRoutes};
use memory::GuestFrames;
use memory::guest::Backing;
use vmm::snapshot::format::{decode, encode, seal};
use vmm::snapshot::restore;
use vmm::snapshot::state::VmState;

#[derive(Debug)]
struct NoRoutes;

impl MsiRoutes for NoRoutes {
    fn set_routes(&self, _: &[Option<MsiMessage>; IOAPIC_PINS]) {}
}

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let _ = decode::<VmState>(data);
    if let Ok(state) = decode::<VmState>(&seal(data)) {
        let again = encode(&state).expect("a decoded state encodes");
        let back: VmState = decode(&again).expect("and decodes");
        assert_eq!(back.vcpus.len(), state.vcpus.len());
        assert_eq!(back.devices, state.devices);
        assert_eq!(back.regions, state.regions);
        if restore::validate(&state).is_ok() {
            // Mapped lazily: any valid size costs the metadata it touches.
            let frames =
                GuestFrames::new(state.mem, Backing::Anonymous).expect("a validated size maps");
            if frames.place_again(&state.frames).is_ok() {
                // Adjacent runs of one kind merge; none appear from nowhere.
                assert!(frames.placed().len() <= state.frames.len());
            }
        }
        let _ = IoApic::new(0, Arc::new(NoRoutes)).restore(&state.ioapic);
    }
}
