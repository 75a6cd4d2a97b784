//! Taking a full snapshot of a paused VM: the state file (`format`) and the
//! memory file (guest RAM, region after region, as the state's `regions`
//! list them).
//!
//! Order: the devices give back the chains they hold (which writes nothing
//! to guest memory), every vCPU saves its own state at the pause gate, then
//! the clock, the I/O APIC, COM1 and the i8042; RAM is written last, after
//! everything that could still touch it. The VM stays paused and can be
//! resumed afterwards.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, WriteVolatile};

use super::format;
use super::state::{SavedDisk, SavedNet, VmState};
use crate::lock;
use crate::run::Running;

/// Why a snapshot could not be taken (the VM keeps running paused).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Snapshots are of paused VMs.
    #[error("The microVM must be paused before a snapshot is taken (PATCH /vm Paused)")]
    NotPaused,
    /// A vCPU or device could not give its state.
    #[error("Cannot save the state of {0}")]
    State(String),
    /// A file could not be written.
    #[error("Cannot write {what} {path}")]
    File {
        /// Which file.
        what: &'static str,
        /// Where.
        path: String,
        /// The host error.
        #[source]
        source: std::io::Error,
    },
}

/// Saves `running` (paused) to `state_path` and `mem_path`.
pub fn create(running: &Running, state_path: &Path, mem_path: &Path) -> Result<(), Error> {
    if !running.is_paused() {
        return Err(Error::NotPaused);
    }
    let state = collect(running)?;
    let bytes = format::encode(&state).map_err(|e| Error::State(e.to_string()))?;
    let file_error = |what, path: &Path| {
        let path = path.display().to_string();
        move |source| Error::File { what, path, source }
    };
    write_memory(running, mem_path).map_err(file_error("the memory file", mem_path))?;
    File::create(state_path)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .map_err(file_error("the snapshot file", state_path))
}

fn collect(running: &Running) -> Result<VmState, Error> {
    let machine = &running.machine;
    let config = lock(&machine.config).clone();
    let mut devices = Vec::new();
    let mut disks = Vec::new();
    for (handle, disk) in running.devices.blocks.iter().zip(&config.disks) {
        let mut t = lock(&handle.transport);
        let mut capacity = [0u8; 8];
        t.device().read_config(0, &mut capacity);
        disks.push(SavedDisk {
            path: disk.path.display().to_string(),
            read_only: disk.read_only,
            serial: disk.serial.clone(),
            size: u64::from_le_bytes(capacity) * 512,
            rate_limiter: disk.rate_limiter,
        });
        devices.push(
            t.save_state()
                .map_err(|e| Error::State(format!("disk {}: {e}", handle.index)))?,
        );
    }
    let mut nets = Vec::new();
    for (i, (handle, net)) in running.devices.nets.iter().zip(&config.nets).enumerate() {
        let mut t = lock(&handle.transport);
        let mut config_space = [0u8; 12];
        t.device().read_config(0, &mut config_space);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&config_space[..6]);
        nets.push(SavedNet {
            id: net.id.clone().unwrap_or_else(|| format!("net{i}")),
            tap: match &net.tap {
                crate::virtio::TapSpec::Name(name) => name.clone(),
                crate::virtio::TapSpec::Fd(fd) => format!("fd={fd}"),
            },
            mac,
            mtu: u16::from_le_bytes([config_space[10], config_space[11]]),
            rx_rate_limiter: net.rx_rate_limiter,
            tx_rate_limiter: net.tx_rate_limiter,
        });
        devices.push(
            t.save_state()
                .map_err(|e| Error::State(format!("network device {}: {e}", handle.index)))?,
        );
    }
    let vcpus = running
        .vcpus
        .save_states(machine.msrs.to_vec(), usize::from(config.cpus))
        .map_err(Error::State)?;
    let clock = machine
        .vm
        .get_clock()
        .map_err(|e| Error::State(format!("the KVM clock: {e}")))?;
    let ioapic = lock(&machine.ioapic).state();
    let serial = lock(&machine.serial).uart().state().into();
    let i8042 = lock(&running.i8042).state();
    let regions = machine
        .frames
        .memory()
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .collect();
    Ok(VmState {
        mem: config.mem,
        regions,
        frames: machine.frames.placed(),
        acpi: config.acpi,
        boot_timer: config.boot_timer,
        disks,
        nets,
        vcpus,
        clock,
        ioapic,
        serial,
        i8042,
        devices,
    })
}

/// Writes every RAM region, in order, to `path`.
fn write_memory(running: &Running, path: &Path) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    for region in running.machine.frames.memory().iter() {
        let slice = region
            .as_volatile_slice()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        file.write_all_volatile(&slice)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    file.sync_all()
}
