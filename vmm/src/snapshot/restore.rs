//! Restoring a snapshot into this process: `--restore DIR` and the API's
//! `PUT /snapshot/load`.
//!
//! Order: the state file is read and decoded (`format`), then everything
//! that can be checked without building anything is — the state against
//! itself (memory layout, device counts), the host (vCPUs KVM can give, the
//! memory file's size, each disk image's size, each TAP) — so a bad
//! snapshot is refused with one line before any VM exists. Only then is
//! guest RAM mapped from the memory file (copy-on-write unless shared:
//! clones of one snapshot share every page none of them wrote), the frames
//! minivmm placed are placed again, the devices opened and put on the
//! buses as a booted VM's are (`Vmm::assemble`), and every saved state
//! written back: COM1, the I/O APIC (its KVM routes), the i8042, each
//! transport and its queues, kvmclock, then the vCPUs. Every queue is
//! kicked once, so requests the guest made available before the snapshot
//! are served (exactly once: the queue's position was saved with it).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::format::{self, FormatError, HEADER_SIZE, MAX_PAYLOAD};
use super::state::{SavedDisk, SavedNet, VmState};
use crate::lock;
use crate::run::{self, VmConfig, Vmm};
use crate::virtio::{self, DiskConfig, MAX_DEVICES, NetSpec, TapSpec};
use crate::vm::Vm;
use crate::x86::cpuid::CpuTemplate;

/// The state file's name in a `--restore` directory.
pub const STATE_FILE: &str = "snapshot";
/// The memory file's name in a `--restore` directory.
pub const MEMORY_FILE: &str = "memory";

/// Where a snapshot is and how to bring it back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// The state file.
    pub state_path: PathBuf,
    /// The memory file.
    pub mem_path: PathBuf,
    /// Map the memory file shared (the guest's writes reach it) instead of
    /// copy-on-write.
    pub shared: bool,
    /// `(iface_id, TAP)`: the TAP a saved interface uses instead of its own.
    pub network_overrides: Vec<(String, String)>,
    /// Start the vCPUs (else the VM waits paused for `PATCH /vm`).
    pub resume: bool,
    /// Log the pages the guest writes, for diff snapshots on top of this
    /// one.
    pub track_dirty_pages: bool,
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("Cannot read the {what} {path}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a valid snapshot.
    #[error("{path}")]
    Format {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: FormatError,
    },
    /// The state does not describe a VM this build can rebuild.
    #[error("The snapshot is inconsistent: {0}")]
    Invalid(String),
    /// The host cannot give what the snapshot needs.
    #[error("{0}")]
    Host(String),
    /// Building the VM failed.
    #[error(transparent)]
    Run(#[from] run::Error),
    /// A saved device or vCPU state was refused.
    #[error("Cannot restore {0}")]
    State(String),
}

/// Builds the VM `params` names, ready to run (paused unless
/// `params.resume`).
pub fn restore(params: &Params) -> Result<Vmm, Error> {
    let state = read_state(&params.state_path)?;
    check_vcpus(state.vcpus.len())?;
    validate(&state)?;
    let nets = net_specs(&state.nets, &params.network_overrides)?;
    check_host(&state, params)?;
    let mem = open_memory(params)?;
    let config = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: String::new(),
        mem: state.mem,
        cpus: state.vcpus.len() as u8,
        template: CpuTemplate::default(),
        disks: state.disks.iter().map(disk_config).collect(),
        nets,
        acpi: state.acpi,
        boot_timer: state.boot_timer,
        track_dirty_pages: params.track_dirty_pages,
    };
    // Devices before RAM: a missing image or TAP is reported first.
    let blocks = virtio::open_disks(&config.disks).map_err(run::Error::from)?;
    let taps = virtio::open_nets(&config.nets).map_err(run::Error::from)?;
    let frames = GuestFrames::new(
        state.mem,
        Backing::File {
            file: Arc::new(mem),
            shared: params.shared,
        },
    )
    .map_err(|e| Error::Host(format!("{}: {}", params.mem_path.display(), chain(&e))))?;
    frames
        .place_again(&state.frames)
        .map_err(|e| Error::Invalid(chain(&e)))?;
    let frames = Arc::new(frames);
    let vm = Vm::new(&frames, params.track_dirty_pages).map_err(run::Error::from)?;
    let mut vmm = Vmm::assemble(
        &config,
        frames,
        vm,
        blocks,
        taps,
        Some((&state.serial).into()),
    )?;
    restore_devices(&vmm, &state)?;
    vmm.vm
        .restore_clock(&state.clock)
        .map_err(|e| Error::State(format!("the KVM clock: {}", chain(&e))))?;
    vmm.vcpus = vmm
        .vm
        .restore_vcpus(&state.vcpus)
        .map_err(|e| Error::State(chain(&e)))?;
    vmm.start_paused = !params.resume;
    // The memory file is the base a diff snapshot of this VM builds on.
    vmm.machine.has_base.store(true, Ordering::Release);
    for events in &vmm.device_events {
        events.kick();
    }
    Ok(vmm)
}

fn chain(e: &dyn std::error::Error) -> String {
    crate::error_chain(e)
}

/// Reads and decodes the state file, never more than a valid one can hold.
fn read_state(path: &Path) -> Result<VmState, Error> {
    let read = |source| Error::Read {
        what: "snapshot file",
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    // One byte more than the largest valid file: decode reports the excess.
    file.take(HEADER_SIZE as u64 + MAX_PAYLOAD + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    format::decode(&bytes).map_err(|source| Error::Format {
        path: path.to_owned(),
        source,
    })
}

/// The state against itself: what a file written by minivmm always holds
/// (the vCPU count is checked against the host separately).
pub fn validate(state: &VmState) -> Result<(), Error> {
    let invalid = |m: String| Err(Error::Invalid(m));
    if state.mem == 0
        || !state.mem.is_multiple_of(memory::PAGE_SIZE)
        || state.mem > memory::layout::MAX_RAM
    {
        return invalid(format!("{:#x} bytes of RAM", state.mem));
    }
    let layout: Vec<(u64, u64)> = memory::layout::ram_ranges(state.mem)
        .iter()
        .map(|&(a, l)| (a.0, l))
        .collect();
    if state.regions != layout {
        return invalid(format!(
            "RAM regions {:x?} are not the layout of {} MiB",
            state.regions,
            state.mem >> 20
        ));
    }
    let count = state.disks.len() + state.nets.len();
    if count + usize::from(state.boot_timer) > MAX_DEVICES || state.devices.len() != count {
        return invalid(format!(
            "{} device states for {} disks and {} network interfaces",
            state.devices.len(),
            state.disks.len(),
            state.nets.len()
        ));
    }
    Ok(())
}

/// As many vCPUs as KVM here and minivmm (255) can run, and at least one.
fn check_vcpus(count: usize) -> Result<(), Error> {
    if count == 0 {
        return Err(Error::Invalid("no vCPUs".into()));
    }
    let kvm =
        kvm_ioctls::Kvm::new().map_err(|e| Error::Host(format!("Cannot open /dev/kvm: {e}")))?;
    let max = kvm.get_max_vcpus().min(255);
    if count > max {
        return Err(Error::Host(format!(
            "The snapshot has {count} vCPUs, this host runs at most {max}"
        )));
    }
    Ok(())
}

/// The host against the state: the memory file and the disk images.
fn check_host(state: &VmState, params: &Params) -> Result<(), Error> {
    let mem_len = std::fs::metadata(&params.mem_path)
        .map_err(|source| Error::Read {
            what: "memory file",
            path: params.mem_path.clone(),
            source,
        })?
        .len();
    if mem_len != state.mem {
        return Err(Error::Host(format!(
            "The memory file {} holds {mem_len} bytes, the snapshot's guest has {} ({} MiB)",
            params.mem_path.display(),
            state.mem,
            state.mem >> 20
        )));
    }
    for (i, disk) in state.disks.iter().enumerate() {
        let len = std::fs::metadata(&disk.path)
            .map_err(|source| Error::Read {
                what: "disk image",
                path: disk.path.clone().into(),
                source,
            })?
            .len();
        // The device offers whole sectors: what the guest saw.
        if len / 512 * 512 != disk.size {
            return Err(Error::Host(format!(
                "Disk {i} ({}) was {} bytes when the snapshot was taken and is {len} now",
                disk.path, disk.size
            )));
        }
    }
    Ok(())
}

/// The memory file, opened read-write only when mapped shared.
fn open_memory(params: &Params) -> Result<File, Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(params.shared)
        .open(&params.mem_path)
        .map_err(|source| Error::Read {
            what: "memory file",
            path: params.mem_path.clone(),
            source,
        })
}

fn disk_config(d: &SavedDisk) -> DiskConfig {
    DiskConfig {
        path: d.path.clone().into(),
        read_only: d.read_only,
        serial: d.serial.clone(),
        rate_limiter: d.rate_limiter,
    }
}

/// The saved interfaces with their TAPs, renamed by `overrides`; every
/// override must name a saved interface.
fn net_specs(saved: &[SavedNet], overrides: &[(String, String)]) -> Result<Vec<NetSpec>, Error> {
    if let Some((id, _)) = overrides
        .iter()
        .find(|(id, _)| !saved.iter().any(|n| &n.id == id))
    {
        return Err(Error::Host(format!(
            "network_overrides names `{id}`, which the snapshot does not have (it has {})",
            names(saved)
        )));
    }
    saved
        .iter()
        .map(|n| {
            let tap = overrides
                .iter()
                .rev()
                .find(|(id, _)| id == &n.id)
                .map_or(n.tap.as_str(), |(_, tap)| tap.as_str());
            if tap.starts_with("fd=") {
                return Err(Error::Host(format!(
                    "Network interface `{}` was given as a descriptor ({tap}); name its TAP in network_overrides",
                    n.id
                )));
            }
            Ok(NetSpec {
                id: Some(n.id.clone()),
                tap: TapSpec::Name(tap.to_owned()),
                mac: Some(n.mac),
                mtu: Some(n.mtu),
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            })
        })
        .collect()
}

fn names(nets: &[SavedNet]) -> String {
    if nets.is_empty() {
        return "none".to_owned();
    }
    nets.iter()
        .map(|n| n.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The I/O APIC, the i8042 and every transport from their saved states.
fn restore_devices(vmm: &Vmm, state: &VmState) -> Result<(), Error> {
    if !lock(&vmm.machine.ioapic).restore(&state.ioapic) {
        return Err(Error::State("the I/O APIC (wrong number of pins)".into()));
    }
    if !lock(&vmm.i8042).restore(&state.i8042) {
        return Err(Error::State("the i8042 (a buffer too long)".into()));
    }
    let devices = vmm.devices();
    let handles = devices
        .blocks
        .iter()
        .map(|h| (h.index, &h.transport))
        .chain(devices.nets.iter().map(|h| (h.index, &h.transport)));
    for ((index, transport), saved) in handles.zip(&state.devices) {
        lock(transport)
            .restore_state(saved)
            .map_err(|e| Error::State(format!("virtio device {index}: {}", chain(&e))))?;
    }
    // The regions the memory file was mapped as, checked once more against
    // what was saved (a state that passed `validate` always matches).
    let mapped: Vec<(u64, u64)> = vmm
        .frames()
        .memory()
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .collect();
    if mapped != state.regions {
        return Err(Error::Invalid("the RAM regions".into()));
    }
    Ok(())
}
