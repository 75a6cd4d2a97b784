//! Target `boot_image`: bytes as a kernel image and command line through
//! minivmm's own loading path — linux-loader's bzImage and ELF (PVH) loaders,
//! then our placement of the kernel, zero page or `hvm_start_info`, page
//! tables, command line and MP table in `memory::GuestFrames` (no KVM).
//! ../shared/ADVERSARIAL.md §14.
//!
//! Input: a command-line length byte, the command line (lossy UTF-8), a vCPU
//! count byte (its top bit: ACPI tables on), a virtio device count byte,
//! then the image. Checks: loading returns (Ok or a clear error) without
//! panicking; on success the entry point and the boot structures lie in
//! guest RAM, and with ACPI every table reachable from the RSDP (XSDT, the
//! tables it lists, the FADT's DSDT) lies in RAM with a valid checksum.

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
    let cpus = (cpu_byte & 0x7f) % 127 + 1;
    let acpi = cpu_byte & 0x80 != 0;
    let devices = vmm::virtio::slots(0, usize::from(input.u8()) % (vmm::virtio::MAX_DEVICES + 1));
    let image = input.rest();
    let path = TempFile(temp_path("kernel"));
    std::fs::write(&path.0, image).expect("temp kernel");
    let frames = GuestFrames::new(RAM, Backing::Anonymous).expect("guest RAM");
    let config = BootConfig {
        kernel: &path.0,
        initrd: None,
        cmdline: &cmdline,
        virtio_mmio: &devices,
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
            check_acpi(&frames, rsdp);
        }
    }
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
}

/// The table at `addr`: in RAM, its checksum valid.
fn table(frames: &GuestFrames, addr: u64) -> Vec<u8> {
    let mem = frames.memory();
    let mut head = [0u8; 36];
    mem.read_slice(&mut head, GuestAddress(addr))
        .unwrap_or_else(|_| panic!("ACPI table at {addr:#x} outside RAM"));
    let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
    let mut t = vec![0u8; len];
    mem.read_slice(&mut t, GuestAddress(addr))
        .unwrap_or_else(|_| panic!("ACPI table at {addr:#x} runs out of RAM"));
    assert_eq!(sum(&t), 0, "checksum of {:?}", &t[..4]);
    t
}

/// RSDP -> XSDT -> every table -> the FADT's DSDT.
fn check_acpi(frames: &GuestFrames, rsdp: GuestAddress) {
    let mut r = [0u8; 36];
    frames
        .memory()
        .read_slice(&mut r, rsdp)
        .expect("RSDP in RAM");
    assert!(&r[..8] == b"RSD PTR " && sum(&r[..20]) == 0 && sum(&r) == 0);
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let xsdt = table(frames, u64_at(&r, 24));
    for at in (36..xsdt.len()).step_by(8) {
        let t = table(frames, u64_at(&xsdt, at));
        if &t[..4] == b"FACP" {
            table(frames, u64_at(&t, 140));
        }
    }
}
