//! The VMM's one interrupt type: an irqfd, an eventfd KVM turns into an edge
//! on a GSI without an exit to userspace. It raises COM1's line (vm-superio's
//! `Trigger`) and every virtio device's (the transport's `Interrupt`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::virtio::Interrupt;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::vm::{self, Vm};

/// An interrupt line: an eventfd registered as KVM irqfd on a GSI.
#[derive(Debug)]
pub struct IrqFd {
    event: EventFd,
    failed: AtomicBool,
}

impl IrqFd {
    /// An irqfd on `gsi` of `vm`.
    pub fn new(vm: &Vm, gsi: u32) -> Result<Self, vm::Error> {
        let irq = Self::unregistered().map_err(vm::Error::EventFd)?;
        vm.fd()
            .register_irqfd(&irq.event, gsi)
            .map_err(|e| vm::Error::Kvm("IRQFD", e))?;
        Ok(irq)
    }

    /// An eventfd not (yet) registered with KVM: what tests count on.
    pub fn unregistered() -> io::Result<Self> {
        Ok(IrqFd {
            event: EventFd::new(EFD_NONBLOCK)?,
            failed: AtomicBool::new(false),
        })
    }

    /// The eventfd.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Raises the line.
    pub fn raise(&self) -> io::Result<()> {
        self.event.write(1)
    }
}

impl vm_superio::Trigger for IrqFd {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.raise()
    }
}

impl Interrupt for IrqFd {
    fn trigger(&self) {
        // Fails only if the counter saturates; the guest still sees the
        // interrupt status on its next read.
        if let Err(e) = self.raise()
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            log::warn!("cannot signal an interrupt: {e} (logged once)");
        }
    }
}
