//! The IDT: handlers for the CPU exceptions 0-31 that report and fail.
//!
//! Each vector has a small assembly stub that pushes a dummy error code where
//! the CPU pushes none (all vectors but 8, 10-14, 17, 21, 29, 30), then the
//! vector, and calls [`exception`] with vector, error code, RIP, CS and CR2. The
//! handler prints them and exits through the debug-exit port with failure; it
//! never returns. Vectors 32-255 are not present until [`set_gate`] installs a
//! handler (`irq.rs` does, for device interrupts); a stray interrupt on any
//! other vector raises #NP, which reports and fails like every exception.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

use crate::cpu;

/// Vectors with a CPU-pushed error code, as a bit mask.
const ERROR_CODE_VECTORS: u32 = 0x6022_7d00;
const _: () = assert!(
    ERROR_CODE_VECTORS
        == (1 << 8)
            | (1 << 10)
            | (1 << 11)
            | (1 << 12)
            | (1 << 13)
            | (1 << 14)
            | (1 << 17)
            | (1 << 21)
            | (1 << 29)
            | (1 << 30)
);

global_asm!(
    r#"
    .section .text.exceptions, "ax"
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exception_stub_\n:
    .if ((0x60227d00 >> \n) & 1) == 0
    push 0
    .endif
    push \n
    jmp exception_common
    .endr

exception_common:
    mov rdi, [rsp]          /* vector */
    mov rsi, [rsp + 8]      /* error code */
    mov rdx, [rsp + 16]     /* rip */
    mov rcx, [rsp + 24]     /* cs */
    mov r8, cr2
    and rsp, -16
    call {handler}
1:  cli
    hlt
    jmp 1b

    .section .rodata.exceptions, "a"
    .balign 8
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\n
    .endr
    "#,
    handler = sym exception,
);

unsafe extern "C" {
    /// Addresses of the 32 exception stubs.
    static exception_stubs: [u64; 32];
}

/// One 64-bit IDT gate.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(core::mem::size_of::<Gate>() == 16);

/// Kernel code selector of the boot GDT.
const CODE_SELECTOR: u16 = 0x08;
/// Present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u8 = 0x8e;

impl Gate {
    fn interrupt(handler: u64) -> Self {
        Gate {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist: 0,
            type_attr: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// Gates in the table: every vector.
const VECTORS: usize = 256;

/// The table; written by [`init`] before `lidt` and by [`set_gate`] with
/// interrupts off, read by the CPU.
#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; VECTORS]>);

// SAFETY: one CPU; the table is written only by `init` (before the CPU uses
// it) and by `set_gate` with interrupts disabled, so no delivery reads a gate
// while it is being written (exceptions are not raised by those writes).
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new(
    [Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    }; VECTORS],
));

/// Fills the IDT with the exception stubs and loads it.
pub fn init() {
    // SAFETY: `exception_stubs` is an initialised read-only table in the image.
    let stubs = unsafe { &exception_stubs };
    // SAFETY: `init` runs once, early, on the only CPU, before `lidt`: nothing
    // else reads or writes the table meanwhile.
    let gates = unsafe { &mut *IDT.0.get() };
    for (gate, &stub) in gates.iter_mut().zip(stubs) {
        *gate = Gate::interrupt(stub);
    }
    #[repr(C, packed)]
    struct DescriptorPointer {
        limit: u16,
        base: u64,
    }
    let pointer = DescriptorPointer {
        limit: (core::mem::size_of::<[Gate; VECTORS]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the table holds 32 valid gates to stubs that never return and
    // not-present gates after them, and lives for the whole run (a static).
    unsafe {
        asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags));
    }
}

/// Installs `handler` (the address of an interrupt stub ending in `iretq`) as
/// the interrupt gate of `vector` (32..=255; exceptions keep their handlers).
/// Call with interrupts disabled.
pub fn set_gate(vector: u8, handler: u64) {
    if vector < 32 {
        return;
    }
    // SAFETY: one CPU with interrupts disabled (the caller's contract): no
    // delivery reads the gate while it is written, and no other reference to
    // the table exists (`init` is done).
    let gates = unsafe { &mut *IDT.0.get() };
    gates[usize::from(vector)] = Gate::interrupt(handler);
}

fn name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD error",
        "#VE virtualization",
        "#CP control protection",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV hypervisor injection",
        "#VC VMM communication",
        "#SX security",
        "reserved",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("unknown")
}

/// Reports an exception and exits with failure.
extern "C" fn exception(vector: u64, error: u64, rip: u64, cs: u64, cr2: u64) -> ! {
    crate::log!(
        "exception {vector} ({}) error=0x{error:x} rip=0x{rip:016x} cs=0x{cs:x} cr2=0x{cr2:016x}",
        name(vector)
    );
    crate::log!("selftest: FAIL");
    cpu::exit(1)
}
