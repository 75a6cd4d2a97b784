//! A vCPU's architectural state, read from KVM and written back (for
//! snapshots): general and segment registers, the FPU/SSE/AVX state as
//! XSAVE, XCRs, debug registers, every MSR KVM can save, the local APIC page,
//! pending events, the multiprocessing state, CPUID and the TSC frequency.
//!
//! Saved only while the vCPU is out of KVM_RUN (paused at the gate, after the
//! device side of its last exit completed), so no exit is half-handled.
//! Restored in the order KVM needs: CPUID before MSRs (which MSRs exist
//! depends on it), special registers before XSAVE, the LAPIC before MP state
//! and events (an INIT/SIPI state and a pending interrupt refer to it).
//! KVM itself validates every value; a state it refuses is an error naming
//! the ioctl, never a half-restored vCPU that runs.

use kvm_bindings::CpuId;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Most MSRs saved per vCPU (KVM lists a few hundred at most).
pub const MAX_MSRS: usize = 1024;

/// Errors reading or writing a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM accepted only some of the MSRs.
    #[error("KVM restored {set} of the vCPU's {total} MSRs (MSR {index:#x} refused)")]
    Msrs {
        /// MSRs written.
        set: usize,
        /// MSRs in the state.
        total: usize,
        /// The first refused.
        index: u32,
    },
    /// More CPUID entries or MSRs than KVM could hold.
    #[error("The vCPU state holds {0} CPUID entries or MSRs, more than KVM takes")]
    TooMany(usize),
}

/// One vCPU's saved state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE, AVX state (the 4 KiB legacy XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// DR0-DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Every MSR KVM lists that this vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The MSRs KVM can save and restore, as indices.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| Error::Kvm("GET_MSR_INDEX_LIST", e))?;
    Ok(list.as_slice().to_vec())
}

/// Reads the MSRs of `indices` KVM can read for this vCPU: KVM stops at the
/// first it cannot, which is dropped and the rest read again.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooMany(entries.len()))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| Error::Kvm("GET_MSRS", e))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the one KVM refused.
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(saved)
}

/// Reads `vcpu`'s state; `msr_indices` from [`msr_list`].
pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let kvm = |what: &'static str| move |e| Error::Kvm(what, e);
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("GET_CPUID2"))?;
    // Pending I/O completes on the next KVM_RUN; a paused vCPU's last exit
    // was fully handled, so the registers are final.
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm("GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("GET_XCRS"))?,
        debug_regs: vcpu.get_debug_regs().map_err(kvm("GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm("GET_LAPIC"))?,
        events: vcpu.get_vcpu_events().map_err(kvm("GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("GET_MP_STATE"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        cpuid: cpuid.as_slice().to_vec(),
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Writes `state` into a new vCPU (created, not yet run).
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let kvm = |what: &'static str| move |e| Error::Kvm(what, e);
    if state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(Error::TooMany(state.cpuid.len()));
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| Error::TooMany(state.cpuid.len()))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz
        && vcpu.get_tsc_khz().ok() != Some(khz)
    {
        vcpu.set_tsc_khz(khz).map_err(kvm("SET_TSC_KHZ"))?;
    }
    if state.msrs.len() > MAX_MSRS {
        return Err(Error::TooMany(state.msrs.len()));
    }
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| Error::TooMany(state.msrs.len()))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
    if set != state.msrs.len() {
        return Err(Error::Msrs {
            set,
            total: state.msrs.len(),
            index: state.msrs[set].index,
        });
    }
    vcpu.set_sregs(&state.sregs).map_err(kvm("SET_SREGS"))?;
    vcpu.set_regs(&state.regs).map_err(kvm("SET_REGS"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB); minivmm never
    // enables KVM_CAP_XSAVE2, so KVM copies exactly that many bytes.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(kvm("SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(kvm("SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(kvm("SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm("SET_LAPIC"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm("SET_MP_STATE"))?;
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm("SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Vm;
    use memory::GuestFrames;
    use memory::guest::Backing;

    /// A VM with one vCPU given KVM's supported CPUID, or `None` (printed)
    /// where KVM is not usable and not required.
    fn new_vcpu() -> Option<(Vm, VcpuFd)> {
        let frames = GuestFrames::new(16 << 20, Backing::Anonymous).unwrap();
        let vm = match Vm::new(&frames, false) {
            Ok(vm) => vm,
            Err(e) if std::env::var("MINIVMM_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("SKIPPED: {e}");
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        let vcpu = vm.fd().create_vcpu(0).unwrap();
        let cpuid = vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        Some((vm, vcpu))
    }

    #[test]
    fn vcpu_state_survives_save_encode_decode_and_restore_into_a_new_vm() {
        let Some((vm, vcpu)) = new_vcpu() else { return };
        let mut regs = vcpu.get_regs().unwrap();
        (regs.rax, regs.rbx, regs.rip, regs.rflags) = (0x1234, 0x5678, 0xfff0, 0x2);
        vcpu.set_regs(&regs).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr0 |= 1; // protected mode
        sregs.cs.base = 0x10_0000;
        vcpu.set_sregs(&sregs).unwrap();
        // MSR_IA32_SYSENTER_CS, _ESP.
        let set = Msrs::from_entries(&[
            kvm_msr_entry {
                index: 0x174,
                data: 0x10,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0x175,
                data: 0xdead_b000,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(vcpu.set_msrs(&set).unwrap(), 2);
        let indices = msr_list(vm.kvm()).unwrap();
        let state = save(&vcpu, &indices).unwrap();
        assert!(state.msrs.len() > 10, "{} MSRs", state.msrs.len());
        let bytes = crate::snapshot::format::encode(&state).unwrap();
        let decoded: VcpuState = crate::snapshot::format::decode(&bytes).unwrap();

        let Some((_vm2, fresh)) = new_vcpu() else {
            return;
        };
        restore(&fresh, &decoded).unwrap();
        let got = fresh.get_regs().unwrap();
        assert_eq!((got.rax, got.rbx, got.rip), (0x1234, 0x5678, 0xfff0));
        let got = fresh.get_sregs().unwrap();
        assert_eq!((got.cr0 & 1, got.cs.base), (1, 0x10_0000));
        let again = save(&fresh, &indices).unwrap();
        let msr = |s: &VcpuState, i: u32| s.msrs.iter().find(|m| m.index == i).map(|m| m.data);
        assert_eq!(msr(&again, 0x174), Some(0x10));
        assert_eq!(msr(&again, 0x175), Some(0xdead_b000));
        assert_eq!(again.lapic.regs[..0x400], state.lapic.regs[..0x400]);
        assert_eq!(again.mp_state.mp_state, state.mp_state.mp_state);
        assert_eq!(again.cpuid.len(), state.cpuid.len());
    }

    #[test]
    fn a_state_kvm_refuses_is_an_error_naming_the_ioctl() {
        let Some((vm, vcpu)) = new_vcpu() else { return };
        let mut state = save(&vcpu, &msr_list(vm.kvm()).unwrap()).unwrap();
        // An MSR index nothing implements.
        state.msrs.push(kvm_msr_entry {
            index: 0x4fff_ffff,
            data: 1,
            ..Default::default()
        });
        let Some((_vm2, fresh)) = new_vcpu() else {
            return;
        };
        let e = restore(&fresh, &state).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Msrs {
                    index: 0x4fff_ffff,
                    ..
                }
            ),
            "{e}"
        );
        let mut state = save(&vcpu, &[]).unwrap();
        state.cpuid = vec![kvm_cpuid_entry2::default(); KVM_MAX_CPUID_ENTRIES + 1];
        assert!(matches!(restore(&fresh, &state), Err(Error::TooMany(_))));
    }
}
