//! File I/O straight between a host file and guest RAM: positioned, vectored
//! reads and writes (`preadv`/`pwritev`) on guest memory segments, with no
//! bounce buffer. Device models (virtio-blk) move request data with these, so
//! the only `unsafe` of the data path lives here, next to the mappings.
//!
//! Segments are `(GuestAddress, len)` pairs that must each lie inside one
//! mapped region (a device validates and pins its buffers first); a segment
//! that does not is an `InvalidInput` error before any I/O. Frames that a read
//! wrote are marked dirty.

use std::format;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::prelude::rust_2024::*;

use vm_memory::GuestAddress;

use crate::guest::GuestFrames;

/// iovecs per system call; longer segment lists take several calls.
const IOV_BATCH: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// File to guest memory.
    Read,
    /// Guest memory to file.
    Write,
}

impl GuestFrames {
    /// The iovec of `len` bytes of guest RAM at `addr`, if they lie in one
    /// mapped region. Its pointer is valid for as long as `self`.
    pub(crate) fn iovec(&self, addr: GuestAddress, len: usize) -> Option<libc::iovec> {
        let slice = self.slice(addr, len)?;
        // The guard only carries vm-memory's dirty bitmap, which GuestFrames'
        // regions do not have (they keep their own log); the pointer is valid
        // for as long as the region.
        let ptr = slice.ptr_guard_mut().as_ptr();
        Some(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        })
    }

    /// Reads from `file` at `offset` into the guest memory `segments`, in order,
    /// until they are full or the file ends. Returns the bytes read; the frames
    /// written are marked dirty.
    pub fn read_file_at(
        &self,
        file: &File,
        offset: u64,
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        let done = self.file_io(file, offset, segments, Direction::Read)?;
        let mut left = done;
        for &(addr, len) in segments {
            let n = len.min(left);
            if n > 0 {
                // The segment was mapped RAM a moment ago; marking cannot fail.
                let _ = self.mark_dirty(addr, n as u64);
            }
            left -= n;
        }
        Ok(done)
    }

    /// Writes the guest memory `segments`, in order, to `file` at `offset`.
    /// Returns the bytes written (all of them unless the file refused more).
    pub fn write_file_at(
        &self,
        file: &File,
        offset: u64,
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        self.file_io(file, offset, segments, Direction::Write)
    }

    fn file_io(
        &self,
        file: &File,
        offset: u64,
        segments: &[(GuestAddress, usize)],
        dir: Direction,
    ) -> io::Result<usize> {
        let invalid = |addr: GuestAddress, len: usize| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {:#x} are not mapped guest RAM", addr.0),
            )
        };
        // All or nothing: every segment is valid before any I/O. The first
        // batch is checked as its iovecs are built; longer lists up front.
        if segments.len() > IOV_BATCH {
            for &(addr, len) in segments {
                if len > 0 && self.slice(addr, len).is_none() {
                    return Err(invalid(addr, len));
                }
            }
        }
        let mut total = 0usize;
        let mut seg = 0;
        let mut skip = 0; // bytes of segments[seg] already done
        while seg < segments.len() {
            // Filled from the front; only the first `count` are passed on, so
            // nothing is initialised (or zeroed) that is not used.
            let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; IOV_BATCH];
            let mut count = 0;
            let mut i = seg;
            while i < segments.len() && count < IOV_BATCH {
                let (addr, len) = segments[i];
                let start = if i == seg { skip } else { 0 };
                if len > start {
                    let iov = self
                        .iovec(GuestAddress(addr.0 + start as u64), len - start)
                        .ok_or_else(|| invalid(addr, len))?;
                    iovs[count].write(iov);
                    count += 1;
                }
                i += 1;
            }
            if count == 0 {
                break;
            }
            let pos = offset
                .checked_add(total as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "file offset overflows")
                })?;
            let n = loop {
                // The first `count` iovecs were written above.
                let iov = iovs.as_ptr().cast::<libc::iovec>();
                // SAFETY: `iov` points at `count` initialised iovecs (MaybeUninit
                // has the layout of its value); each points at `iov_len` bytes of
                // a live mapping of guest RAM owned by `self` (checked by
                // `slice` above; regions are unmapped only when `self` drops,
                // which the borrow prevents). The kernel reads or writes only
                // those bytes. Guest memory may change under us, which is fine
                // for raw bytes.
                let r = unsafe {
                    match dir {
                        Direction::Read => libc::preadv(file.as_raw_fd(), iov, count as i32, pos),
                        Direction::Write => libc::pwritev(file.as_raw_fd(), iov, count as i32, pos),
                    }
                };
                if r >= 0 {
                    break r as usize;
                }
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            };
            total += n;
            if n == 0 {
                break; // end of file (read) or nothing accepted (write)
            }
            // Advance over what was transferred.
            let mut left = n;
            while left > 0 && seg < segments.len() {
                let rest = segments[seg].1 - skip;
                if left >= rest {
                    left -= rest;
                    seg += 1;
                    skip = 0;
                } else {
                    skip += left;
                    left = 0;
                }
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::prelude::rust_2024::*;
    use std::{format, vec};

    use vm_memory::Bytes;

    use super::*;
    use crate::guest::Backing;

    fn frames() -> GuestFrames {
        GuestFrames::new(16 << 20, Backing::Anonymous).unwrap()
    }

    fn temp_file(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "memory-io-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(bytes).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    #[test]
    fn read_file_at_scatters_into_segments_and_marks_them_dirty() {
        let frames = frames();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let file = temp_file(&data);
        frames.take_dirty();
        let segs = [
            (GuestAddress(0x10_0000), 100),
            (GuestAddress(0x20_0ffe), 5000),
            (GuestAddress(0x30_0000), 0),
        ];
        let n = frames.read_file_at(&file, 7, &segs).unwrap();
        assert_eq!(n, 5100);
        let mut a = vec![0; 100];
        frames
            .memory()
            .read_slice(&mut a, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(a, data[7..107]);
        let mut b = vec![0; 5000];
        frames
            .memory()
            .read_slice(&mut b, GuestAddress(0x20_0ffe))
            .unwrap();
        assert_eq!(b, data[107..5107]);
        let dirty = frames.take_dirty();
        assert_eq!(
            dirty,
            vec![
                (GuestAddress(0x10_0000), 4096),
                (GuestAddress(0x20_0000), 3 * 4096)
            ]
        );
    }

    #[test]
    fn read_file_at_stops_at_end_of_file() {
        let frames = frames();
        let file = temp_file(&[7; 300]);
        let n = frames
            .read_file_at(&file, 200, &[(GuestAddress(0x1000), 512)])
            .unwrap();
        assert_eq!(n, 100);
    }

    #[test]
    fn write_file_at_gathers_segments_in_order() {
        let frames = frames();
        frames
            .memory()
            .write_slice(&[1; 10], GuestAddress(0x5000))
            .unwrap();
        frames
            .memory()
            .write_slice(&[2; 20], GuestAddress(0x9000))
            .unwrap();
        let file = temp_file(&[]);
        let n = frames
            .write_file_at(
                &file,
                512,
                &[(GuestAddress(0x5000), 10), (GuestAddress(0x9000), 20)],
            )
            .unwrap();
        assert_eq!(n, 30);
        let mut out = vec![0u8; 542];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut out, 0).unwrap();
        assert_eq!(&out[512..522], &[1; 10]);
        assert_eq!(&out[522..], &[2; 20]);
    }

    #[test]
    fn file_io_rejects_segments_outside_ram_before_any_io() {
        let frames = frames();
        let file = temp_file(&[9; 4096]);
        let segs = [(GuestAddress(0x1000), 16), (GuestAddress(16 << 20), 16)];
        let err = frames.read_file_at(&file, 0, &segs).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let mut first = [0u8; 16];
        frames
            .memory()
            .read_slice(&mut first, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(first, [0; 16], "nothing was read");
        let wrap = [(GuestAddress(u64::MAX - 4), 16)];
        assert!(frames.write_file_at(&file, 0, &wrap).is_err());
    }

    #[test]
    fn file_io_handles_more_segments_than_one_batch() {
        let frames = frames();
        let data: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
        let file = temp_file(&data);
        let segs: Vec<_> = (0..200u64)
            .map(|i| (GuestAddress(0x40_0000 + i * 4096), 1))
            .collect();
        assert_eq!(frames.read_file_at(&file, 0, &segs).unwrap(), 200);
        for (i, &(addr, _)) in segs.iter().enumerate() {
            let b: u8 = frames.memory().read_obj(addr).unwrap();
            assert_eq!(b, data[i]);
        }
    }
}
