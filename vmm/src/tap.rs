//! A TAP device as virtio-net's backend: `/dev/net/tun` with `IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header (`TUNSETVNETHDRSZ`, the
//! size of `virtio_net_hdr_v1`), non-blocking. Opened by interface name, or
//! taken as a descriptor an orchestrator passed (`--net fd=N`), which must
//! be a TAP with a vnet header already. Frames move between the TAP and
//! guest memory with `memory::packet`: one readv or one writev per frame.
//!
//! These are the TAP's ioctls, so they live here with the VMM's other
//! unsafe code; the device model (`devices::virtio::net`) only sees the
//! `NetBackend` trait.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use devices::virtio::net::{HEADER_SIZE, NetBackend};
use memory::GuestFrames;
use vm_memory::GuestAddress;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Why a TAP cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Not a usable interface name.
    #[error("`{0}` is not a TAP interface name (1 to 15 bytes, no `/`)")]
    Name(String),
    /// No interface of that name (minivmm attaches to TAPs, it does not
    /// create them: one it made would vanish, unconfigured, at exit).
    #[error("There is no network interface {0} (create the TAP first: ip tuntap add {0} mode tap)")]
    Missing(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("Cannot open /dev/net/tun for TAP {0}")]
    OpenTun(String, #[source] io::Error),
    /// The kernel's TUN driver has no vnet header support.
    #[error("TAP {0}: the kernel's TUN driver lacks IFF_VNET_HDR")]
    NoVnetHeader(String),
    /// TUNSETIFF refused (missing, busy, not permitted, not a TAP).
    #[error("Cannot attach to TAP {0} (does it exist, as a TAP, and may this user use it?)")]
    Attach(String, #[source] io::Error),
    /// A passed descriptor 0, 1 or 2, or one that is not open.
    #[error("fd {0} is not an open descriptor minivmm may take (3 or above)")]
    BadFd(RawFd),
    /// A passed descriptor that is not a TAP with a vnet header.
    #[error("fd {0} is not a TAP device with IFF_VNET_HDR and IFF_NO_PI")]
    NotTap(RawFd, #[source] Option<io::Error>),
    /// Another ioctl failed.
    #[error("TAP {0}: {1} failed")]
    Ioctl(String, &'static str, #[source] io::Error),
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    ufo: bool,
}

/// An `ifreq` for `name` with `flags`.
fn ifreq(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name and a union of integers and
    // addresses); all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

const FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

impl Tap {
    /// Attaches to the existing TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains('/')
            || name.bytes().any(|b| b == 0 || b.is_ascii_whitespace())
        {
            return Err(TapError::Name(name.to_owned()));
        }
        let c_name = std::ffi::CString::new(name).map_err(|_| TapError::Name(name.to_owned()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string, alive for
        // the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_owned()));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags_nonblock()
            .open("/dev/net/tun")
            .map_err(|e| TapError::OpenTun(name.to_owned(), e))?;
        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer,
        // which is a live local of that type.
        let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETFEATURES as _, &mut features) };
        if r < 0 || features & libc::IFF_VNET_HDR as libc::c_uint == 0 {
            return Err(TapError::NoVnetHeader(name.to_owned()));
        }
        let req = ifreq(name, FLAGS);
        // SAFETY: TUNSETIFF reads (and updates) one ifreq, a live local; the
        // descriptor is the tun device just opened.
        let r = unsafe { ioctl_with_ref(&file, libc::TUNSETIFF as _, &req) };
        if r < 0 {
            return Err(TapError::Attach(
                name.to_owned(),
                io::Error::last_os_error(),
            ));
        }
        Tap::configure(file, name.to_owned())
    }

    /// Takes the already-open TAP descriptor `fd` (passed by the process
    /// that started minivmm), which must have a vnet header and no packet
    /// information.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::BadFd(fd));
        }
        // SAFETY: `fd` is open (checked above) and was inherited: nothing in
        // this process owns it (the CLI refuses the same fd twice and fds
        // 0-2), so the File becomes its only owner.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = ifreq("", 0);
        // SAFETY: TUNGETIFF writes one ifreq into a live local.
        let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::NotTap(fd, Some(io::Error::last_os_error())));
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff;
        if flags & FLAGS != FLAGS || flags & libc::IFF_TUN != 0 {
            return Err(TapError::NotTap(fd, None));
        }
        let name: String = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        set_nonblocking(&file)
            .map_err(|e| TapError::Ioctl(name.clone(), "fcntl(O_NONBLOCK)", e))?;
        Tap::configure(file, name)
    }

    /// The vnet header size, and whether UFO can be offered.
    fn configure(file: File, name: String) -> Result<Tap, TapError> {
        let size: libc::c_int = HEADER_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from a live local.
        let r = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ as _, &size) };
        if r < 0 {
            return Err(TapError::Ioctl(
                name,
                "TUNSETVNETHDRSZ",
                io::Error::last_os_error(),
            ));
        }
        let mut tap = Tap {
            file,
            name,
            ufo: false,
        };
        // Kernels since 4.14 refuse UFO on TAPs; ask, then start with none.
        tap.ufo = tap.set_offloads(libc::TUN_F_CSUM | libc::TUN_F_UFO).is_ok();
        tap.set_offloads(0)
            .map_err(|e| TapError::Ioctl(tap.name.clone(), "TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and set the open file's status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `O_NONBLOCK` on `OpenOptions`.
trait NonBlocking {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlocking for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
    }
}

impl NetBackend for Tap {
    fn read_frame(
        &mut self,
        frames: &GuestFrames,
        segments: &[(GuestAddress, usize)],
        spill: &mut [u8],
    ) -> io::Result<usize> {
        frames.read_packet(self.file.as_fd(), segments, spill)
    }

    fn write_frame(
        &mut self,
        frames: &GuestFrames,
        header: &[u8],
        segments: &[(GuestAddress, usize)],
    ) -> io::Result<usize> {
        frames.write_packet(self.file.as_fd(), header, segments)
    }

    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn supports_ufo(&self) -> bool {
        self.ufo
    }

    fn read_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
