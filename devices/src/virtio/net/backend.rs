//! Where a virtio-net device's frames go: a small [`NetBackend`] trait. The
//! real backend is a TAP device, which the VMM opens (its ioctls are unsafe
//! code, kept beside the others in `vmm`); device logic is tested against
//! [`FakeBackend`], an in-memory one.
//!
//! Every frame crosses the backend with its 12-byte `virtio_net_hdr_v1` in
//! front (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` = 12), straight between the
//! descriptor and guest memory (`memory::packet`).

use std::io;
use std::os::fd::RawFd;

use memory::GuestFrames;
use vm_memory::GuestAddress;

/// A frame source and sink with a vnet header on every frame.
pub trait NetBackend: Send + std::fmt::Debug {
    /// Reads one waiting frame (header included) into the guest `segments`,
    /// then into `spill` for what does not fit; returns its length.
    /// `WouldBlock` when no frame is waiting.
    fn read_frame(
        &mut self,
        frames: &GuestFrames,
        segments: &[(GuestAddress, usize)],
        spill: &mut [u8],
    ) -> io::Result<usize>;
    /// Sends one frame: `header` (the device's validated copy), then the
    /// guest `segments`.
    fn write_frame(
        &mut self,
        frames: &GuestFrames,
        header: &[u8],
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize>;
    /// Tells the backend which offloads the guest accepts on received frames
    /// (`TUN_F_*` flags, as for `TUNSETOFFLOAD`).
    fn set_offloads(&mut self, flags: u32) -> io::Result<()>;
    /// Whether UDP fragmentation offload can be offered.
    fn supports_ufo(&self) -> bool;
    /// The descriptor that is readable while a frame is waiting.
    fn read_fd(&self) -> RawFd;
}

#[cfg(any(test, feature = "test-utils"))]
pub use fake::{FakeBackend, FakeState};

#[cfg(any(test, feature = "test-utils"))]
mod fake {
    use std::collections::VecDeque;
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;

    /// What the fake holds: frames waiting for the guest, frames it sent,
    /// the offloads set, and failures to inject.
    #[derive(Debug, Default)]
    pub struct FakeState {
        /// Frames (header included) the guest will receive, in order.
        pub to_guest: VecDeque<Vec<u8>>,
        /// Frames (header included) the guest sent.
        pub from_guest: Vec<Vec<u8>>,
        /// The last `set_offloads`.
        pub offloads: Option<u32>,
        /// Reads fail with this error kind while set.
        pub read_error: Option<io::ErrorKind>,
        /// Writes fail with this error kind while set.
        pub write_error: Option<io::ErrorKind>,
        /// `set_offloads` fails while set.
        pub refuse_offloads: bool,
    }

    /// An in-memory backend; tests keep a clone of its state.
    #[derive(Debug)]
    pub struct FakeBackend {
        state: Arc<Mutex<FakeState>>,
        ready: EventFd,
        ufo: bool,
    }

    impl FakeBackend {
        /// A fake, and its shared state.
        pub fn new(ufo: bool) -> (Self, Arc<Mutex<FakeState>>) {
            let state = Arc::new(Mutex::new(FakeState::default()));
            let ready = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            (
                FakeBackend {
                    state: state.clone(),
                    ready,
                    ufo,
                },
                state,
            )
        }

        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl NetBackend for FakeBackend {
        fn read_frame(
            &mut self,
            frames: &GuestFrames,
            segments: &[(GuestAddress, usize)],
            spill: &mut [u8],
        ) -> io::Result<usize> {
            let mut state = self.state();
            if let Some(kind) = state.read_error {
                return Err(io::Error::from(kind));
            }
            let frame = state
                .to_guest
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            // As readv: guest segments in order, then the spill; a frame
            // longer than all of them is cut (a TAP would fail the read).
            let mut at = 0;
            for &(addr, len) in segments {
                let n = len.min(frame.len() - at);
                frames
                    .memory()
                    .write_slice(&frame[at..at + n], addr)
                    .map_err(io::Error::other)?;
                let _ = frames.mark_dirty(addr, n as u64);
                at += n;
            }
            let n = spill.len().min(frame.len() - at);
            spill[..n].copy_from_slice(&frame[at..at + n]);
            Ok(at + n)
        }

        fn write_frame(
            &mut self,
            frames: &GuestFrames,
            header: &[u8],
            segments: &[(GuestAddress, usize)],
        ) -> io::Result<usize> {
            let mut state = self.state();
            if let Some(kind) = state.write_error {
                return Err(io::Error::from(kind));
            }
            let mut frame = header.to_vec();
            for &(addr, len) in segments {
                let mut buf = vec![0; len];
                frames
                    .memory()
                    .read_slice(&mut buf, addr)
                    .map_err(io::Error::other)?;
                frame.extend_from_slice(&buf);
            }
            let n = frame.len();
            state.from_guest.push(frame);
            Ok(n)
        }

        fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
            let mut state = self.state();
            if state.refuse_offloads {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            state.offloads = Some(flags);
            Ok(())
        }

        fn supports_ufo(&self) -> bool {
            self.ufo
        }

        fn read_fd(&self) -> RawFd {
            self.ready.as_raw_fd()
        }
    }
}
