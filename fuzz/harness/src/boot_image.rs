//! Target `boot_image`: bytes as a kernel image and command line through
//! minivmm's own loading path — linux-loader's bzImage and ELF (PVH) loaders,
//! then our placement of the kernel, zero page or `hvm_start_info`, page
//! tables, command line and MP table in `memory::GuestFrames` (no KVM).
//! ../shared/ADVERSARIAL.md §14.
//!
//! Input: a command-line length byte, the command line (lossy UTF-8), a vCPU
//! count byte, then the image. Checks: loading returns (Ok or a clear error)
//! without panicking; on success the entry point and the boot structures lie
//! in guest RAM.

use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm::boot::{self, BootConfig};

use crate::common::{Input, TempFile, temp_path};

const RAM: u64 = 16 << 20;

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let n = usize::from(input.u8());
    let cmdline = String::from_utf8_lossy(input.bytes(n)).into_owned();
    let cpus = input.u8() % 4 + 1;
    let image = input.rest();
    let path = TempFile(temp_path("kernel"));
    std::fs::write(&path.0, image).expect("temp kernel");
    let frames = GuestFrames::new(RAM, Backing::Anonymous).expect("guest RAM");
    let config = BootConfig {
        kernel: &path.0,
        initrd: None,
        cmdline: &cmdline,
        virtio_mmio: &[(0xd000_0000, 0x1000, 5)],
        cpus,
    };
    if let Ok(info) = boot::load(&frames, &config) {
        let mem = frames.memory();
        let in_ram = |a: GuestAddress| mem.address_in_range(a);
        assert!(in_ram(info.entry), "entry {:#x} outside RAM", info.entry.0);
        assert!(in_ram(info.gdt), "GDT outside RAM");
        assert!(
            info.pml4 == 0 || in_ram(GuestAddress(info.pml4)),
            "page tables outside RAM"
        );
    }
}
