//! Command line: `minivmm --kernel <image> [options]`.
//!
//! Parsing is clap's; sizes (`512M`, `2G`) and the value checks that do not need
//! KVM are ours. Every error becomes one line on stderr (see `main.rs`).

use std::path::PathBuf;

use clap::Parser;

use crate::virtio::{DiskConfig, NetSpec, TapSpec};
use crate::x86::cpuid::CpuTemplate;
use crate::x86::mptable::MAX_CPUS;

/// Default kernel command line when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// Smallest guest RAM accepted.
pub const MIN_MEM: u64 = 16 << 20;

/// minivmm: boot a Linux or PVH kernel in a KVM microVM.
#[derive(Debug, Parser)]
#[command(name = "minivmm", version, about)]
pub struct Cli {
    /// Kernel image: a bzImage, an ELF vmlinux, or a PVH ELF. Without it,
    /// the VM comes from --config-file or the API (--api-sock).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["api_sock", "config_file", "restore"],
          conflicts_with = "config_file")]
    pub kernel: Option<PathBuf>,

    /// Restore the snapshot in DIR (its state file `snapshot` and memory
    /// file `memory`, as `PUT /snapshot/create` wrote them) instead of
    /// booting. The memory file is mapped copy-on-write: any number of
    /// clones can run from one snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "config_file"])]
    pub restore: Option<PathBuf>,

    /// With --restore: map the memory file shared, so the guest's writes
    /// reach it (one VM per memory file).
    #[arg(long)]
    pub restore_shared: bool,

    /// With --restore: the TAP network interface ID (net0, net1... or the
    /// API's iface_id) uses instead of its saved one. Repeatable.
    #[arg(long = "restore-net", value_name = "ID=TAP", value_parser = parse_override)]
    pub restore_nets: Vec<(String, String)>,

    /// Have KVM log the pages the guest writes, so the API can take diff
    /// snapshots (`PUT /snapshot/create` with `"snapshot_type": "Diff"`).
    #[arg(long)]
    pub track_dirty_pages: bool,

    /// With --restore and --api-sock: leave the VM paused until
    /// `PATCH /vm {"state": "Resumed"}`.
    #[arg(long)]
    pub restore_paused: bool,

    /// Serve Firecracker's API on this Unix socket (HTTP/1.1). Without
    /// --kernel or --config-file, the VM boots at the API's InstanceStart.
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    pub api_sock: Option<PathBuf>,

    /// Boot the VM Firecracker's JSON configuration file describes
    /// (boot-source, drives, machine-config, network-interfaces, logger,
    /// metrics).
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// No API socket (as Firecracker's --no-api; minivmm serves none unless
    /// --api-sock is given).
    #[arg(long)]
    pub no_api: bool,

    /// Firecracker's boot timer: a guest writing 123 at 0xd0000000 has
    /// minivmm log the time since the VM was built (info level); the
    /// virtio devices start one slot later.
    #[arg(long)]
    pub boot_timer: bool,

    /// The VM's id, reported by GET / (1 to 64 letters, digits, - and _).
    #[arg(long, value_name = "ID", default_value = "anonymous-instance", value_parser = parse_id)]
    pub id: String,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line, used as given [default: "console=ttyS0 reboot=k panic=1 ..."].
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Guest RAM, with an optional K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,

    /// Number of vCPUs (1 to 254: the MP table's APIC ids; KVM may allow fewer).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)))]
    pub cpus: u8,

    /// CPU template: `minimal` hides what nested hosts cannot run (XSAVE, AVX,
    /// CMPXCHG16B, PMU, TSX, ...), `passthrough` exposes what KVM supports.
    #[arg(long, value_name = "NAME", default_value = "minimal")]
    pub cpu_template: CpuTemplate,

    /// A virtio-blk disk: an image file, optionally `,ro` and `,id=SERIAL`
    /// (at most 20 bytes). Repeat for more disks.
    #[arg(long = "disk", value_name = "PATH[,ro][,id=SERIAL]", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,

    /// A virtio-net device on a TAP: `tap=NAME` (an existing TAP interface) or
    /// `fd=N` (an open TAP descriptor), optionally `,mac=XX:XX:XX:XX:XX:XX`
    /// (default: random, locally administered) and `,mtu=N` (68 to 65518,
    /// default 1500). Repeat for more devices.
    #[arg(long = "net", value_name = "tap=NAME|fd=N[,mac=MAC][,mtu=N]", value_parser = parse_net)]
    pub nets: Vec<NetSpec>,

    /// ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) describing the vCPUs and the
    /// devices, and ACPI power-off and reset: `on` (default), or `off` for the
    /// MP table alone and `virtio_mmio.device=` words on the command line.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub acpi: Switch,

    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = parse_log_level)]
    pub log_level: log::LevelFilter,
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

impl Cli {
    /// What clap's attributes do not check: the --restore-* options only
    /// with --restore, --restore-paused only with an API to resume it.
    pub fn check(&self) -> Result<(), String> {
        let restore_only = [
            ("--restore-shared", self.restore_shared),
            ("--restore-net", !self.restore_nets.is_empty()),
            ("--restore-paused", self.restore_paused),
        ];
        if let Some((flag, _)) = restore_only
            .iter()
            .find(|(_, given)| *given && self.restore.is_none())
        {
            return Err(format!("{flag} needs --restore DIR"));
        }
        if self.restore_paused && self.api_sock.is_none() {
            return Err("--restore-paused needs --api-sock (to resume the VM)".to_owned());
        }
        Ok(())
    }

    /// The kernel command line to pass.
    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }
}

/// Parses a RAM size: bytes, or a number with a K, M, G or T suffix (binary units).
/// It must be a whole number of 4 KiB pages, at least `MIN_MEM` and at most
/// `memory::layout::MAX_RAM`.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        Some((i, 't' | 'T')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 512M or 2G"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes < MIN_MEM {
        return Err(format!("{s} is below the minimum of {}M", MIN_MEM >> 20));
    }
    if bytes > memory::layout::MAX_RAM {
        return Err(format!(
            "{s} is above the maximum of {}G",
            memory::layout::MAX_RAM >> 30
        ));
    }
    if bytes % memory::PAGE_SIZE != 0 {
        return Err(format!("{s} is not a multiple of 4K"));
    }
    Ok(bytes)
}

/// Parses `ID=TAP`.
pub fn parse_override(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((id, tap)) if !id.is_empty() && !tap.is_empty() => Ok((id.to_owned(), tap.to_owned())),
        _ => Err(format!("`{s}` is not ID=TAP, such as net0=tap1")),
    }
}

/// Parses `PATH[,ro][,id=SERIAL]` (a path cannot contain commas).
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("the disk path is empty")?;
    let mut disk = DiskConfig {
        path: path.into(),
        read_only: false,
        serial: None,
        rate_limiter: None,
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => disk.read_only = true,
            Some(("id", id)) if !id.is_empty() && id.len() <= 20 && id.is_ascii() => {
                disk.serial = Some(id.to_owned())
            }
            Some(("id", _)) => return Err("a disk id is 1 to 20 ASCII characters".to_owned()),
            _ => {
                return Err(format!(
                    "unknown disk option `{option}` (expected ro or id=SERIAL)"
                ));
            }
        }
    }
    Ok(disk)
}

/// Parses `tap=NAME|fd=N[,mac=MAC][,mtu=N]`.
pub fn parse_net(s: &str) -> Result<NetSpec, String> {
    let mut parts = s.split(',');
    let tap = match parts.next().and_then(|p| p.split_once('=')) {
        Some(("tap", name)) if !name.is_empty() => TapSpec::Name(name.to_owned()),
        Some(("fd", n)) => TapSpec::Fd(
            n.parse()
                .map_err(|_| format!("`{n}` is not a file descriptor number"))?,
        ),
        _ => return Err("a network device starts with tap=NAME or fd=N".to_owned()),
    };
    let mut net = NetSpec {
        id: None,
        tap,
        mac: None,
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    };
    for option in parts {
        match option.split_once('=') {
            Some(("mac", mac)) if net.mac.is_none() => net.mac = Some(parse_mac(mac)?),
            Some(("mtu", mtu)) if net.mtu.is_none() => {
                let range = devices::virtio::net::MTU_RANGE;
                let mtu: u16 = mtu
                    .parse()
                    .ok()
                    .filter(|m| range.contains(m))
                    .ok_or_else(|| {
                        format!(
                            "mtu `{mtu}` is not a number from {} to {}",
                            range.start(),
                            range.end()
                        )
                    })?;
                net.mtu = Some(mtu);
            }
            _ => {
                return Err(format!(
                    "unknown or repeated network option `{option}` (expected mac=MAC or mtu=N)"
                ));
            }
        }
    }
    Ok(net)
}

/// Parses a unicast MAC address `XX:XX:XX:XX:XX:XX`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("`{s}` is not a MAC address such as 02:00:00:00:00:01");
    let mut mac = [0u8; 6];
    let mut octets = s.split(':');
    for byte in &mut mac {
        let octet = octets.next().filter(|o| o.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(octet, 16).map_err(|_| bad())?;
    }
    if octets.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("`{s}` is a multicast address, not a device's"));
    }
    Ok(mac)
}

/// Parses an instance id: 1 to 64 ASCII letters, digits, `-` and `_`.
pub fn parse_id(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "`{s}` is not an id (1 to 64 letters, digits, - and _)"
        ));
    }
    Ok(s.to_owned())
}

/// Parses a log level name (case-insensitive).
pub fn parse_log_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a log level (off, error, warn, info, debug, trace)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_disk_accepts_path_ro_and_id() {
        let d = parse_disk("/tmp/a.img,ro,id=disk0").unwrap();
        assert_eq!(
            (d.path.to_str(), d.read_only, d.serial.as_deref()),
            (Some("/tmp/a.img"), true, Some("disk0"))
        );
        let d = parse_disk("b.img").unwrap();
        assert_eq!((d.read_only, d.serial), (false, None));
    }

    #[test]
    fn parse_disk_rejects_bad_options() {
        for bad in [
            "",
            ",ro",
            "a.img,rw",
            "a.img,id=",
            "a.img,id=123456789012345678901",
            "a.img,id=é",
            "a.img,,ro",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn parse_net_accepts_tap_or_fd_with_mac_and_mtu() {
        let n = parse_net("tap=tap0,mac=02:ab:CD:00:00:01,mtu=9000").unwrap();
        assert_eq!(n.tap, TapSpec::Name("tap0".into()));
        assert_eq!(n.mac, Some([2, 0xab, 0xcd, 0, 0, 1]));
        assert_eq!(n.mtu, Some(9000));
        let n = parse_net("fd=7").unwrap();
        assert_eq!((n.tap, n.mac, n.mtu), (TapSpec::Fd(7), None, None));
    }

    #[test]
    fn parse_net_rejects_bad_options() {
        for bad in [
            "",
            "tap0",
            "tap=",
            "fd=x",
            "fd=",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,mac=02:00:00:00:00:00:00",
            "tap=t,mac=02-00-00-00-00-01",
            "tap=t,mac=0g:00:00:00:00:01",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mtu=67",
            "tap=t,mtu=65519",
            "tap=t,mtu=big",
            "tap=t,mtu=1500,mtu=1400",
            "tap=t,speed=10",
            "mac=02:00:00:00:00:01",
        ] {
            assert!(parse_net(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn parse_mem_accepts_suffixes() {
        assert_eq!(parse_mem("512M"), Ok(512 << 20));
        assert_eq!(parse_mem("2G"), Ok(2 << 30));
        assert_eq!(parse_mem("3g"), Ok(3 << 30));
        assert_eq!(parse_mem("1T"), Ok(1 << 40));
        assert_eq!(parse_mem("65536k"), Ok(64 << 20));
        assert_eq!(parse_mem("16777216"), Ok(16 << 20));
    }

    #[test]
    fn parse_mem_rejects_bad_sizes() {
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "1M",
            "1025G",
            "2T",
            "16777217",
        ] {
            assert!(parse_mem(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cli_parses_defaults() {
        let cli = Cli::try_parse_from(["minivmm", "--kernel", "k"]).unwrap();
        assert_eq!(
            (cli.mem, cli.cpus, cli.cpu_template),
            (256 << 20, 1, CpuTemplate::Minimal)
        );
        assert_eq!(cli.cmdline(), DEFAULT_CMDLINE);
    }

    #[test]
    fn cli_rejects_zero_cpus_and_missing_kernel() {
        assert!(Cli::try_parse_from(["minivmm", "--kernel", "k", "--cpus", "0"]).is_err());
        assert!(Cli::try_parse_from(["minivmm", "--kernel", "k", "--cpus", "300"]).is_err());
        assert!(Cli::try_parse_from(["minivmm"]).is_err());
        assert!(
            Cli::try_parse_from(["minivmm", "--kernel", "k", "--cpu-template", "fast"]).is_err()
        );
    }

    #[test]
    fn cli_restore_takes_a_directory_and_its_options_only_with_it() {
        let cli = Cli::try_parse_from([
            "minivmm",
            "--restore",
            "/snap",
            "--restore-net",
            "net0=tap7",
            "--restore-shared",
        ])
        .unwrap();
        assert_eq!(cli.restore.as_deref(), Some(std::path::Path::new("/snap")));
        assert_eq!(cli.restore_nets, [("net0".to_owned(), "tap7".to_owned())]);
        assert!(cli.restore_shared && !cli.restore_paused);
        for bad in [
            &["minivmm", "--restore", "/s", "--kernel", "k"][..],
            &["minivmm", "--kernel", "k", "--restore-shared"],
            &["minivmm", "--restore", "/s", "--restore-net", "tap7"],
            &["minivmm", "--restore", "/s", "--restore-net", "=tap7"],
            &["minivmm", "--restore", "/s", "--restore-paused"],
        ] {
            let cli = Cli::try_parse_from(bad);
            assert!(cli.is_err() || cli.unwrap().check().is_err(), "{bad:?}");
        }
        assert!(
            Cli::try_parse_from([
                "minivmm",
                "--restore",
                "/s",
                "--restore-paused",
                "--api-sock",
                "a"
            ])
            .is_ok()
        );
    }
}
