//! minivmm's guest physical frames.
//!
//! minivmm owns guest physical memory frame by frame: a buddy [`FrameAllocator`]
//! over RAM ranges with holes, 64 bytes of [`FrameMeta`] per 4 KiB frame
//! (flags, buddy order, free-list links; per-section pin counts), DMA pins
//! through the [`FrameTable`], and a [`DirtyLog`] of frames devices wrote.
//! Metadata is committed on use: all zero is the default state, and building
//! the allocator writes nothing.
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
pub mod dirty;
pub mod meta;
pub mod table;

#[cfg(feature = "std")]
pub mod guest;
#[cfg(feature = "std")]
pub mod io;
#[cfg(feature = "std")]
pub mod layout;
#[cfg(feature = "std")]
pub mod packet;
#[cfg(test)]
mod test_util;
#[cfg(feature = "std")]
pub mod zeroed;

pub use addr::{FrameNumber, FrameRange, PAGE_SHIFT, PAGE_SIZE, PhysAddr};
pub use buddy::{FrameAllocator, Stats};
pub use dirty::{BitRuns, DirtyLog, bit_runs};
pub use meta::{FrameFlags, FrameMeta};
pub use table::{Block, FrameMap, FrameTable, HeldSection, MAX_ORDER, MAX_RANGES};

#[cfg(feature = "std")]
pub use guest::{E820Entry, E820Kind, GuestFrames, PinGuard, PinSet, Purpose};
