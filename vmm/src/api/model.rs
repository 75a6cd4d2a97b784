//! The bodies of Firecracker's API, as its OpenAPI spec defines them
//! (firecracker-microvm/firecracker, `src/firecracker/swagger/firecracker.yaml`,
//! `definitions`): the same JSON field names, required fields and defaults.
//!
//! Every type refuses unknown fields, so a misspelt or unsupported field is a
//! 400 naming it rather than silently ignored. Fields the spec defines but
//! minivmm cannot honour (vhost-user sockets, the async I/O engine, SMT,
//! Firecracker's CPU templates) are parsed and then refused with a message
//! by `resources.rs`, never dropped.

use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use serde::{Deserialize, Serialize};

/// `MachineConfiguration`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs.
    pub vcpu_count: u64,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (refused when true).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker's CPU template; only `None` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages backing guest RAM; only `None` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: one vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// `MachineConfiguration` as PATCH takes it: every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct MachineConfigPatch {
    pub vcpu_count: Option<u64>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

/// `BootSource`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel image on the host.
    pub kernel_image_path: String,
    /// An initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line (default: minivmm's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `TokenBucket`: `size` tokens refilled over `refill_time` milliseconds,
/// plus a `one_time_burst` spent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds.
    pub size: u64,
    /// Extra tokens available once, at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

/// `RateLimiter`: bytes and operations, each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Requests (block) or frames (net) as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl From<TokenBucket> for TokenBucketConfig {
    fn from(b: TokenBucket) -> Self {
        TokenBucketConfig {
            size: b.size,
            one_time_burst: b.one_time_burst.unwrap_or(0),
            refill_time_ms: b.refill_time,
        }
    }
}

impl From<RateLimiter> for RateLimiterConfig {
    fn from(l: RateLimiter) -> Self {
        RateLimiterConfig {
            bandwidth: l.bandwidth.map(Into::into),
            ops: l.ops.map(Into::into),
        }
    }
}

/// `Drive`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's name in the API (and its virtio-blk serial).
    pub drive_id: String,
    /// The image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// The guest's root file system: first device, `root=` on the
    /// command line.
    pub is_root_device: bool,
    /// Read-only to the guest.
    #[serde(default)]
    pub is_read_only: bool,
    /// The root partition's UUID (`root=PARTUUID=`), for the root device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `Unsafe` (flushes ignored) or `Writeback` (flushes reach the disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Limits on the guest's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// `Sync` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// A vhost-user-block socket (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PartialDrive`: what PATCH may change after boot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive.
    pub drive_id: String,
    /// A new image file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// New limits.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `NetworkInterface`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's name in the API.
    pub iface_id: String,
    /// The host's TAP interface.
    pub host_dev_name: String,
    /// The guest's MAC address (default: a random local one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU offered to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u64>,
    /// Limits on frames to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on frames from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PartialNetworkInterface`: the rate limiters, after boot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit limits.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    /// All of guest RAM.
    #[default]
    Full,
    /// Only what changed since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// `SnapshotCreateParams`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where guest RAM is written.
    pub mem_file_path: String,
    /// Where the state is written.
    pub snapshot_path: String,
    /// Full (default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// `MemoryBackend.backend_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file, mapped.
    File,
    /// A userfaultfd handler's socket (refused: minivmm maps the file).
    Uffd,
}

/// `MemoryBackend`, with minivmm's `shared`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File (Uffd is refused).
    pub backend_type: MemoryBackendType,
    /// The memory file.
    pub backend_path: String,
    /// minivmm: map the file shared (the guest's writes reach it) instead
    /// of copy-on-write.
    #[serde(default)]
    pub shared: bool,
}

/// `NetworkOverride`: the TAP a saved interface uses after the load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as it was configured.
    pub iface_id: String,
    /// Its new TAP.
    pub host_dev_name: String,
}

/// `SnapshotLoadParams`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (deprecated in Firecracker for `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Where guest RAM comes from.
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated in Firecracker for `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Track dirty pages for diff snapshots of the restored VM.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Run the VM at once (else it waits paused for `PATCH /vm`).
    #[serde(default)]
    pub resume_vm: bool,
    /// TAPs to use instead of the saved ones.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Advance kvmclock by the wall time since the snapshot (refused).
    #[serde(default)]
    pub clock_realtime: bool,
    /// vsock socket override (refused: no vsock device).
    #[serde(default)]
    pub vsock_override: Option<serde_json::Value>,
    /// Huge pages for guest RAM: only `None`.
    #[serde(default)]
    pub huge_pages: Option<String>,
}

/// `InstanceActionInfo.action_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
}

/// `InstanceActionInfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `Vm.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs and the devices.
    Paused,
    /// Let them run again.
    Resumed,
}

/// `Vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The state wanted.
    pub state: VmState,
}

/// `Logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Error, Warning, Info, Debug, Trace or Off (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// A file or named pipe for the log (default: stderr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Prefix each line with its level.
    #[serde(default)]
    pub show_level: bool,
    /// Prefix each line with its source file and line.
    #[serde(default)]
    pub show_log_origin: bool,
    /// Only log records of this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `Metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// A file or named pipe the JSON lines go to.
    pub metrics_path: String,
}

/// `InstanceInfo`, the answer to `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// `minivmm`.
    pub app_name: String,
    /// `--id`.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// minivmm's version.
    pub vmm_version: String,
}

/// `FirecrackerVersion`, the answer to `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Version {
    /// minivmm's version (the field keeps Firecracker's name).
    pub firecracker_version: String,
}

/// `FullVmConfiguration`: `GET /vm/config`, and the `--config-file` format.
/// The sections minivmm has no device for are named so that a file using
/// them is refused with their name (`resources.rs`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfig {
    /// The kernel.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// The drives, in order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and RAM.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfig>,
    /// The network interfaces, in order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// The metrics file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Sections of Firecracker's minivmm has no device for, kept only to
    /// refuse them by name.
    #[serde(default, skip_serializing)]
    pub balloon: Option<serde_json::Value>,
    #[serde(rename = "cpu-config", default, skip_serializing)]
    #[allow(missing_docs)]
    pub cpu_config: Option<serde_json::Value>,
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    #[allow(missing_docs)]
    pub memory_hotplug: Option<serde_json::Value>,
    #[serde(rename = "mmds-config", default, skip_serializing)]
    #[allow(missing_docs)]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    #[allow(missing_docs)]
    pub pmem: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    #[allow(missing_docs)]
    pub vsock: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    #[allow(missing_docs)]
    pub entropy: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    #[allow(missing_docs)]
    pub serial: Option<serde_json::Value>,
}

impl FullVmConfig {
    /// The first section present that minivmm has no device for, by its
    /// JSON name (`null` counts as absent, as Firecracker writes it).
    pub fn unsupported_section(&self) -> Option<&'static str> {
        [
            ("balloon", &self.balloon),
            ("cpu-config", &self.cpu_config),
            ("memory-hotplug", &self.memory_hotplug),
            ("mmds-config", &self.mmds_config),
            ("pmem", &self.pmem),
            ("vsock", &self.vsock),
            ("entropy", &self.entropy),
            ("serial", &self.serial),
        ]
        .into_iter()
        .find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_null()))
        .map(|(name, _)| name)
    }
}

/// `Error`: every 4xx and 5xx body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong.
    pub fault_message: String,
}
