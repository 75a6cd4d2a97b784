//! CPU primitives: port I/O, control registers, and the ways the guest ends.
//!
//! The guest ends through the debug-exit port 0xf4 (one byte: 0 success, 1
//! failure, or what `testguest.action=exit:<n>` asks for), an i8042 reset
//! (0xfe to port 0x64) or a deliberate triple fault. None of these uses `int`,
//! `int3` or `ud2`, which the nested KVM of the development machines cannot run.

use core::arch::asm;

/// Debug-exit port: minivmm exits with status 0 for byte 0 and 32 + v for v >= 1;
/// QEMU's `isa-debug-exit,iobase=0xf4` exits with `(v << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 command port; command 0xfe pulses the CPU reset line.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Writes `value` to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the guest only writes ports of devices without DMA (COM1, the
    // debug-exit port, the i8042); a port write touches no memory Rust knows of.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Reads I/O port `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`: a port read touches no memory Rust knows of.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Executes CPUID for `leaf`/`subleaf`: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx);
    // SAFETY: CPUID only reads processor identification into registers; rbx,
    // which LLVM reserves, is saved and restored around it.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        );
    }
    (eax, ebx, ecx, edx)
}

/// Stops the CPU for good: interrupts off, `hlt` in a loop.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this (only) CPU; no memory is touched.
        unsafe {
            asm!("cli", "hlt", options(nomem, nostack));
        }
    }
}

/// Ends the guest through the debug-exit port with `code`; halts if no device
/// answers there.
pub fn exit(code: u8) -> ! {
    outb(DEBUG_EXIT_PORT, code);
    halt_forever()
}

/// Asks the i8042 to reset the machine. Returns if nothing happened.
pub fn request_reset() {
    outb(I8042_COMMAND_PORT, I8042_RESET);
    // Give a VMM that handles the request asynchronously a moment.
    for _ in 0..10_000 {
        core::hint::spin_loop();
    }
}

/// Triple-faults the CPU: loads an empty IDT and touches a non-canonical
/// address. The #GP cannot be delivered, nor the #DF that follows, so the CPU
/// shuts down (KVM_EXIT_SHUTDOWN; QEMU with `-no-reboot` exits).
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct DescriptorPointer {
        limit: u16,
        base: u64,
    }
    let empty = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately ends the machine; `lidt` reads the 10-byte pointer
    // on the stack, and the non-canonical load faults before reading anything.
    unsafe {
        asm!(
            "lidt [{ptr}]",
            "mov rax, [{bad}]",
            ptr = in(reg) &raw const empty,
            bad = in(reg) 0x8000_0000_0000_0000u64,
            out("rax") _,
            options(nostack),
        );
    }
    halt_forever()
}

/// Reloads CR3 with its current value, flushing non-global TLB entries.
pub fn flush_tlb() {
    // SAFETY: writing back the same page-table root changes no mapping; the
    // memory clobber orders it after the page-table writes that preceded it.
    unsafe {
        asm!("mov {tmp}, cr3", "mov cr3, {tmp}", tmp = out(reg) _, options(nostack, preserves_flags));
    }
}

/// Reads model-specific register `msr`.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: the guest reads only architectural MSRs that exist on every
    // x86-64 CPU with a local APIC (IA32_APIC_BASE); reading one has no effect
    // on memory.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags));
    }
    (u64::from(high) << 32) | u64::from(low)
}
