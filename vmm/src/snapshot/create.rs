//! Taking a snapshot of a paused VM: the state file (`format`) and the
//! memory file (guest RAM, region after region, as the state's `regions`
//! list them).
//!
//! A full snapshot writes all of RAM. A diff snapshot writes only the pages
//! written since the last snapshot (or the restore): those KVM's dirty log
//! shows the guest wrote (`KVM_MEM_LOG_DIRTY_PAGES`, on with
//! `track_dirty_pages`) and those minivmm's devices marked in the frames'
//! dirty log (DMA bypasses KVM's), at their offsets in the memory file. Into
//! the base's memory file (or a copy of it) that makes it a full snapshot of
//! now; into a new file, a sparse one (holes where nothing changed) the
//! size of RAM, to be merged onto the base.
//!
//! Order: the devices give back the chains they hold (which writes nothing
//! to guest memory), every vCPU saves its own state at the pause gate, then
//! the clock, the I/O APIC, COM1 and the i8042; RAM is written last, after
//! everything that could still touch it. The VM stays paused and can be
//! resumed afterwards.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::Ordering;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, WriteVolatile,
};

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
    /// A diff snapshot without dirty page tracking.
    #[error(
        "Diff snapshots need dirty page tracking (track_dirty_pages in /machine-config or /snapshot/load)"
    )]
    NotTracking,
    /// A diff snapshot with nothing to be a diff of.
    #[error("A diff snapshot needs a full one first (or a VM restored from one): its base")]
    NoBase,
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

/// All of RAM, or what changed since the last snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// All of RAM.
    Full,
    /// The pages written since the last snapshot or the restore.
    Diff,
}

/// Saves `running` (paused) to `state_path` and `mem_path`; the bytes of
/// RAM written.
pub fn create(
    running: &Running,
    state_path: &Path,
    mem_path: &Path,
    kind: Kind,
) -> Result<u64, Error> {
    if !running.is_paused() {
        return Err(Error::NotPaused);
    }
    let machine = &running.machine;
    let tracking = lock(&machine.config).track_dirty_pages;
    if kind == Kind::Diff && !tracking {
        return Err(Error::NotTracking);
    }
    if kind == Kind::Diff && !machine.has_base.load(Ordering::Acquire) {
        return Err(Error::NoBase);
    }
    let file_error = |what, path: &Path| {
        let path = path.display().to_string();
        move |source| Error::File { what, path, source }
    };
    refuse_own_backing(&machine.frames, mem_path)
        .map_err(file_error("the memory file", mem_path))?;
    let state = collect(running)?;
    let bytes = format::encode(&state).map_err(|e| Error::State(e.to_string()))?;
    // Taking the logs clears them: the next diff starts from this snapshot.
    if tracking {
        crate::vm::fold_dirty_log(&machine.vm, &machine.frames)
            .map_err(|e| Error::State(crate::error_chain(&e)))?;
    }
    let dirty = machine.frames.take_dirty();
    let written = match kind {
        Kind::Full => write_memory(running, mem_path),
        Kind::Diff => write_dirty(running, mem_path, &dirty),
    }
    .map_err(file_error("the memory file", mem_path))
    .and_then(|written| {
        File::create(state_path)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_data()))
            .map_err(file_error("the snapshot file", state_path))?;
        Ok(written)
    });
    // The logs are spent either way: without this snapshot on disk, a
    // later diff would miss what they held, so it needs a new full one.
    machine.has_base.store(written.is_ok(), Ordering::Release);
    written
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

/// Refuses to write into the file this VM's RAM is mapped from: truncating
/// it would pull pages from under the guest, and writing into it would
/// change what other clones mapping it see.
fn refuse_own_backing(frames: &memory::GuestFrames, path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(path) else {
        return Ok(());
    };
    for region in frames.memory().iter() {
        if let Some(fo) = region.file_offset() {
            let backing = fo.file().metadata()?;
            if (backing.dev(), backing.ino()) == (target.dev(), target.ino()) {
                return Err(io::Error::other(
                    "it is the memory file this VM runs from; write the snapshot elsewhere",
                ));
            }
        }
    }
    Ok(())
}

/// Writes every RAM region, in order, to `path`. Pages that read as zeros
/// because nothing ever wrote them (`GuestFrames::populated`: never
/// populated, and for a restored VM a hole in the file it was restored
/// from too) are left as holes (the file is RAM's size all the same), so a
/// guest that used little of its RAM costs little to save.
fn write_memory(running: &Running, path: &Path) -> io::Result<u64> {
    let frames = &running.machine.frames;
    let populated = frames.populated()?;
    let mut file = File::create(path)?;
    file.set_len(frames.ram_size())?;
    write_ranges(&mut file, frames, &populated)
}

/// Writes the guest ranges `dirty` into `path` at their memory-file
/// offsets: a file of RAM's size is updated in place, a new or empty one
/// made that size first.
fn write_dirty(running: &Running, path: &Path, dirty: &[(GuestAddress, u64)]) -> io::Result<u64> {
    let frames = &running.machine.frames;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let total = frames.ram_size();
    match file.metadata()?.len() {
        0 => file.set_len(total)?,
        len if len == total => {}
        len => {
            return Err(io::Error::other(format!(
                "it holds {len} bytes, not the guest's {total}: a diff goes into its base's memory file or a new one"
            )));
        }
    }
    write_ranges(&mut file, frames, dirty)
}

/// Writes each guest range (inside RAM, as the frames' own lists are) at
/// its memory-file offset — the regions laid end to end — and syncs the
/// data; the bytes written.
fn write_ranges(
    file: &mut File,
    frames: &memory::GuestFrames,
    ranges: &[(GuestAddress, u64)],
) -> io::Result<u64> {
    let mut written = 0;
    for &(addr, len) in ranges {
        let mut offset = 0;
        let region = frames
            .memory()
            .iter()
            .find(|r| {
                let inside = addr >= r.start_addr() && addr.0 + len <= r.start_addr().0 + r.len();
                if !inside {
                    offset += r.len();
                }
                inside
            })
            .ok_or_else(|| io::Error::other(format!("{addr:?}+{len:#x} is not inside RAM")))?;
        let at = addr.0 - region.start_addr().0;
        let slice = region
            .get_slice(MemoryRegionAddress(at), len as usize)
            .map_err(io::Error::other)?;
        file.seek(SeekFrom::Start(offset + at))?;
        file.write_all_volatile(&slice).map_err(io::Error::other)?;
        written += len;
    }
    file.sync_data()?;
    Ok(written)
}
