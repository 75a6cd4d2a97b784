//! Target `boot_image`: bytes as a kernel image and command line through
//! minivmm's own loading path — linux-loader's bzImage and ELF (PVH) loaders,
//! then our placement of the kernel, zero page or `hvm_start_info`, page
//! tables, command line and MP table in `memory::GuestFrames` (no KVM).
//! ../shared/ADVERSARIAL.md §14.
//!
//! Input: a command-line length byte, the command line (lossy UTF-8), a vCPU
//! count byte (its top bit: ACPI tables on), then the image. Checks: loading
//! returns (Ok or a clear error) without panicking; on success the entry
//! point and the boot structures lie in guest RAM, and with ACPI the RSDP
//! is where the boot structures say, with valid checksums.

use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::boot::{self, BootConfig};

use crate::common::{Input, TempFile, temp_path};

const RAM: u64 = 16 << 20;

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let n = usize::from(input.u8());
    let cmdline = String::from_utf8_lossy(input.bytes(n)).into_owned();
    let cpu_byte = input.u8();
    let cpus = cpu_byte % 4 + 1;
    let acpi = cpu_byte & 0x80 != 0;
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
        acpi,
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
        assert_eq!(info.rsdp.is_some(), acpi);
        if let Some(rsdp) = info.rsdp {
            let mut head = [0u8; 36];
            mem.read_slice(&mut head, rsdp).expect("RSDP in RAM");
            let sum = |b: &[u8]| b.iter().fold(0u8, |s, &x| s.wrapping_add(x));
            assert!(&head[..8] == b"RSD PTR " && sum(&head[..20]) == 0 && sum(&head) == 0);
        }
    }
}
