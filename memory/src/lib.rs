//! minivmm's guest physical frames.
//!
//! minivmm owns guest physical memory frame by frame: a buddy [`FrameAllocator`]
//! over RAM ranges with holes, 64 bytes of [`FrameMeta`] per 4 KiB frame
//! (reference count, flags, buddy order, free-list links), DMA pins and dirty
//! marking through the [`FrameTable`].
//!
//! The core is `no_std` + `alloc`-free so the test guest kernel links the same
//! allocator (`default-features = false`). With the default `std` feature the
//! host side adds [`GuestFrames`]: guest RAM as vm-memory regions laid out around
//! the MMIO hole, boot-structure placement by allocation, the e820 map derived
//! from the metadata, and owned [`PinGuard`]s for devices.

#![no_std]

#[cfg(any(feature = "std", test))]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod addr;
pub mod buddy;
pub mod meta;
pub mod table;

#[cfg(feature = "std")]
pub mod guest;
#[cfg(feature = "std")]
pub mod io;
#[cfg(feature = "std")]
pub mod layout;
#[cfg(test)]
mod test_util;

pub use addr::{FrameNumber, FrameRange, PAGE_SHIFT, PAGE_SIZE, PhysAddr};
pub use buddy::{FrameAllocator, Stats};
pub use meta::{FrameFlags, FrameMeta};
pub use table::{Block, FrameMap, FrameTable, MAX_ORDER, MAX_RANGES};

#[cfg(feature = "std")]
pub use guest::{E820Entry, E820Kind, GuestFrames, PinGuard, PinSet, Purpose};
