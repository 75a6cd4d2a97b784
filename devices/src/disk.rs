//! Disk backends for virtio-blk: a small [`DiskBackend`] trait and [`RawFile`],
//! a raw image file. Data moves straight between the file and guest memory
//! (`GuestFrames::read_file_at` / `write_file_at`: preadv/pwritev on guest
//! memory, no bounce buffer).
//!
//! `RawFile::open` refuses anything but a regular file before opening it for
//! I/O (a FIFO would block, a device node run its open side effects: see
//! `crate::file`), then takes an advisory lock (`flock`: exclusive for a writable
//! disk, shared for a read-only one) without waiting, so two VMs cannot write
//! one image. An image must be a non-empty regular file; a size that is not a
//! multiple of 512 bytes is refused (the device speaks whole sectors).

use std::fs::{File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use memory::GuestFrames;

use crate::file::{OpenError, open_regular};
use vm_memory::GuestAddress;
use vmm_sys_util::fallocate::{FallocateMode, fallocate};

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;

/// Why a disk image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened, or is not a regular file (a directory, a
    /// FIFO, a device: refused before it is opened for I/O).
    #[error("Cannot use {} as a disk image", .0.display())]
    Open(PathBuf, #[source] OpenError),
    /// An empty file.
    #[error("{} is empty", .0.display())]
    Empty(PathBuf),
    /// A size that is not whole sectors.
    #[error("{} is {size} bytes, not a multiple of 512", .0.display(), size = .1)]
    PartialSector(PathBuf, u64),
    /// Another process holds the image's lock.
    #[error("{} is locked by another process (another minivmm?)", .0.display())]
    Locked(PathBuf),
    /// Locking failed for another reason.
    #[error("Cannot lock {}", .0.display())]
    Lock(PathBuf, #[source] io::Error),
}

/// Where a block device's data lives.
pub trait DiskBackend: Send + std::fmt::Debug {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Reads from `offset` into the guest memory `segments`; returns bytes read.
    fn read_at(
        &self,
        frames: &GuestFrames,
        offset: u64,
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize>;
    /// Writes the guest memory `segments` at `offset`; returns bytes written.
    fn write_at(
        &self,
        frames: &GuestFrames,
        offset: u64,
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize>;
    /// Makes written data durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset` (they read back as zeros).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Writes `len` zero bytes at `offset`.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A raw disk image file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens and locks the image at `path`.
    pub fn open(path: &Path, read_only: bool) -> Result<RawFile, DiskError> {
        let file = open_regular(path, !read_only).map_err(|e| DiskError::Open(path.into(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| DiskError::Open(path.into(), OpenError::Io(e)))?;
        let size = meta.len();
        if size == 0 {
            return Err(DiskError::Empty(path.into()));
        }
        if size % SECTOR_SIZE != 0 {
            return Err(DiskError::PartialSector(path.into(), size));
        }
        let locked = if read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(DiskError::Locked(path.into())),
            Err(TryLockError::Error(e)) => return Err(DiskError::Lock(path.into(), e)),
        }
        Ok(RawFile { file, size })
    }
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(
        &self,
        frames: &GuestFrames,
        offset: u64,
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        frames.read_file_at(&self.file, offset, segments)
    }

    fn write_at(
        &self,
        frames: &GuestFrames,
        offset: u64,
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        frames.write_file_at(&self.file, offset, segments)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, FallocateMode::PunchHole, true, offset, len)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.file, FallocateMode::ZeroRange, true, offset, len) {
            Ok(()) => Ok(()),
            // Filesystems without ZERO_RANGE: write zeros in bounded chunks.
            Err(_) => {
                static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZEROS.len() as u64) as usize;
                    std::os::unix::fs::FileExt::write_all_at(
                        &self.file,
                        &ZEROS[..n],
                        offset + done,
                    )?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("devices-disk-{}-{name}", std::process::id()))
    }

    #[test]
    fn raw_file_open_rejects_missing_directory_empty_and_partial_files() {
        let missing = temp_path("missing");
        assert!(matches!(
            RawFile::open(&missing, false),
            Err(DiskError::Open(..))
        ));
        let dir = temp_path("dir");
        std::fs::create_dir_all(&dir).unwrap();
        for read_only in [false, true] {
            assert!(matches!(
                RawFile::open(&dir, read_only),
                Err(DiskError::Open(_, OpenError::NotRegular("a directory")))
            ));
        }
        assert!(matches!(
            RawFile::open(Path::new("/dev/zero"), true),
            Err(DiskError::Open(
                _,
                OpenError::NotRegular("a character device")
            ))
        ));
        let empty = temp_path("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            RawFile::open(&empty, false),
            Err(DiskError::Empty(_))
        ));
        let partial = temp_path("partial");
        std::fs::write(&partial, [0u8; 700]).unwrap();
        assert!(matches!(
            RawFile::open(&partial, true),
            Err(DiskError::PartialSector(_, 700))
        ));
        for p in [&empty, &partial] {
            std::fs::remove_file(p).unwrap();
        }
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn raw_file_lock_is_exclusive_for_writers_and_shared_for_readers() {
        let path = temp_path("lock");
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let writer = RawFile::open(&path, false).unwrap();
        assert!(matches!(
            RawFile::open(&path, false),
            Err(DiskError::Locked(_))
        ));
        assert!(matches!(
            RawFile::open(&path, true),
            Err(DiskError::Locked(_))
        ));
        drop(writer);
        let r1 = RawFile::open(&path, true).unwrap();
        let _r2 = RawFile::open(&path, true).unwrap();
        assert!(matches!(
            RawFile::open(&path, false),
            Err(DiskError::Locked(_))
        ));
        assert_eq!(r1.size(), 1024);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn raw_file_discard_and_write_zeroes_read_back_as_zeros() {
        let path = temp_path("zeroes");
        std::fs::write(&path, [0xffu8; 16384]).unwrap();
        let disk = RawFile::open(&path, false).unwrap();
        disk.discard(4096, 4096).unwrap();
        disk.write_zeroes(10000, 100).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0xff));
        assert!(data[4096..8192].iter().all(|&b| b == 0));
        assert!(data[8192..10000].iter().all(|&b| b == 0xff));
        assert!(data[10000..10100].iter().all(|&b| b == 0));
        assert!(data[10100..].iter().all(|&b| b == 0xff));
        assert_eq!(data.len(), 16384, "size kept");
        std::fs::remove_file(&path).unwrap();
    }
}
