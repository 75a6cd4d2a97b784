//! Host side: zeroed memory that costs nothing until it is written.
//!
//! The frame metadata and the dirty log of a guest are sized by its RAM (1/64
//! and 1/32768 of it) but mostly never written. [`ZeroedSlice`] keeps them in an
//! anonymous private mapping with `MAP_NORESERVE`: the kernel hands out zero
//! pages on demand, commits a page only when it is written, and reserves no swap
//! for the rest, so a 1 TiB guest's 16 GiB of metadata is only address space.
//! (The global allocator would not do: Rust's `alloc_zeroed` for 64-byte
//! aligned types writes every byte.)
//!
//! [`ZeroedSlice::resident_bytes`] asks the kernel (`mincore`) how much of the
//! mapping is populated, which is how the tests measure what the VMM's own
//! state costs.

use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::vec;

use crate::addr::PAGE_SIZE;
use crate::meta::FrameMeta;

/// Types for which all-zero bytes are a valid value, and which may be shared
/// between threads.
///
/// # Safety
/// Implementors must be valid when every byte is zero, have no drop glue that
/// matters, and be `Sync`.
pub unsafe trait Zeroable: Sync + Send {}

// SAFETY: FrameMeta is repr(C) atomics and atomic arrays; all zero is its
// `FrameMeta::new()` value. Atomics are Sync and Send.
unsafe impl Zeroable for FrameMeta {}
// SAFETY: an AtomicU64 of zero bytes is 0; atomics are Sync and Send.
unsafe impl Zeroable for AtomicU64 {}

/// One anonymous mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    bytes: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the element types
// that reach it through `ZeroedSlice` are `Zeroable`, hence `Sync + Send`.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access goes through `&[T]` of Sync atomics only.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: `ptr`/`bytes` are exactly what mmap returned in `new`; no
            // slice borrowed from it outlives the last `ZeroedSlice` clone,
            // which owns this Arc'ed mapping.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
        }
    }
}

/// `len` zero values of `T` in memory committed on write; clones share it.
pub struct ZeroedSlice<T: Zeroable> {
    map: Arc<Mapping>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Zeroable> Clone for ZeroedSlice<T> {
    fn clone(&self) -> Self {
        ZeroedSlice {
            map: self.map.clone(),
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T: Zeroable> ZeroedSlice<T> {
    /// Maps `len` zeroed values (address space only until written).
    pub fn new(len: usize) -> io::Result<Self> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .and_then(|b| b.checked_next_multiple_of(PAGE_SIZE as usize))
            .ok_or_else(|| io::Error::other("zeroed mapping too large"))?;
        let ptr = if bytes == 0 {
            NonNull::<T>::dangling().cast()
        } else {
            // SAFETY: a fresh anonymous private mapping at an address the kernel
            // chooses; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            NonNull::new(p.cast()).expect("mmap does not return NULL on success")
        };
        Ok(ZeroedSlice {
            map: Arc::new(Mapping { ptr, bytes }),
            len,
            _t: PhantomData,
        })
    }

    /// Bytes of the mapping the kernel has populated (written, or read and
    /// mapped to the zero page), page-granular.
    pub fn resident_bytes(&self) -> io::Result<u64> {
        let pages = self.map.bytes / PAGE_SIZE as usize;
        if pages == 0 {
            return Ok(0);
        }
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is exactly our live mapping, and `vec` holds one
        // byte per page of it, as mincore requires.
        let r = unsafe {
            libc::mincore(
                self.map.ptr.as_ptr().cast(),
                self.map.bytes,
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE)
    }
}

impl<T: Zeroable> AsRef<[T]> for ZeroedSlice<T> {
    #[inline]
    fn as_ref(&self) -> &[T] {
        // SAFETY: the mapping holds at least `len * size_of::<T>()` bytes (or is
        // dangling with `len == 0`), page aligned hence aligned for T (whose
        // alignment is at most 64 here), zero-initialised by the kernel, and
        // valid for T when zero (`Zeroable`). It lives as long as `self`. Only
        // shared references are ever made, and T is Sync atomics.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Zeroable> std::fmt::Debug for ZeroedSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroedSlice")
            .field("len", &self.len)
            .field("bytes", &self.map.bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn zeroed_slice_is_zero_and_commits_only_written_pages() {
        // 1 GiB of address space.
        let s = ZeroedSlice::<AtomicU64>::new(1 << 27).unwrap();
        assert_eq!(s.resident_bytes().unwrap(), 0);
        let words = s.as_ref();
        assert_eq!(words[12345].load(Ordering::Relaxed), 0);
        words[0].store(1, Ordering::Relaxed);
        words[1 << 26].store(2, Ordering::Relaxed);
        // Two written pages, plus the one read (mapped to the zero page).
        assert!(s.resident_bytes().unwrap() <= 3 * PAGE_SIZE);
        let t = s.clone();
        assert_eq!(t.as_ref()[1 << 26].load(Ordering::Relaxed), 2);
    }

    #[test]
    fn zeroed_slice_of_nothing_is_empty() {
        let s = ZeroedSlice::<FrameMeta>::new(0).unwrap();
        assert!(s.as_ref().is_empty());
        assert_eq!(s.resident_bytes().unwrap(), 0);
    }
}
