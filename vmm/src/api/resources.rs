//! The VM being described before it boots: what `PUT /machine-config`,
//! `/boot-source`, `/drives/{id}` and `/network-interfaces/{id}` (or the
//! sections of a `--config-file`) say, checked as they arrive, and the one
//! [`VmConfig`] built from it at `InstanceStart` — the same description the
//! command-line flags build.
//!
//! Rules follow Firecracker's: a PUT with an existing id replaces that
//! device, at most one drive is the root device (it becomes the first disk,
//! `/dev/vda`, and `root=` joins the command line), the machine
//! configuration PUT resets the optional fields to their defaults.

use std::path::PathBuf;

use super::model::*;
use super::router::ApiError;
use crate::cli::{DEFAULT_CMDLINE, MIN_MEM, parse_mac};
use crate::run::VmConfig;
use crate::virtio::{DiskConfig, MAX_DEVICES, NetSpec, TapSpec};
use crate::x86::cpuid::CpuTemplate;
use crate::x86::mptable::MAX_CPUS;

/// The configuration of a VM not yet started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmResources {
    /// vCPUs and RAM.
    pub machine: MachineConfig,
    /// The kernel.
    pub boot: Option<BootSource>,
    /// Drives, in the order they were first put.
    pub drives: Vec<Drive>,
    /// Network interfaces, in the order they were first put.
    pub nets: Vec<NetworkInterface>,
    /// The logger, as configured.
    pub logger: Option<Logger>,
    /// The metrics file, as configured.
    pub metrics: Option<Metrics>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

impl VmResources {
    /// The resources a `--config-file` describes (logger and metrics are
    /// applied by the caller, who owns them).
    pub fn from_config(config: &FullVmConfig) -> Result<VmResources, ApiError> {
        if let Some(section) = config.unsupported_section() {
            return Err(bad(format!(
                "minivmm does not support the `{section}` section"
            )));
        }
        let mut resources = VmResources::default();
        if let Some(machine) = &config.machine_config {
            resources.set_machine(machine.clone())?;
        }
        if let Some(boot) = &config.boot_source {
            resources.set_boot_source(boot.clone())?;
        }
        for drive in &config.drives {
            resources.put_drive(drive.clone())?;
        }
        for iface in &config.network_interfaces {
            resources.put_net(iface.clone())?;
        }
        resources.logger = config.logger.clone();
        resources.metrics = config.metrics.clone();
        Ok(resources)
    }

    /// The description of a VM the command-line flags configured (or a
    /// snapshot restored), for `GET /vm/config` and device updates: drives
    /// named by their serial or `drive<N>`, interfaces by their id or
    /// `net<N>`.
    pub fn from_vm_config(config: &VmConfig) -> VmResources {
        let drives = config
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| Drive {
                drive_id: d.serial.clone().unwrap_or_else(|| format!("drive{i}")),
                path_on_host: Some(d.path.display().to_string()),
                is_root_device: false,
                is_read_only: d.read_only,
                partuuid: None,
                cache_type: None,
                rate_limiter: None,
                io_engine: None,
                socket: None,
            })
            .collect();
        let nets = config
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                host_dev_name: match &n.tap {
                    TapSpec::Name(name) => name.clone(),
                    TapSpec::Fd(fd) => format!("fd={fd}"),
                },
                guest_mac: n.mac.map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }),
                mtu: n.mtu.map(u64::from),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect();
        VmResources {
            machine: MachineConfig {
                vcpu_count: u64::from(config.cpus),
                mem_size_mib: config.mem >> 20,
                track_dirty_pages: config.track_dirty_pages,
                ..MachineConfig::default()
            },
            boot: Some(BootSource {
                kernel_image_path: config.kernel.display().to_string(),
                initrd_path: config.initrd.as_ref().map(|p| p.display().to_string()),
                boot_args: Some(config.cmdline.clone()),
            }),
            drives,
            nets,
            logger: None,
            metrics: None,
        }
    }

    /// `PUT /machine-config`.
    pub fn set_machine(&mut self, machine: MachineConfig) -> Result<(), ApiError> {
        check_machine(&machine)?;
        self.machine = machine;
        Ok(())
    }

    /// `PATCH /machine-config`: the fields given, checked together.
    pub fn patch_machine(&mut self, patch: MachineConfigPatch) -> Result<(), ApiError> {
        let mut machine = self.machine.clone();
        let MachineConfigPatch {
            vcpu_count,
            mem_size_mib,
            smt,
            track_dirty_pages,
            cpu_template,
            huge_pages,
        } = patch;
        machine.vcpu_count = vcpu_count.unwrap_or(machine.vcpu_count);
        machine.mem_size_mib = mem_size_mib.unwrap_or(machine.mem_size_mib);
        machine.smt = smt.unwrap_or(machine.smt);
        machine.track_dirty_pages = track_dirty_pages.unwrap_or(machine.track_dirty_pages);
        machine.cpu_template = cpu_template.or(machine.cpu_template);
        machine.huge_pages = huge_pages.or(machine.huge_pages);
        self.set_machine(machine)
    }

    /// `PUT /boot-source`.
    pub fn set_boot_source(&mut self, boot: BootSource) -> Result<(), ApiError> {
        check_file("kernel_image_path", &boot.kernel_image_path)?;
        if let Some(initrd) = &boot.initrd_path {
            check_file("initrd_path", initrd)?;
        }
        if let Some(args) = &boot.boot_args
            && (args.len() > 4096 || args.bytes().any(|b| !(0x20..0x7f).contains(&b)))
        {
            return Err(bad(
                "boot_args must be printable ASCII of at most 4096 bytes",
            ));
        }
        self.boot = Some(boot);
        Ok(())
    }

    /// `PUT /drives/{id}`: adds the drive or replaces the one of that id.
    pub fn put_drive(&mut self, drive: Drive) -> Result<(), ApiError> {
        let path = match (&drive.path_on_host, &drive.socket) {
            (_, Some(_)) => return Err(bad("minivmm does not support vhost-user drives (socket)")),
            (None, None) => return Err(bad("A drive needs path_on_host")),
            (Some(path), None) => path,
        };
        check_file("path_on_host", path)?;
        match drive.io_engine.as_deref() {
            None | Some("Sync") => {}
            Some(other) => {
                return Err(bad(format!(
                    "io_engine `{other}` is not supported (only Sync)"
                )));
            }
        }
        match drive.cache_type.as_deref() {
            None | Some("Unsafe") | Some("Writeback") => {}
            Some(other) => {
                return Err(bad(format!(
                    "cache_type `{other}` is not one of Unsafe, Writeback"
                )));
            }
        }
        if drive.partuuid.as_ref().is_some_and(|p| {
            p.is_empty() || p.len() > 64 || !p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        }) {
            return Err(bad("partuuid is a partition UUID (hex digits and -)"));
        }
        if let Some(limiter) = &drive.rate_limiter {
            check_limiter("rate_limiter", limiter)?;
        }
        if drive.is_root_device
            && let Some(other) = self
                .drives
                .iter()
                .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
        {
            return Err(bad(format!(
                "A root block device already exists: {}",
                other.drive_id
            )));
        }
        self.replace_or_add_drive(drive)
    }

    fn replace_or_add_drive(&mut self, drive: Drive) -> Result<(), ApiError> {
        match self
            .drives
            .iter()
            .position(|d| d.drive_id == drive.drive_id)
        {
            Some(i) => self.drives[i] = drive,
            None => {
                self.room_for_a_device()?;
                self.drives.push(drive);
            }
        }
        Ok(())
    }

    fn room_for_a_device(&self) -> Result<(), ApiError> {
        if self.drives.len() + self.nets.len() >= MAX_DEVICES {
            return Err(bad(format!(
                "At most {MAX_DEVICES} drives and network interfaces in all"
            )));
        }
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`.
    pub fn put_net(&mut self, iface: NetworkInterface) -> Result<(), ApiError> {
        if iface.host_dev_name.is_empty() || iface.host_dev_name.len() >= libc::IFNAMSIZ {
            return Err(bad(format!(
                "host_dev_name is 1 to {} bytes",
                libc::IFNAMSIZ - 1
            )));
        }
        if let Some(mac) = &iface.guest_mac {
            parse_mac(mac).map_err(|e| bad(format!("guest_mac: {e}")))?;
        }
        if let Some(mtu) = iface.mtu {
            let range = devices::virtio::net::MTU_RANGE;
            if !(u64::from(*range.start())..=u64::from(*range.end())).contains(&mtu) {
                return Err(bad(format!(
                    "mtu {mtu} is outside {} to {}",
                    range.start(),
                    range.end()
                )));
            }
        }
        for (name, limiter) in [
            ("rx_rate_limiter", &iface.rx_rate_limiter),
            ("tx_rate_limiter", &iface.tx_rate_limiter),
        ] {
            if let Some(l) = limiter {
                check_limiter(name, l)?;
            }
        }
        if let Some(other) = self
            .nets
            .iter()
            .find(|n| n.host_dev_name == iface.host_dev_name && n.iface_id != iface.iface_id)
        {
            return Err(bad(format!(
                "The host device {} is already used by {}",
                iface.host_dev_name, other.iface_id
            )));
        }
        match self.nets.iter().position(|n| n.iface_id == iface.iface_id) {
            Some(i) => self.nets[i] = iface,
            None => {
                self.room_for_a_device()?;
                self.nets.push(iface);
            }
        }
        Ok(())
    }

    /// Drives in device order: the root device first, then the others in
    /// the order they were put.
    pub fn ordered_drives(&self) -> Vec<&Drive> {
        let root = self.drives.iter().filter(|d| d.is_root_device);
        root.chain(self.drives.iter().filter(|d| !d.is_root_device))
            .collect()
    }

    /// Checks a `PATCH /drives/{id}` after boot; returns the drive's device
    /// index (devices are attached in [`ordered_drives`](Self::ordered_drives)
    /// order).
    pub fn check_drive_patch(&self, patch: &PartialDrive) -> Result<usize, ApiError> {
        let index = self
            .ordered_drives()
            .iter()
            .position(|d| d.drive_id == patch.drive_id)
            .ok_or_else(|| bad(format!("No drive {}", patch.drive_id)))?;
        if let Some(path) = &patch.path_on_host {
            check_file("path_on_host", path)?;
        }
        if let Some(limiter) = &patch.rate_limiter {
            check_limiter("rate_limiter", limiter)?;
        }
        Ok(index)
    }

    /// Records a drive patch the device applied (for `GET /vm/config`).
    pub fn record_drive_patch(&mut self, patch: PartialDrive) {
        if let Some(d) = self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == patch.drive_id)
        {
            if patch.path_on_host.is_some() {
                d.path_on_host = patch.path_on_host;
            }
            if patch.rate_limiter.is_some() {
                d.rate_limiter = patch.rate_limiter;
            }
        }
    }

    /// Checks a `PATCH /network-interfaces/{id}` after boot; returns the
    /// interface's device index.
    pub fn check_net_patch(&self, patch: &PartialNetworkInterface) -> Result<usize, ApiError> {
        let index = self
            .nets
            .iter()
            .position(|n| n.iface_id == patch.iface_id)
            .ok_or_else(|| bad(format!("No network interface {}", patch.iface_id)))?;
        for (name, limiter) in [
            ("rx_rate_limiter", &patch.rx_rate_limiter),
            ("tx_rate_limiter", &patch.tx_rate_limiter),
        ] {
            if let Some(l) = limiter {
                check_limiter(name, l)?;
            }
        }
        Ok(index)
    }

    /// Records an interface patch the device applied.
    pub fn record_net_patch(&mut self, patch: PartialNetworkInterface) {
        if let Some(n) = self.nets.iter_mut().find(|n| n.iface_id == patch.iface_id) {
            if patch.rx_rate_limiter.is_some() {
                n.rx_rate_limiter = patch.rx_rate_limiter;
            }
            if patch.tx_rate_limiter.is_some() {
                n.tx_rate_limiter = patch.tx_rate_limiter;
            }
        }
    }

    /// The [`VmConfig`] to boot, at `InstanceStart`.
    pub fn vm_config(&self) -> Result<VmConfig, ApiError> {
        let boot = self.boot.as_ref().ok_or_else(|| {
            bad("Cannot start the microVM without a boot source (PUT /boot-source)")
        })?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        let drives = self.ordered_drives();
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            let device = match &root.partuuid {
                Some(uuid) => format!("PARTUUID={uuid}"),
                None => "/dev/vda".to_owned(),
            };
            let mode = if root.is_read_only { "ro" } else { "rw" };
            cmdline.push_str(&format!(" root={device} {mode}"));
        }
        let disks = drives
            .iter()
            .map(|d| DiskConfig {
                path: PathBuf::from(d.path_on_host.clone().unwrap_or_default()),
                read_only: d.is_read_only,
                serial: Some(d.drive_id.chars().take(20).collect()),
                rate_limiter: d.rate_limiter.map(Into::into),
            })
            .collect();
        let nets = self
            .nets
            .iter()
            .map(|n| NetSpec {
                id: Some(n.iface_id.clone()),
                tap: TapSpec::Name(n.host_dev_name.clone()),
                mac: n.guest_mac.as_deref().and_then(|m| parse_mac(m).ok()),
                mtu: n.mtu.and_then(|m| u16::try_from(m).ok()),
                rx_rate_limiter: n.rx_rate_limiter.map(Into::into),
                tx_rate_limiter: n.tx_rate_limiter.map(Into::into),
            })
            .collect();
        Ok(VmConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            cmdline,
            mem: self.machine.mem_size_mib << 20,
            cpus: self.machine.vcpu_count as u8,
            template: CpuTemplate::Minimal,
            disks,
            nets,
            acpi: true,
            boot_timer: false,
            track_dirty_pages: self.machine.track_dirty_pages,
        })
    }

    /// `GET /vm/config`: the configuration as Firecracker's
    /// `FullVmConfiguration`.
    pub fn full_config(&self) -> FullVmConfig {
        FullVmConfig {
            boot_source: self.boot.clone(),
            drives: self.drives.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.nets.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            ..FullVmConfig::default()
        }
    }
}

/// The machine configuration's values, and the fields minivmm cannot honour.
fn check_machine(m: &MachineConfig) -> Result<(), ApiError> {
    if !(1..=u64::from(MAX_CPUS)).contains(&m.vcpu_count) {
        return Err(bad(format!(
            "vcpu_count {} is outside 1 to {MAX_CPUS}",
            m.vcpu_count
        )));
    }
    let min = MIN_MEM >> 20;
    let max = memory::layout::MAX_RAM >> 20;
    if !(min..=max).contains(&m.mem_size_mib) {
        return Err(bad(format!(
            "mem_size_mib {} is outside {min} to {max}",
            m.mem_size_mib
        )));
    }
    if m.smt {
        return Err(bad("minivmm does not support smt (one thread per core)"));
    }
    if let Some(t) = m.cpu_template.as_deref().filter(|t| *t != "None") {
        return Err(bad(format!(
            "minivmm does not support the cpu_template {t} (only None: minivmm's minimal template)"
        )));
    }
    if let Some(h) = m.huge_pages.as_deref().filter(|h| *h != "None") {
        return Err(bad(format!(
            "minivmm does not support huge_pages {h} (only None)"
        )));
    }
    Ok(())
}

/// A path the VMM will open: non-empty, no NUL, an existing regular file.
fn check_file(field: &str, path: &str) -> Result<(), ApiError> {
    let shown: String = path.chars().take(256).collect();
    if path.is_empty() || path.contains('\0') {
        return Err(bad(format!("{field} is not a path")));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(bad(format!("{field} {shown} is not a regular file"))),
        Err(e) => Err(bad(format!("{field} {shown}: {e}"))),
    }
}

/// A rate limiter's buckets: sizes and refill times are u64 already; a
/// bucket with a size but no refill time would never refill.
fn check_limiter(field: &str, limiter: &RateLimiter) -> Result<(), ApiError> {
    for (name, bucket) in [("bandwidth", &limiter.bandwidth), ("ops", &limiter.ops)] {
        if let Some(b) = bucket
            && b.size > 0
            && b.refill_time == 0
        {
            return Err(bad(format!(
                "{field}.{name}: refill_time must be above 0 when size is"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> (tempfile_path::TempPath, String) {
        let t = tempfile_path::TempPath::new();
        let s = t.0.to_str().unwrap().to_owned();
        (t, s)
    }

    /// A file removed when dropped.
    mod tempfile_path {
        use std::sync::atomic::{AtomicU32, Ordering};
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new() -> TempPath {
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "minivmm-resources-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, [0u8; 512]).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn drive(id: &str, path: &str, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            path_on_host: Some(path.into()),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }

    #[test]
    fn machine_config_values_out_of_range_or_unsupported_are_refused() {
        let mut r = VmResources::default();
        for (vcpus, mib) in [(0, 128), (255, 128), (1, 0), (1, 15), (1, u64::MAX)] {
            let m = MachineConfig {
                vcpu_count: vcpus,
                mem_size_mib: mib,
                ..MachineConfig::default()
            };
            assert!(r.set_machine(m).is_err(), "{vcpus} {mib}");
        }
        for m in [
            MachineConfig {
                smt: true,
                ..MachineConfig::default()
            },
            MachineConfig {
                cpu_template: Some("T2".into()),
                ..MachineConfig::default()
            },
            MachineConfig {
                huge_pages: Some("2M".into()),
                ..MachineConfig::default()
            },
        ] {
            let e = r.set_machine(m).unwrap_err();
            assert!(e.message.contains("does not support"), "{}", e.message);
        }
        assert_eq!(r.machine, MachineConfig::default());
        r.patch_machine(MachineConfigPatch {
            vcpu_count: Some(4),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.machine.vcpu_count, r.machine.mem_size_mib), (4, 128));
        assert!(
            r.patch_machine(MachineConfigPatch {
                mem_size_mib: Some(0),
                ..Default::default()
            })
            .is_err()
        );
        assert_eq!(
            r.machine.mem_size_mib, 128,
            "a refused patch changes nothing"
        );
    }

    #[test]
    fn the_root_drive_comes_first_and_joins_the_command_line() {
        let (_a, a) = file();
        let (_b, b) = file();
        let mut r = VmResources::default();
        r.set_boot_source(BootSource {
            kernel_image_path: a.clone(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        })
        .unwrap();
        r.put_drive(drive("data", &b, false)).unwrap();
        r.put_drive(drive("rootfs", &a, true)).unwrap();
        let e = r.put_drive(drive("other", &a, true)).unwrap_err();
        assert!(e.message.contains("root block device already exists"));
        let c = r.vm_config().unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(c.disks[0].serial.as_deref(), Some("rootfs"));
        assert_eq!(c.disks[1].path.to_str(), Some(b.as_str()));
        // Replacing a drive keeps its place.
        let mut ro = drive("data", &a, false);
        ro.is_read_only = true;
        r.put_drive(ro).unwrap();
        assert_eq!(r.drives.len(), 2);
        assert!(r.vm_config().unwrap().disks[1].read_only);
    }

    #[test]
    fn files_that_do_not_exist_are_refused_at_put() {
        let mut r = VmResources::default();
        let e = r
            .set_boot_source(BootSource {
                kernel_image_path: "/nonexistent/kernel".into(),
                initrd_path: None,
                boot_args: None,
            })
            .unwrap_err();
        assert!(e.message.contains("/nonexistent/kernel"), "{}", e.message);
        assert!(r.put_drive(drive("d", "/nonexistent", false)).is_err());
        assert!(r.put_drive(drive("d", "/", false)).is_err());
        assert!(r.vm_config().is_err(), "no boot source");
    }

    #[test]
    fn network_interfaces_check_mac_mtu_name_and_limiters() {
        let mut r = VmResources::default();
        let iface = |id: &str, dev: &str| NetworkInterface {
            iface_id: id.into(),
            host_dev_name: dev.into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        r.put_net(iface("eth0", "tap0")).unwrap();
        assert!(r.put_net(iface("eth1", "tap0")).is_err(), "same TAP twice");
        assert!(r.put_net(iface("eth1", "")).is_err());
        assert!(r.put_net(iface("eth1", "a-name-far-too-long")).is_err());
        let mut bad_mac = iface("eth1", "tap1");
        bad_mac.guest_mac = Some("01:00:00:00:00:01".into());
        assert!(r.put_net(bad_mac).is_err());
        let mut bad_mtu = iface("eth1", "tap1");
        bad_mtu.mtu = Some(65535);
        assert!(r.put_net(bad_mtu).is_err());
        let mut bad_limiter = iface("eth1", "tap1");
        bad_limiter.tx_rate_limiter = Some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 10,
                one_time_burst: None,
                refill_time: 0,
            }),
            ops: None,
        });
        assert!(r.put_net(bad_limiter).is_err());
        assert_eq!(r.nets.len(), 1);
    }

    #[test]
    fn config_file_sections_minivmm_lacks_are_named() {
        let c: FullVmConfig =
            serde_json::from_str(r#"{"vsock": {"guest_cid": 3, "uds_path": "/v"}}"#).unwrap();
        let e = VmResources::from_config(&c).unwrap_err();
        assert!(e.message.contains("`vsock`"), "{}", e.message);
        let c: FullVmConfig = serde_json::from_str(r#"{"balloon": null}"#).unwrap();
        assert!(VmResources::from_config(&c).is_ok());
        assert!(serde_json::from_str::<FullVmConfig>(r#"{"drive": []}"#).is_err());
    }
}
