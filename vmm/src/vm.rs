//! The KVM virtual machine: memory slots for `GuestFrames`, TSS and
//! identity-map addresses, a split irqchip, and vCPU creation and setup.
//!
//! The irqchip is split (`KVM_CAP_SPLIT_IRQCHIP`), as Cloud Hypervisor's: the
//! local APICs are in the kernel, the I/O APIC is minivmm's
//! (`devices::ioapic`), whose redirection entries become KVM MSI routes
//! ([`KvmRoutes`]) so irqfds still inject without an exit; there is no 8259
//! PIC and no PIT (Linux on KVM does not check the timer, `no_timer_check`,
//! and calibrates from kvmclock). What that saves: an in-kernel PIC, I/O APIC
//! and PIT register six devices on KVM's I/O buses, and tearing the VM down
//! unregisters each, waiting for an SRCU grace period every time — measured
//! here, 14-20 ms of every run's exit; with the split irqchip the VM fd closes
//! in 0.2 ms.
//!
//! Only this module, `vcpu.rs` and `vcpu_state.rs` issue KVM ioctls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::ioapic::{IOAPIC_PINS, MsiMessage, MsiRoutes};
use kvm_bindings::{
    KVM_API_VERSION, KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KvmIrqRouting, Msrs, kvm_clock_data, kvm_enable_cap,
    kvm_irq_routing_entry, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use memory::GuestFrames;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::BootInfo;
use crate::vcpu_state::{self, VcpuState};
use crate::x86::cpuid::{self, CpuTemplate};
use crate::x86::regs;

/// Where KVM keeps the TSS it needs for real-mode emulation: three pages in the
/// MMIO hole, below the identity-map page (as Firecracker).
const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` is missing or not accessible.
    #[error("Cannot open /dev/kvm (is KVM available and permitted?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// `/dev/kvm` does not speak the KVM API.
    #[error("/dev/kvm is not a usable KVM device (KVM_GET_API_VERSION returned {0}, expected 12)")]
    NotKvm(i32),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// An eventfd for KVM could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// More vCPUs than KVM allows.
    #[error("{requested} vCPUs requested, KVM allows at most {max}")]
    TooManyCpus {
        /// vCPUs asked for.
        requested: u8,
        /// KVM's limit.
        max: usize,
    },
}

/// Why saved vCPUs could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Creating the vCPU failed.
    #[error(transparent)]
    Vm(#[from] Error),
    /// KVM refused the saved state.
    #[error("vCPU {index}")]
    Vcpu {
        /// Which.
        index: usize,
        /// What was refused.
        #[source]
        source: vcpu_state::Error,
    },
}

/// An open `/dev/kvm` and a VM with guest RAM mapped.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
}

impl Vm {
    /// Creates the VM and maps every RAM region of `frames` into it, one
    /// memory slot per region (slot `i` is region `i`), with KVM logging
    /// the pages the guest writes if `log_dirty`.
    pub fn new(frames: &GuestFrames, log_dirty: bool) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(Error::NotKvm(version));
        }
        let fd = kvm.create_vm().map_err(|e| Error::Kvm("CREATE_VM", e))?;
        for (slot, region) in frames.memory().iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("region is mapped");
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the region is a live mapping of `region.len()` bytes owned by
            // `frames`, which the caller keeps alive for as long as the VM runs
            // (Vmm holds both); KVM only accesses it while vCPUs run.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(|e| Error::Kvm("SET_USER_MEMORY_REGION", e))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| Error::Kvm("SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| Error::Kvm("SET_IDENTITY_MAP_ADDR", e))?;
        // Local APICs in the kernel; GSIs 0..24 reserved for the I/O APIC's
        // routes (module docs).
        let split = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            args: [IOAPIC_PINS as u64, 0, 0, 0],
            ..Default::default()
        };
        fd.enable_cap(&split)
            .map_err(|e| Error::Kvm("ENABLE_CAP(SPLIT_IRQCHIP)", e))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
        })
    }

    /// The VM file descriptor, shared (the snapshot code reads its clock).
    pub fn fd_arc(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The VM file descriptor (for ioeventfds, irqfds).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The I/O APIC's side of KVM's GSI routing.
    pub fn routes(&self) -> KvmRoutes {
        KvmRoutes {
            fd: self.fd.clone(),
            failed: AtomicBool::new(false),
        }
    }

    /// The open `/dev/kvm` (system ioctls: MSR lists, supported CPUID).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Most vCPUs KVM accepts for this VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Sets kvmclock to a snapshot's `clock` (its flags dropped: they say
    /// which fields KVM filled in, and a host without KVM_CLOCK_REALTIME
    /// refuses them).
    pub fn restore_clock(&self, clock: &kvm_clock_data) -> Result<(), Error> {
        let clock = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| Error::Kvm("SET_CLOCK", e))
    }

    /// Creates one vCPU per saved state and writes that state into it (the
    /// count was checked against KVM's limit before the VM was created).
    pub fn restore_vcpus(&self, states: &[VcpuState]) -> Result<Vec<VcpuFd>, RestoreError> {
        states
            .iter()
            .enumerate()
            .map(|(index, state)| {
                let vcpu = self
                    .fd
                    .create_vcpu(index as u64)
                    .map_err(|e| RestoreError::Vm(Error::Kvm("CREATE_VCPU", e)))?;
                vcpu_state::restore(&vcpu, state)
                    .map_err(|source| RestoreError::Vcpu { index, source })?;
                Ok(vcpu)
            })
            .collect()
    }

    /// Creates `count` vCPUs with CPUID from `template`, MSRs, FPU, LINT pins,
    /// and, for vCPU 0, the registers that start the kernel. The others wait for
    /// INIT/SIPI from the boot vCPU (the in-kernel LAPIC handles that).
    pub fn create_vcpus(
        &self,
        count: u8,
        template: CpuTemplate,
        boot: &BootInfo,
    ) -> Result<Vec<VcpuFd>, Error> {
        if usize::from(count) > self.max_vcpus() {
            return Err(Error::TooManyCpus {
                requested: count,
                max: self.max_vcpus(),
            });
        }
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::with_capacity(count.into());
        for index in 0..count {
            let vcpu = self
                .fd
                .create_vcpu(u64::from(index))
                .map_err(|e| Error::Kvm("CREATE_VCPU", e))?;
            let cpuid = cpuid::vcpu_cpuid(&supported, index, count, template);
            for e in cpuid
                .as_slice()
                .iter()
                .filter(|e| matches!(e.function, 0x1 | 0x7))
            {
                let (f, i, a, b, c, d) = (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx);
                log::debug!(
                    "vCPU {index} CPUID {f:#x}.{i}: eax={a:#010x} ebx={b:#010x} ecx={c:#010x} edx={d:#010x}"
                );
            }
            vcpu.set_cpuid2(&cpuid)
                .map_err(|e| Error::Kvm("SET_CPUID2", e))?;
            let msrs = Msrs::from_entries(&regs::boot_msrs()).expect("few MSRs");
            let set = vcpu
                .set_msrs(&msrs)
                .map_err(|e| Error::Kvm("SET_MSRS", e))?;
            if set != msrs.as_slice().len() {
                log::warn!(
                    "vCPU {index}: KVM accepted {set} of {} boot MSRs",
                    msrs.as_slice().len()
                );
            }
            vcpu.set_fpu(&regs::fpu())
                .map_err(|e| Error::Kvm("SET_FPU", e))?;
            let mut lapic = vcpu.get_lapic().map_err(|e| Error::Kvm("GET_LAPIC", e))?;
            regs::set_lint_pins(&mut lapic);
            vcpu.set_lapic(&lapic)
                .map_err(|e| Error::Kvm("SET_LAPIC", e))?;
            if index == 0 {
                let sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("GET_SREGS", e))?;
                let sregs = regs::sregs(sregs, boot.mode, boot.gdt, boot.pml4);
                vcpu.set_sregs(&sregs)
                    .map_err(|e| Error::Kvm("SET_SREGS", e))?;
                vcpu.set_regs(&regs::regs(boot.mode, boot.entry, boot.stack))
                    .map_err(|e| Error::Kvm("SET_REGS", e))?;
            }
            vcpus.push(vcpu);
        }
        Ok(vcpus)
    }
}

/// Moves KVM's dirty log of every memory slot of `vm` (made by [`Vm::new`]
/// with `log_dirty`: the pages the guest wrote since the last call or since
/// the slot was created) into the frames' own dirty log, where the devices
/// mark what they write; KVM's log is cleared. `frames.take_dirty()` then
/// gives every page written by either.
pub fn fold_dirty_log(vm: &VmFd, frames: &GuestFrames) -> Result<(), Error> {
    for (slot, region) in frames.memory().iter().enumerate() {
        let bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| Error::Kvm("GET_DIRTY_LOG", e))?;
        for (page, pages) in memory::bit_runs(&bitmap) {
            let addr = vm_memory::GuestAddress(region.start_addr().0 + page * memory::PAGE_SIZE);
            // Inside the slot, so inside RAM: marking cannot fail.
            let _ = frames.mark_dirty(addr, pages * memory::PAGE_SIZE);
        }
    }
    Ok(())
}

/// Installs the I/O APIC's routes as KVM's GSI routing table: GSI `n` is pin
/// `n`, an MSI route to the local APICs.
#[derive(Debug)]
pub struct KvmRoutes {
    fd: Arc<VmFd>,
    failed: AtomicBool,
}

/// The KVM routing table for the I/O APIC's pins.
pub fn routing_table(routes: &[Option<MsiMessage>; IOAPIC_PINS]) -> Vec<kvm_irq_routing_entry> {
    routes
        .iter()
        .enumerate()
        .filter_map(|(pin, route)| {
            let msi = route.as_ref()?;
            let mut entry = kvm_irq_routing_entry {
                gsi: pin as u32,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = msi.address as u32;
            entry.u.msi.address_hi = (msi.address >> 32) as u32;
            entry.u.msi.data = msi.data;
            Some(entry)
        })
        .collect()
}

impl MsiRoutes for KvmRoutes {
    fn set_routes(&self, routes: &[Option<MsiMessage>; IOAPIC_PINS]) {
        let entries = routing_table(routes);
        let result = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("{e:?}"))
            .and_then(|table| self.fd.set_gsi_routing(&table).map_err(|e| e.to_string()));
        if let Err(e) = result
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            log::error!(
                "KVM SET_GSI_ROUTING failed: {e}; I/O APIC pins may not interrupt (logged once)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table_has_an_msi_entry_per_routed_pin() {
        let mut routes = [None; IOAPIC_PINS];
        routes[4] = Some(MsiMessage {
            address: 0xfee0_1000,
            data: 0x34,
        });
        routes[23] = Some(MsiMessage {
            address: 0xfee0_0004,
            data: 0x141,
        });
        let table = routing_table(&routes);
        assert_eq!(table.len(), 2);
        assert_eq!((table[0].gsi, table[0].type_), (4, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entries were built as MSI routes.
        let (lo, hi, data) = unsafe {
            (
                table[1].u.msi.address_lo,
                table[1].u.msi.address_hi,
                table[1].u.msi.data,
            )
        };
        assert_eq!((table[1].gsi, lo, hi, data), (23, 0xfee0_0004, 0, 0x141));
        assert!(routing_table(&[None; IOAPIC_PINS]).is_empty());
    }
}
