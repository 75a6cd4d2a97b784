//! Device interrupts: the I/O APIC routes a device's pin to a vector, the
//! local APIC delivers it, and [`wait_until`] sleeps in `sti; hlt` until a
//! condition holds or a watchdog fires.
//!
//! - The legacy 8259 PICs are masked: an in-kernel PIC (QEMU's, Firecracker's;
//!   minivmm has none) would otherwise deliver the same pins through LINT0 with
//!   its reset vector base 0, i.e. as CPU exceptions.
//! - The local APIC must be in xAPIC mode at 0xfee0_0000 (what KVM and QEMU set
//!   up); it is software-enabled with spurious vector 0xff and TPR 0.
//! - Each I/O APIC pin a device uses ([`route`]) gets its own vector from
//!   0x30 on: edge-triggered, active high, fixed delivery to this CPU. minivmm
//!   signals virtio interrupts through an irqfd, which KVM delivers as an edge
//!   (a pulse), the way Firecracker's devices do.
//! - The handlers are assembly stubs: count the vector, write the local APIC's
//!   EOI register, `iretq`. Everything else (reading the device's interrupt
//!   status, acknowledging it) happens in normal code after the wake-up.
//! - The watchdog is the local APIC timer, one-shot, divide by 128. Its input
//!   clock is the APIC bus: 1 GHz under KVM and QEMU, so one tick is 128 ns;
//!   elsewhere the timeout scales with the bus frequency.
//!
//! The guest runs with interrupts disabled everywhere else; `sti; hlt` enables
//! them for exactly one halt (the `sti` shadow covers the `hlt`, so an interrupt
//! that became pending before the halt still wakes it). No `int n` is used
//! (../shared/HOST-KVM.md: the nested KVM of the project's machines cannot run it
//! in guest kernel mode).

use core::arch::{asm, global_asm};
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu;
use crate::idt;

/// Local APIC registers (xAPIC MMIO).
const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_CURRENT: u64 = 0x390;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
const SVR_ENABLE: u32 = 1 << 8;
/// Divide configuration 0b1010: divide by 128.
const DIVIDE_BY_128: u32 = 0b1010;
/// Timer ticks per millisecond with a 1 GHz APIC bus divided by 128.
const TICKS_PER_MS: u64 = 1_000_000 / 128;
const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// I/O APIC registers.
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_REGSEL: u64 = 0x00;
const IOAPIC_WINDOW: u64 = 0x10;
const IOAPIC_VERSION: u32 = 0x01;
const IOAPIC_REDIRECTION: u32 = 0x10;
/// Redirection entry bit: masked.
const REDIRECTION_MASKED: u32 = 1 << 16;

/// Legacy PIC data ports (interrupt mask registers).
const PIC_MASTER_DATA: u16 = 0x21;
const PIC_SLAVE_DATA: u16 = 0xa1;

/// First vector for device pins; [`MAX_LINES`] consecutive vectors follow.
const DEVICE_VECTOR_BASE: u8 = 0x30;
/// Device interrupt lines (distinct pins) the guest can route.
pub const MAX_LINES: usize = 16;
/// The watchdog's vector, right after the device vectors.
const TIMER_VECTOR: u8 = DEVICE_VECTOR_BASE + MAX_LINES as u8;
const SPURIOUS_VECTOR: u8 = 0xff;
/// Counter slots: the device lines, then the timer.
const SLOTS: usize = MAX_LINES + 1;
const TIMER_SLOT: usize = MAX_LINES;

/// Interrupts taken per slot, incremented by the stubs.
static COUNTS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

global_asm!(
    r#"
    .section .text.irq, "ax"
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16
irq_stub_\n:
    push rax
    inc qword ptr [rip + {counts} + 8 * \n]
    mov eax, 0xfee000b0     /* local APIC EOI */
    mov dword ptr [rax], 0
    pop rax
    iretq
    .endr

irq_spurious_stub:          /* no EOI for the spurious vector */
    iretq

    .section .rodata.irq, "a"
    .balign 8
irq_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16
    .quad irq_stub_\n
    .endr
irq_spurious:
    .quad irq_spurious_stub
    "#,
    counts = sym COUNTS,
);

unsafe extern "C" {
    /// Addresses of the counting stubs, one per slot.
    static irq_stubs: [u64; SLOTS];
    /// Address of the spurious-vector stub.
    static irq_spurious: u64;
}

/// Why interrupts cannot be set up or routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// CPUID reports no local APIC.
    NoLocalApic,
    /// The local APIC is disabled, in x2APIC mode or not at 0xfee0_0000.
    ApicBase(u64),
    /// The pin is beyond the I/O APIC's redirection entries.
    NoSuchPin {
        /// The pin asked for.
        pin: u32,
        /// Pins the I/O APIC has.
        pins: u32,
    },
    /// More distinct pins than [`MAX_LINES`].
    TooManyLines,
}

impl fmt::Display for IrqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IrqError::NoLocalApic => write!(f, "CPUID reports no local APIC"),
            IrqError::ApicBase(v) => write!(
                f,
                "IA32_APIC_BASE is 0x{v:x}: the local APIC is not enabled in xAPIC mode at 0x{LAPIC_BASE:x}"
            ),
            IrqError::NoSuchPin { pin, pins } => {
                write!(f, "irq {pin}: the I/O APIC has pins 0..{pins}")
            }
            IrqError::TooManyLines => write!(f, "more than {MAX_LINES} interrupt lines"),
        }
    }
}

/// A routed device pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line {
    slot: usize,
}

impl Line {
    /// Interrupts taken on this line so far.
    pub fn count(&self) -> u64 {
        COUNTS[self.slot].load(Ordering::Relaxed)
    }
}

/// The interrupt controllers as set up by [`init`].
#[derive(Debug)]
pub struct Controllers {
    apic_id: u32,
    pins: u32,
    routed: [Option<u32>; MAX_LINES],
}

fn mmio_read(addr: u64) -> u32 {
    // SAFETY: `addr` is a register of the local or I/O APIC, identity mapped by
    // the boot page tables (below 4 GiB) and backed by no RAM; a 32-bit read
    // has no effect on memory Rust knows of.
    unsafe { (addr as *const u32).read_volatile() }
}

fn mmio_write(addr: u64, value: u32) {
    // SAFETY: as for `mmio_read`: a 32-bit register write of the local or I/O
    // APIC, outside RAM.
    unsafe { (addr as *mut u32).write_volatile(value) }
}

fn ioapic_read(index: u32) -> u32 {
    mmio_write(IOAPIC_BASE + IOAPIC_REGSEL, index);
    mmio_read(IOAPIC_BASE + IOAPIC_WINDOW)
}

fn ioapic_write(index: u32, value: u32) {
    mmio_write(IOAPIC_BASE + IOAPIC_REGSEL, index);
    mmio_write(IOAPIC_BASE + IOAPIC_WINDOW, value);
}

/// Masks the PICs, enables the local APIC and installs the interrupt stubs.
/// Interrupts stay disabled.
pub fn init() -> Result<Controllers, IrqError> {
    let (_, _, _, edx) = cpu::cpuid(1, 0);
    if edx & (1 << 9) == 0 {
        return Err(IrqError::NoLocalApic);
    }
    let base = cpu::rdmsr(IA32_APIC_BASE);
    if base & APIC_BASE_ENABLE == 0
        || base & APIC_BASE_X2APIC != 0
        || base & APIC_BASE_ADDR_MASK != LAPIC_BASE
    {
        return Err(IrqError::ApicBase(base));
    }
    cpu::outb(PIC_MASTER_DATA, 0xff);
    cpu::outb(PIC_SLAVE_DATA, 0xff);
    // SAFETY: initialised read-only tables of stub addresses in the image.
    let (stubs, spurious) = unsafe { (&irq_stubs, irq_spurious) };
    for (slot, &stub) in stubs.iter().enumerate() {
        idt::set_gate(DEVICE_VECTOR_BASE + slot as u8, stub);
    }
    idt::set_gate(SPURIOUS_VECTOR, spurious);
    mmio_write(LAPIC_BASE + LAPIC_TPR, 0);
    mmio_write(
        LAPIC_BASE + LAPIC_SVR,
        SVR_ENABLE | u32::from(SPURIOUS_VECTOR),
    );
    mmio_write(LAPIC_BASE + LAPIC_TIMER_DIVIDE, DIVIDE_BY_128);
    mmio_write(LAPIC_BASE + LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
    mmio_write(LAPIC_BASE + LAPIC_TIMER_INITIAL, 0);
    let pins = ((ioapic_read(IOAPIC_VERSION) >> 16) & 0xff) + 1;
    Ok(Controllers {
        apic_id: mmio_read(LAPIC_BASE + LAPIC_ID) >> 24,
        pins,
        routed: [None; MAX_LINES],
    })
}

impl Controllers {
    /// Routes I/O APIC `pin` to a vector of its own (or returns the line it
    /// already has): edge-triggered, active high, to this CPU.
    pub fn route(&mut self, pin: u32) -> Result<Line, IrqError> {
        if pin >= self.pins {
            return Err(IrqError::NoSuchPin {
                pin,
                pins: self.pins,
            });
        }
        if let Some(slot) = self.routed.iter().position(|&p| p == Some(pin)) {
            return Ok(Line { slot });
        }
        let slot = self
            .routed
            .iter()
            .position(Option::is_none)
            .ok_or(IrqError::TooManyLines)?;
        let vector = u32::from(DEVICE_VECTOR_BASE) + slot as u32;
        let entry = IOAPIC_REDIRECTION + 2 * pin;
        // Destination first, while the entry is still masked.
        ioapic_write(entry, REDIRECTION_MASKED);
        ioapic_write(entry + 1, self.apic_id << 24);
        ioapic_write(entry, vector);
        self.routed[slot] = Some(pin);
        Ok(Line { slot })
    }

    /// Masks every routed pin again (before the guest ends or resets devices).
    pub fn mask_all(&mut self) {
        for pin in self.routed.iter_mut().filter_map(Option::take) {
            ioapic_write(IOAPIC_REDIRECTION + 2 * pin, REDIRECTION_MASKED);
        }
    }
}

/// The watchdog fired before the condition held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut;

/// Halts with interrupts enabled until `done()` holds, checking it after every
/// interrupt; gives up when the watchdog has run `timeout_ms` (at a 1 GHz APIC
/// bus). `done` runs with interrupts disabled.
pub fn wait_until(timeout_ms: u64, mut done: impl FnMut() -> bool) -> Result<(), TimedOut> {
    if done() {
        return Ok(());
    }
    let mut fired = COUNTS[TIMER_SLOT].load(Ordering::Relaxed);
    let ticks = (timeout_ms.saturating_mul(TICKS_PER_MS)).clamp(1, u64::from(u32::MAX));
    mmio_write(LAPIC_BASE + LAPIC_TIMER_INITIAL, ticks as u32);
    let result = loop {
        if done() {
            break Ok(());
        }
        let now = COUNTS[TIMER_SLOT].load(Ordering::Relaxed);
        if now != fired {
            // Only this wait's timer, run down to 0, is its timeout: a
            // timer interrupt still pending from an earlier wait (one that
            // ended just as its timer expired, or a snapshot restored
            // there) is not.
            if mmio_read(LAPIC_BASE + LAPIC_TIMER_CURRENT) == 0 {
                break Err(TimedOut);
            }
            fired = now;
        }
        // SAFETY: enables interrupts for one `hlt` (the sti shadow makes the
        // pair atomic) and disables them again; the handlers save what they
        // use and return with `iretq`. The memory clobber makes the
        // condition's loads happen again after the wake-up.
        unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    };
    mmio_write(LAPIC_BASE + LAPIC_TIMER_INITIAL, 0);
    result
}
