//! Helpers shared by minivmm's integration tests (in `tests/tests/`): where the
//! `minivmm` binary and the test guest are, whether KVM is usable, and running
//! minivmm with a deadline.
//!
//! The binary and the guest image are built by `scripts/test.sh` before
//! `cargo test` (a test cannot run cargo itself: the outer cargo holds the
//! build lock). Both can be overridden with `MINIVMM_BIN` and
//! `MINIVMM_TEST_GUEST`. A stale binary (older than the sources it is built
//! from) is an error, so a test never checks yesterday's minivmm.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

pub mod api;
pub mod netns;

/// Set to `1` (CI does) to make tests that need KVM fail instead of skipping.
pub const REQUIRE_KVM: &str = "MINIVMM_REQUIRE_KVM";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `minivmm` binary the tests run: `$MINIVMM_BIN`, or the one next to this
/// test executable's `deps/` directory (same target dir and profile).
pub fn minivmm_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MINIVMM_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("minivmm");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p vmm` (scripts/test.sh does)",
        bin.display()
    );
    let built = modified(&bin);
    let root = workspace_root();
    for dir in ["vmm/src", "devices/src", "memory/src"] {
        if let Some((newest, path)) = newest_file(&root.join(dir)) {
            assert!(
                newest <= built,
                "{} is older than {}: rebuild it with `cargo build -p vmm` (scripts/test.sh does)",
                bin.display(),
                path.display()
            );
        }
    }
    bin
}

/// The test guest kernel: `$MINIVMM_TEST_GUEST`, or the release build under
/// `guest-images/` (built by `guest-images/build.sh`).
pub fn test_guest() -> PathBuf {
    if let Some(path) = std::env::var_os("MINIVMM_TEST_GUEST") {
        return PathBuf::from(path);
    }
    let elf = workspace_root().join("guest-images/target/x86_64-unknown-none/release/testguest");
    assert!(
        elf.is_file(),
        "{} is missing: build it with guest-images/build.sh (scripts/test.sh does)",
        elf.display()
    );
    elf
}

/// Whether the tests that need KVM can run. `Err` says why not.
pub fn kvm_usable() -> Result<(), String> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("/dev/kvm is not usable: {e}")),
    }
}

/// Returns `false` (after printing why) when KVM is unusable, so the calling
/// test can return early; panics instead when `MINIVMM_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(why) if std::env::var(REQUIRE_KVM).is_ok_and(|v| v == "1") => {
            panic!("{test}: {why}, and {REQUIRE_KVM}=1 requires KVM")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why} (set {REQUIRE_KVM}=1 to fail instead)");
            false
        }
    }
}

/// What a finished minivmm run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything the guest wrote to its console (minivmm's stdout).
    pub stdout: String,
    /// minivmm's own messages.
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Outcome {
    /// The exit code; panics (with the output) if a signal killed minivmm.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("minivmm killed by a signal: {self}"))
    }

    /// Asserts that the console output has a line starting with `prefix` and
    /// returns the rest of that line.
    pub fn line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no console line starting with {prefix:?}: {self}"))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after {:.1?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `command` with stdin from /dev/null; kills it after `timeout` and
/// panics with what it printed so far.
pub fn run_with_timeout(command: Command, timeout: Duration) -> Outcome {
    let what = format!("{command:?}");
    let mut running = Running::start(command);
    if !running.wait_exit(timeout) {
        let outcome = running.kill();
        panic!("{what} did not finish within {timeout:?}: {outcome}");
    }
    running.collect()
}

/// Runs minivmm with `args`, killing it after `timeout`.
pub fn minivmm<I, S>(args: I, timeout: Duration) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(minivmm_bin());
    command.args(args);
    run_with_timeout(command, timeout)
}

fn modified(path: &Path) -> SystemTime {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The most recently modified file under `dir`, recursively.
fn newest_file(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            Some((modified(&path), path))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

/// Byte `i` of sector `sector` as the guest's block self-test writes it
/// (`guest-images/testguest/src/blk.rs`).
pub fn pattern(sector: u64, i: usize) -> u8 {
    (sector as u8).wrapping_mul(31) ^ (i as u8) ^ ((i >> 8) as u8) ^ 0x5a
}

/// A minivmm process whose console output is watched while it runs.
#[derive(Debug)]
pub struct Running {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: thread::JoinHandle<Vec<u8>>,
    reader: thread::JoinHandle<()>,
    start: Instant,
}

impl Running {
    /// Starts `command` (stdin from /dev/null, stdout and stderr captured).
    pub fn start(command: Command) -> Running {
        Running::start_with(command, Stdio::null())
    }

    /// As [`Running::start`], with stdin a pipe [`Running::type_in`]
    /// writes to.
    pub fn start_typing(command: Command) -> Running {
        Running::start_with(command, Stdio::piped())
    }

    /// Writes `bytes` to the process's stdin (from [`Running::start_typing`]).
    pub fn type_in(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("started with start_typing");
        stdin.write_all(bytes).expect("write to minivmm's stdin");
        stdin.flush().expect("flush minivmm's stdin");
    }

    fn start_with(mut command: Command, stdin: Stdio) -> Running {
        let mut child = command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let input = child.stdin.take();
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stdout.clone();
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stderr = thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            buf
        });
        Running {
            child,
            stdin: input,
            stdout,
            stderr,
            reader,
            start: Instant::now(),
        }
    }

    /// Waits until the console output satisfies `done`, the process exits, or
    /// `timeout` passes; returns whether `done` held.
    pub fn wait_for(&mut self, timeout: Duration, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.stdout.lock().unwrap()) {
                return true;
            }
            if Instant::now() > deadline || self.child.try_wait().ok().flatten().is_some() {
                return done(&self.stdout.lock().unwrap());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The console output so far.
    pub fn stdout_now(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait().expect("wait for minivmm").is_some() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM (if still running) and collects the outcome.
    pub fn terminate(mut self) -> Outcome {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        self.collect()
    }

    /// Kills the process (if still running) and collects the outcome.
    pub fn kill(mut self) -> Outcome {
        let _ = self.child.kill();
        self.collect()
    }

    /// Waits for the process to exit and returns what it printed.
    pub fn collect(mut self) -> Outcome {
        let status = self.child.wait().expect("wait for minivmm");
        let _ = self.reader.join();
        let stdout = self.stdout.lock().unwrap().clone();
        Outcome {
            status,
            stdout,
            stderr: String::from_utf8_lossy(&self.stderr.join().unwrap_or_default()).into_owned(),
            elapsed: self.start.elapsed(),
        }
    }
}

/// Where [`vmlinux_elf`] loads its code (physical = virtual), like a vmlinux.
pub const VMLINUX_LOAD: u64 = 0x100_0000;

/// An ELF64 x86-64 executable without a PVH note (like a vmlinux): one
/// PT_LOAD of `code` at [`VMLINUX_LOAD`], entry point `entry`.
pub fn vmlinux_elf(entry: u64, code: &[u8]) -> Vec<u8> {
    elf(entry, VMLINUX_LOAD, code, false)
}

/// Where [`pvh_elf`] loads its code.
pub const PVH_LOAD: u64 = 0x10_0000;

/// An ELF64 with one PT_LOAD of `code` at [`PVH_LOAD`] and a PVH note
/// (`XEN_ELFNOTE_PHYS32_ENTRY`) pointing at its first byte: entered in 32-bit
/// protected mode, paging off.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    elf(PVH_LOAD, PVH_LOAD, code, true)
}

/// One PT_LOAD of `code` at `load` (physical = virtual), `e_entry` `entry`,
/// and with `pvh` a PT_NOTE holding the Xen PVH entry note.
fn elf(entry: u64, load: u64, code: &[u8], pvh: bool) -> Vec<u8> {
    const CODE_OFFSET: u64 = 0x1000;
    const NOTE_OFFSET: u64 = 0x100;
    let mut elf = vec![0u8; CODE_OFFSET as usize];
    let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, b"\x7fELF\x02\x01\x01"); // 64-bit, little endian, version 1
    put(0x10, &2u16.to_le_bytes()); // ET_EXEC
    put(0x12, &62u16.to_le_bytes()); // EM_X86_64
    put(0x14, &1u32.to_le_bytes()); // EV_CURRENT
    put(0x18, &entry.to_le_bytes()); // e_entry
    put(0x20, &64u64.to_le_bytes()); // e_phoff
    put(0x34, &64u16.to_le_bytes()); // e_ehsize
    put(0x36, &56u16.to_le_bytes()); // e_phentsize
    put(0x38, &(1 + u16::from(pvh)).to_le_bytes()); // e_phnum
    put(0x3a, &64u16.to_le_bytes()); // e_shentsize
    let ph = 64;
    put(ph, &1u32.to_le_bytes()); // PT_LOAD
    put(ph + 4, &5u32.to_le_bytes()); // R+X
    put(ph + 8, &CODE_OFFSET.to_le_bytes()); // p_offset
    put(ph + 0x10, &load.to_le_bytes()); // p_vaddr
    put(ph + 0x18, &load.to_le_bytes()); // p_paddr
    put(ph + 0x20, &(code.len() as u64).to_le_bytes()); // p_filesz
    put(ph + 0x28, &(code.len() as u64).to_le_bytes()); // p_memsz
    put(ph + 0x30, &0x1000u64.to_le_bytes()); // p_align
    if pvh {
        // Note: namesz 4, descsz 4, type 18, "Xen\0", the 32-bit entry.
        let note = NOTE_OFFSET as usize;
        put(note, &4u32.to_le_bytes());
        put(note + 4, &4u32.to_le_bytes());
        put(note + 8, &18u32.to_le_bytes());
        put(note + 12, b"Xen\0");
        put(note + 16, &(entry as u32).to_le_bytes());
        let ph = 64 + 56;
        put(ph, &4u32.to_le_bytes()); // PT_NOTE
        put(ph + 4, &4u32.to_le_bytes()); // R
        put(ph + 8, &NOTE_OFFSET.to_le_bytes()); // p_offset
        put(ph + 0x20, &20u64.to_le_bytes()); // p_filesz
        put(ph + 0x28, &20u64.to_le_bytes()); // p_memsz
        put(ph + 0x30, &4u64.to_le_bytes()); // p_align
    }
    elf.extend_from_slice(code);
    elf
}

/// Where [`bzimage`]'s protected-mode code is loaded.
pub const BZIMAGE_LOAD: u64 = 0x10_0000;

/// A minimal bzImage (boot protocol `version`, `xloadflags`) whose
/// protected-mode part is `code` placed at offset 0x200, where the 64-bit entry
/// point of a bzImage is: four setup sectors plus the boot sector, then the
/// kernel.
pub fn bzimage(version: u16, xloadflags: u16, code: &[u8]) -> Vec<u8> {
    const SETUP_SECTS: u8 = 4;
    let setup = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut image = vec![0u8; setup + 0x200];
    let mut put = |at: usize, bytes: &[u8]| image[at..at + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[SETUP_SECTS]);
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x202, b"HdrS");
    put(0x206, &version.to_le_bytes());
    put(0x211, &[1]); // loadflags: LOADED_HIGH
    put(0x214, &(BZIMAGE_LOAD as u32).to_le_bytes()); // code32_start
    put(0x236, &xloadflags.to_le_bytes());
    put(0x260, &0x10000u32.to_le_bytes()); // init_size
    image.extend_from_slice(code);
    image
}
