//! minivmm's test guest kernel.
//!
//! Booted through PVH (see [`boot`]), it reads `hvm_start_info`, prints the
//! command line and memory map, builds the project's buddy frame allocator
//! (`memory`, the same code the VMM uses) over the RAM it was given, maps RAM
//! above 4 GiB, runs a short self-test and ends through the debug-exit port
//! (or as the command line asks: reset, triple fault, a given exit byte). The
//! console output is a contract the integration tests rely on; see README.md.
//!
//! Guest CPL0 code is emulated on the project's nested-KVM machines (about 2 M
//! instructions per second), so the work here is kept small: O(frames) work is
//! limited to the allocator's metadata reset, and the full consistency check
//! runs by default only with at most 512 MiB of RAM.

#![no_std]
#![no_main]

mod acpi;
mod blk;
mod boot;
mod cmdline;
mod cpu;
mod dma;
mod drivers;
mod idt;
mod irq;
mod net;
mod netpool;
mod netstack;
mod paging;
mod ram;
mod selftest;
mod serial;
mod snapshot;
mod startinfo;
mod virtio_mmio;
mod virtq;

use core::fmt;

use cmdline::Action;
use memory::PAGE_SIZE;
use startinfo::PhysRange;

/// Debug-exit byte for success.
const EXIT_SUCCESS: u8 = 0;
/// Debug-exit byte for failure.
const EXIT_FAILURE: u8 = 1;

/// Prints why the guest cannot go on, the failed verdict, and exits with failure.
fn fail(why: fmt::Arguments<'_>) -> ! {
    log!("error: {why}");
    log!("selftest: FAIL");
    cpu::exit(EXIT_FAILURE)
}

/// The Rust entry, called by `boot` in 64-bit mode with the physical address
/// of `hvm_start_info`.
extern "C" fn kmain(start_info: u64) -> ! {
    serial::init();
    idt::init();
    let info = startinfo::parse(start_info).unwrap_or_else(|e| fail(format_args!("{e}")));
    log!("booted via PVH");
    log!(
        "start_info: version {} at 0x{:x}, rsdp 0x{:x}",
        info.version,
        info.start_info.start,
        info.rsdp
    );
    log!("cmdline: {}", info.cmdline());
    if info.cmdline_truncated {
        log!("warning: the command line has no NUL within 4 KiB; cut there");
    }
    if info.cmdline_is_cut_utf8() {
        log!("warning: the command line is not UTF-8; cut before the first bad byte");
    }
    let options = cmdline::parse(info.cmdline());
    let (_, ebx1, ecx1, edx1) = cpu::cpuid(1, 0);
    let (max_leaf, ..) = cpu::cpuid(0, 0);
    let ebx7 = if max_leaf >= 7 { cpu::cpuid(7, 0).1 } else { 0 };
    log!(
        "cpu: apic id {}, {} logical, leaf1 ecx=0x{ecx1:08x} edx=0x{edx1:08x}, leaf7 ebx=0x{ebx7:08x}",
        ebx1 >> 24,
        (ebx1 >> 16) & 0xff
    );

    log!("memmap: {} entries", info.memmap().len());
    for e in info.memmap() {
        let last = e.addr.wrapping_add(e.size).wrapping_sub(1);
        log!("  [0x{:016x}-0x{last:016x}] type {}", e.addr, e.kind);
    }
    if info.modules_ignored > 0 {
        log!("warning: {} boot modules ignored", info.modules_ignored);
    }

    let (tables, acpi_ok) = read_acpi(info.rsdp);

    let (image_start, image_end) = boot::image_range();
    let image = PhysRange {
        start: image_start,
        end: image_end,
    };
    let mut setup = ram::setup(&info, image).unwrap_or_else(|e| fail(format_args!("{e}")));
    let frames = setup.ram.frames();
    log!(
        "ram: {} MiB in {} ranges, {frames} frames",
        (frames * PAGE_SIZE) >> 20,
        setup.ram.ranges().len()
    );
    if setup.ram.ignored > 0 {
        log!(
            "warning: {} RAM ranges beyond the first {} ignored",
            setup.ram.ignored,
            memory::MAX_RANGES
        );
    }
    if setup.ram.cut_bytes > 0 {
        log!(
            "warning: {} bytes of RAM above 2^47 ignored",
            setup.ram.cut_bytes
        );
    }
    for r in setup.ram.ranges() {
        log!(
            "ram range 0x{:x}-0x{:x} ({} frames)",
            r.start.addr().0,
            r.end.addr().0,
            r.len()
        );
    }
    log!(
        "image 0x{:x}-0x{:x}, metadata 0x{:x}-0x{:x}",
        image.start,
        image.end,
        setup.meta.start,
        setup.meta.end
    );

    let mapped = paging::map_high_ram(&mut setup.alloc, setup.ram.ranges())
        .unwrap_or_else(|e| fail(format_args!("mapping high RAM: {e}")));
    if mapped.pages > 0 {
        log!(
            "high ram: {} MiB mapped with 2 MiB pages, {} page-table frames",
            mapped.pages * 2,
            mapped.tables
        );
    }
    let stats = setup.alloc.stats();
    log!(
        "frames: free={} reserved={} allocated={}",
        stats.free,
        stats.reserved,
        stats.allocated
    );

    let pass = selftest::run(&mut setup, &options);
    let pattern = options
        .snapshot
        .map(|settings| snapshot::prepare(&mut setup.alloc, settings));
    let prepared = pattern.is_none_or(|p| p.is_some());
    let devices = drivers::run(
        setup.alloc,
        info.cmdline(),
        tables.as_ref(),
        &options,
        pattern.flatten(),
    );
    let pass = devices && pass && acpi_ok && prepared;
    log!("selftest: {}", if pass { "PASS" } else { "FAIL" });
    let verdict = if pass { EXIT_SUCCESS } else { EXIT_FAILURE };
    match options.action {
        Action::Report if options.acpi_exit => match tables {
            Some(t) => {
                let s5 = t.s5.unwrap_or(0);
                log!(
                    "action: ACPI power-off (S5, SLP_TYP {s5}, port 0x{:x})",
                    t.sleep_control
                );
                cpu::outb(t.sleep_control, s5 << 2 | 1 << 5);
                log!("error: the ACPI power-off did not happen");
                cpu::exit(EXIT_FAILURE)
            }
            None => {
                log!("error: testguest.exit=acpi without ACPI tables");
                cpu::exit(EXIT_FAILURE)
            }
        },
        Action::Report => cpu::exit(verdict),
        Action::Exit(code) => cpu::exit(code),
        Action::Reset => {
            log!("action: reset");
            cpu::request_reset();
            log!("error: the i8042 reset did not happen");
            cpu::exit(EXIT_FAILURE)
        }
        Action::Hang => {
            log!("action: hang");
            cpu::halt_forever()
        }
        Action::TripleFault => {
            log!("action: triple fault");
            cpu::triple_fault()
        }
    }
}

/// Reads and reports the ACPI tables at `rsdp` (0: none); whether they
/// were sound.
fn read_acpi(rsdp: u64) -> (Option<acpi::Tables>, bool) {
    if rsdp == 0 {
        log!("acpi: no RSDP");
        return (None, true);
    }
    match acpi::read(rsdp) {
        Ok(t) => {
            let mut sigs = [0u8; 5 * 8];
            let mut n = 0;
            for s in t.listed() {
                sigs[n..n + 4].copy_from_slice(s);
                sigs[n + 4] = b' ';
                n += 5;
            }
            let sigs = core::str::from_utf8(&sigs[..n.saturating_sub(1)]).unwrap_or("?");
            log!(
                "acpi: RSDP 0x{rsdp:x} revision {}, XSDT: {sigs}",
                t.revision
            );
            log!("acpi: MADT: {} cpus, I/O APIC 0x{:x}", t.cpus, t.ioapic);
            log!(
                "acpi: DSDT: {} virtio-mmio devices, COM1 {}, S5 {}",
                t.devices.windows().len(),
                if t.com1 { "yes" } else { "no" },
                t.s5.map_or(-1, i32::from)
            );
            for w in t.devices.windows() {
                log!(
                    "acpi:   LNRO0005 0x{:x} size 0x{:x} irq {}",
                    w.base,
                    w.size,
                    w.irq
                );
            }
            (Some(t), true)
        }
        Err(e) => {
            log!("acpi: FAIL {e}");
            (None, false)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    fail(format_args!("panic: {info}"))
}
