//! Helpers shared by the targets: input parsing, small guest memories, and
//! the checks on guest memory and pins.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of the virtqueue and block targets: small enough to snapshot and
/// compare on every run.
pub const GUEST_RAM: u64 = 256 << 10;

/// A cursor over fuzz input; reads past the end give zeros.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Fresh guest RAM of `size` bytes with `image` copied to its start.
pub fn guest(size: u64, image: &[u8]) -> GuestFrames {
    let frames = GuestFrames::new(size, Backing::Anonymous).expect("small guest RAM");
    let n = image.len().min(size as usize);
    frames
        .memory()
        .write_slice(&image[..n], GuestAddress(0))
        .expect("inside RAM");
    frames
}

/// All of guest RAM (one region: `size` is below the MMIO hole).
pub fn snapshot(frames: &GuestFrames, size: u64) -> Vec<u8> {
    let mut out = vec![0; size as usize];
    frames
        .memory()
        .read_slice(&mut out, GuestAddress(0))
        .expect("inside RAM");
    out
}

/// Asserts that every byte that differs between `before` and `after` lies in
/// one of `allowed` (`(start, len)` ranges).
pub fn assert_writes_within(before: &[u8], after: &[u8], allowed: &[(u64, u64)], what: &str) {
    const CHUNK: usize = 256;
    for (c, (b, a)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
        // Whole chunks compare as memcmp; only changed ones are walked.
        if b == a {
            continue;
        }
        for (i, (x, y)) in b.iter().zip(a).enumerate() {
            let at = (c * CHUNK + i) as u64;
            assert!(
                x == y || allowed.iter().any(|&(s, l)| at >= s && at - s < l),
                "{what}: byte {at:#x} changed ({x:#04x} -> {y:#04x}) outside the device-writable buffers and the used ring"
            );
        }
    }
}

/// DMA pins held on guest RAM (one per section a pinned range covers; the
/// harnesses' RAM is a single section, so one per pinned range).
pub fn pins(frames: &GuestFrames) -> u64 {
    frames.table().pins()
}

/// A file name unique to this process and call, in tmpfs when there is one.
pub fn temp_path(what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!(
        "minivmm-fuzz-{}-{}-{what}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Removes the file when dropped.
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
