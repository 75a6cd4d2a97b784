//! Packet I/O straight between a file descriptor and guest RAM: one `readv`
//! or one `writev` per packet, as a TAP device needs (each read returns one
//! frame, each write sends one). The only `unsafe` of the network data path
//! lives here, next to the mappings, like the disk path's in `io`.
//!
//! A packet's guest segments must each lie inside one mapped region (a
//! device validates and pins its buffers first); one that does not, or more
//! than [`PACKET_IOVS`] of them, is an `InvalidInput` error before any I/O.
//! Host bytes go with the guest ones: a validated copy of a header in front of
//! a written packet, a spill buffer behind a read one. Frames a read wrote are
//! marked dirty.

use std::format;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::GuestAddress;

use crate::guest::GuestFrames;

/// Most guest segments of one packet (the kernel takes 1024 iovecs per call,
/// one of which is the host buffer).
pub const PACKET_IOVS: usize = 1023;

impl GuestFrames {
    /// Reads one packet from `fd` into the guest memory `segments`, in order,
    /// then into `spill` (host memory) for what does not fit. Returns the
    /// packet's bytes; the guest frames written are marked dirty. A
    /// non-blocking descriptor with nothing to read gives `WouldBlock`.
    pub fn read_packet(
        &self,
        fd: BorrowedFd<'_>,
        segments: &[(GuestAddress, usize)],
        spill: &mut [u8],
    ) -> io::Result<usize> {
        let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; PACKET_IOVS + 1];
        let mut count = self.guest_iovecs(segments, &mut iovs)?;
        if !spill.is_empty() {
            iovs[count].write(libc::iovec {
                iov_base: spill.as_mut_ptr().cast(),
                iov_len: spill.len(),
            });
            count += 1;
        }
        // SAFETY: the first `count` iovecs are initialised: guest segments
        // inside live mappings owned by `self` (checked by `guest_iovecs`;
        // regions are unmapped only when `self` drops, which the borrow
        // prevents) and `spill`, borrowed mutably for the call. The kernel
        // writes at most `iov_len` bytes to each.
        let n =
            retry(|| unsafe { libc::readv(fd.as_raw_fd(), iovs.as_ptr().cast(), count as i32) })?;
        let mut left = n;
        for &(addr, len) in segments {
            let written = len.min(left);
            if written > 0 {
                // Mapped RAM a moment ago: marking cannot fail.
                let _ = self.mark_dirty(addr, written as u64);
            }
            left -= written;
        }
        Ok(n)
    }

    /// Writes one packet to `fd`: `head` (host bytes: a validated copy of a
    /// header), then the guest memory `segments`, in one `writev`. Returns
    /// the bytes written.
    pub fn write_packet(
        &self,
        fd: BorrowedFd<'_>,
        head: &[u8],
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; PACKET_IOVS + 1];
        let mut count = 0;
        if !head.is_empty() {
            iovs[0].write(libc::iovec {
                iov_base: head.as_ptr().cast_mut().cast(),
                iov_len: head.len(),
            });
            count = 1;
        }
        count += self.guest_iovecs(segments, &mut iovs[count..])?;
        // SAFETY: the first `count` iovecs are initialised: `head`, borrowed
        // for the call (the kernel only reads it despite the `*mut`), and
        // guest segments inside live mappings owned by `self` (checked by
        // `guest_iovecs`). The kernel reads at most `iov_len` bytes of each.
        retry(|| unsafe { libc::writev(fd.as_raw_fd(), iovs.as_ptr().cast(), count as i32) })
    }

    /// Fills `out` from the front with the iovecs of the non-empty
    /// `segments`; all or nothing.
    fn guest_iovecs(
        &self,
        segments: &[(GuestAddress, usize)],
        out: &mut [MaybeUninit<libc::iovec>],
    ) -> io::Result<usize> {
        let mut count = 0;
        for &(addr, len) in segments.iter().filter(|s| s.1 > 0) {
            let slot = out
                .get_mut(count)
                .filter(|_| count < PACKET_IOVS)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("more than {PACKET_IOVS} segments in one packet"),
                    )
                })?;
            let iov = self.iovec(addr, len).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes at {:#x} are not mapped guest RAM", addr.0),
                )
            })?;
            slot.write(iov);
            count += 1;
        }
        Ok(count)
    }
}

/// Runs a system call returning a byte count until it is not interrupted.
fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let r = call();
        if r >= 0 {
            return Ok(r as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;
    use std::prelude::rust_2024::*;
    use std::vec;

    use vm_memory::Bytes;

    use super::*;
    use crate::guest::Backing;

    fn frames() -> GuestFrames {
        GuestFrames::new(16 << 20, Backing::Anonymous).unwrap()
    }

    /// A datagram socket pair: like a TAP, one read is one packet.
    fn pair() -> (UnixDatagram, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn read_packet_scatters_into_guest_segments_then_the_spill() {
        let frames = frames();
        let (ours, peer) = pair();
        let packet: Vec<u8> = (0..3000u32).map(|i| (i * 3) as u8).collect();
        peer.send(&packet).unwrap();
        frames.take_dirty();
        let segs = [
            (GuestAddress(0x10_0ff0), 1000),
            (GuestAddress(0x30_0000), 0),
        ];
        let mut spill = vec![0u8; 4096];
        let n = frames.read_packet(ours.as_fd(), &segs, &mut spill).unwrap();
        assert_eq!(n, 3000);
        let mut got = vec![0u8; 1000];
        frames
            .memory()
            .read_slice(&mut got, GuestAddress(0x10_0ff0))
            .unwrap();
        assert_eq!(got, packet[..1000]);
        assert_eq!(spill[..2000], packet[1000..]);
        assert_eq!(
            frames.take_dirty(),
            vec![(GuestAddress(0x10_0000), 2 * 4096)],
            "the guest bytes written, not the spill"
        );
        let err = frames
            .read_packet(ours.as_fd(), &segs, &mut spill)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "one packet per read");
    }

    #[test]
    fn write_packet_sends_the_head_then_guest_segments_as_one_packet() {
        let frames = frames();
        let (ours, peer) = pair();
        frames
            .memory()
            .write_slice(&[5; 100], GuestAddress(0x8000))
            .unwrap();
        frames
            .memory()
            .write_slice(&[6; 50], GuestAddress(0x20_0000))
            .unwrap();
        let segs = [(GuestAddress(0x8000), 100), (GuestAddress(0x20_0000), 50)];
        assert_eq!(
            frames.write_packet(ours.as_fd(), b"hdr", &segs).unwrap(),
            153
        );
        let mut buf = [0u8; 512];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(n, 153);
        assert_eq!(&buf[..3], b"hdr");
        assert_eq!(buf[3..103], [5; 100]);
        assert_eq!(buf[103..153], [6; 50]);
    }

    #[test]
    fn packet_io_rejects_bad_segments_before_any_io() {
        let frames = frames();
        let (ours, peer) = pair();
        let outside = [(GuestAddress(0x1000), 8), (GuestAddress(16 << 20), 8)];
        let err = frames
            .write_packet(ours.as_fd(), b"", &outside)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let too_many = vec![(GuestAddress(0x1000), 1); PACKET_IOVS + 1];
        let err = frames
            .write_packet(ours.as_fd(), b"", &too_many)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        peer.set_nonblocking(true).unwrap();
        assert!(peer.recv(&mut [0u8; 16]).is_err(), "nothing was sent");
        peer.send(b"x").unwrap();
        assert!(frames.read_packet(ours.as_fd(), &outside, &mut []).is_err());
        let mut spill = [0u8; 4];
        assert_eq!(
            frames.read_packet(ours.as_fd(), &[], &mut spill).unwrap(),
            1,
            "still queued"
        );
        let most = vec![(GuestAddress(0x1000), 1); PACKET_IOVS];
        assert_eq!(
            frames.write_packet(ours.as_fd(), b"h", &most).unwrap(),
            PACKET_IOVS + 1
        );
    }
}
