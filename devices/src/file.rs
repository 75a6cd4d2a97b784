//! Opening the files a user names (disk images here; kernels and initrds in
//! the VMM) without being fooled by what the path really is.
//!
//! `File::open` on a FIFO blocks until a writer appears, and on a character
//! or block device runs the driver's open (a tape rewinds, a serial line
//! raises DTR, a terminal may become the controlling one) before anyone can
//! look at it. So the path is first opened with `O_PATH`, which opens nothing
//! (no driver code, no blocking), and `fstat`ed; anything but a regular file is
//! refused, naming what it is. The file is then reopened for I/O through
//! `/proc/self/fd` (the same inode, not the path again; with `O_NONBLOCK` and
//! `O_NOCTTY`, should it be swapped anyway where `/proc` is missing and the
//! path is reopened) and checked to be the same file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Why a path cannot be used as a file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path cannot be opened or examined.
    #[error(transparent)]
    Io(io::Error),
    /// The path is not a regular file: what it is instead.
    #[error("{0}, not a regular file")]
    NotRegular(&'static str),
    /// The file changed between the check and the open.
    #[error("replaced while being opened")]
    Replaced,
}

/// What a file type is, for messages.
fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens the regular file at `path` for reading, and writing if `write`,
/// refusing anything else before any open side effect (module docs).
pub fn open_regular(path: &Path, write: bool) -> Result<File, OpenError> {
    let probe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(OpenError::Io)?;
    let meta = probe.metadata().map_err(OpenError::Io)?;
    if !meta.file_type().is_file() {
        return Err(OpenError::NotRegular(describe(meta.file_type())));
    }
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let via_proc = format!("/proc/self/fd/{}", probe.as_raw_fd());
    let file = match options.open(&via_proc) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => options.open(path),
        other => other,
    }
    .map_err(OpenError::Io)?;
    let opened = file.metadata().map_err(OpenError::Io)?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Err(OpenError::Replaced);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("devices-file-{}-{name}", std::process::id()))
    }

    #[test]
    fn open_regular_opens_files_read_only_or_writable() {
        let path = temp("plain");
        std::fs::write(&path, b"abc").unwrap();
        let f = open_regular(&path, false).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3);
        let w = open_regular(&path, true).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&w, b"x", 0).unwrap();
        assert!(std::os::unix::fs::FileExt::write_all_at(&f, b"y", 0).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_regular_refuses_a_fifo_without_blocking() {
        let path = temp("fifo");
        // No safe mkfifo in std (and devices forbids unsafe): the command.
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo {}", path.display());
        let start = Instant::now();
        for write in [false, true] {
            match open_regular(&path, write) {
                Err(OpenError::NotRegular("a FIFO")) => {}
                other => panic!("expected a FIFO refusal, got {other:?}"),
            }
        }
        assert!(start.elapsed() < Duration::from_secs(5), "blocked");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_regular_names_directories_and_devices() {
        assert!(matches!(
            open_regular(Path::new("/tmp"), false),
            Err(OpenError::NotRegular("a directory"))
        ));
        assert!(matches!(
            open_regular(Path::new("/dev/null"), false),
            Err(OpenError::NotRegular("a character device"))
        ));
        assert!(matches!(
            open_regular(Path::new("/nonexistent/x"), false),
            Err(OpenError::Io(_))
        ));
    }
}
