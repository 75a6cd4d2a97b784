//! Requests applied to the VM: before boot to its [`VmResources`], after
//! boot to the running VM's handles ([`Running`]), with Firecracker's rules
//! for which calls each phase allows. After boot the controller lives on
//! the event loop ([`ControlEvents`]): woken by the API server's eventfd, it
//! answers at most [`BUDGET`] requests before the loop serves the devices
//! again, and its timerfd writes the metrics every `metrics::PERIOD`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use devices::disk::{DiskBackend, RawFile};
use devices::virtio::DeviceUpdate;
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{Map, Value, json};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::http::{ApiChannel, HttpMetrics, Response};
use super::metrics::{self, MetricsFile};
use super::model::*;
use super::resources::VmResources;
use super::router::Request;
use crate::lock;
use crate::run::Running;
use crate::snapshot::create::Kind;
use crate::snapshot::restore;
use crate::virtio::DeviceHandle;

/// What `PUT /snapshot/load` asks for, or why minivmm cannot do it.
fn load_params(p: SnapshotLoadParams) -> Result<restore::Params, String> {
    let (mem_path, shared) = match (p.mem_backend, p.mem_file_path) {
        (Some(_), Some(_)) => {
            return Err("Give either mem_backend or mem_file_path, not both".into());
        }
        (None, None) => return Err("Give mem_backend (or the deprecated mem_file_path)".into()),
        (None, Some(path)) => (path, false),
        (Some(b), None) if b.backend_type == MemoryBackendType::Uffd => {
            return Err("minivmm does not support Uffd memory backends; use File".into());
        }
        (Some(b), None) => (b.backend_path, b.shared),
    };
    if p.clock_realtime {
        return Err("clock_realtime is not supported".into());
    }
    if p.vsock_override.is_some() {
        return Err("minivmm has no vsock device (vsock_override)".into());
    }
    if p.huge_pages.as_deref().is_some_and(|h| h != "None") {
        return Err("minivmm does not support huge pages (huge_pages must be None)".into());
    }
    Ok(restore::Params {
        state_path: p.snapshot_path.into(),
        mem_path: mem_path.into(),
        shared,
        network_overrides: p
            .network_overrides
            .into_iter()
            .map(|o| (o.iface_id, o.host_dev_name))
            .collect(),
        resume: p.resume_vm,
        track_dirty_pages: p.track_dirty_pages || p.enable_diff_snapshots,
    })
}

/// Requests answered per wake-up of the event loop.
pub const BUDGET: usize = 16;

/// What the caller must do after a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send this answer.
    Reply(Response),
    /// `InstanceStart` before boot: build and start the VM from
    /// [`Controller::resources`], then answer.
    Start,
    /// `PUT /snapshot/load` before boot: restore this snapshot, then answer.
    Load(restore::Params),
}

/// Counters of the `vmm` metrics section.
#[derive(Debug, Default)]
struct VmmCounters {
    pauses: u64,
    resumes: u64,
    ctrl_alt_del: u64,
    snapshots: u64,
}

/// The API's state: the VM's description, and once it runs, its handles.
#[derive(Debug)]
pub struct Controller {
    id: String,
    resources: VmResources,
    metrics: Option<MetricsFile>,
    http: Arc<HttpMetrics>,
    running: Option<Running>,
    counters: VmmCounters,
}

const AFTER_START: &str = "The requested operation is not supported after starting the microVM";
const BEFORE_START: &str = "The requested operation is not supported before starting the microVM";

fn fault(message: &str) -> Outcome {
    Outcome::Reply(Response::fault(400, message))
}

fn done() -> Outcome {
    Outcome::Reply(Response::no_content())
}

impl Controller {
    /// A controller for VM `id` described by `resources`; `http` counts the
    /// server's requests (a fresh one without an API socket).
    pub fn new(id: String, resources: VmResources, http: Arc<HttpMetrics>) -> Controller {
        Controller {
            id,
            resources,
            metrics: None,
            http,
            running: None,
            counters: VmmCounters::default(),
        }
    }

    /// The VM's description.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// The VM's description replaced (by a restored VM's).
    pub fn set_resources(&mut self, resources: VmResources) {
        self.resources = resources;
    }

    /// The VM started: later requests reach `running`.
    pub fn started(&mut self, running: Running) {
        self.running = Some(running);
    }

    /// Applies `PUT /logger` (also from a config file).
    pub fn set_logger(&mut self, logger: Logger) -> Result<(), String> {
        let level = match logger
            .level
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("info") => log::LevelFilter::Info,
            Some("error") => log::LevelFilter::Error,
            Some("warning" | "warn") => log::LevelFilter::Warn,
            Some("debug") => log::LevelFilter::Debug,
            Some("trace") => log::LevelFilter::Trace,
            Some("off") => log::LevelFilter::Off,
            Some(_) => {
                return Err("level is one of Error, Warning, Info, Debug, Trace, Off".to_owned());
            }
        };
        let file = match &logger.log_path {
            Some(path) => Some(open_output(path).map_err(|e| format!("log_path {path}: {e}"))?),
            None => None,
        };
        crate::logger::configure(
            file,
            logger.show_level,
            logger.show_log_origin,
            logger.module.clone(),
        );
        log::set_max_level(level);
        self.resources.logger = Some(logger);
        Ok(())
    }

    /// Applies `PUT /metrics` (also from a config file): once only.
    pub fn set_metrics(&mut self, m: Metrics) -> Result<(), String> {
        if self.metrics.is_some() {
            return Err("Reinitialization of metrics not allowed".to_owned());
        }
        let file = MetricsFile::open(Path::new(&m.metrics_path))
            .map_err(|e| format!("metrics_path {}: {e}", m.metrics_path))?;
        self.metrics = Some(file);
        self.resources.metrics = Some(m);
        Ok(())
    }

    /// Handles one request.
    pub fn handle(&mut self, request: Request) -> Outcome {
        match request {
            Request::GetInstanceInfo => Outcome::Reply(Response::json(&self.instance_info())),
            Request::GetVersion => Outcome::Reply(Response::json(&Version {
                firecracker_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
            Request::GetVmConfig => Outcome::Reply(Response::json(&self.resources.full_config())),
            Request::GetMachineConfig => Outcome::Reply(Response::json(&self.resources.machine)),
            Request::PutLogger(logger) => match self.set_logger(logger) {
                Ok(()) => done(),
                Err(e) => fault(&e),
            },
            Request::PutMetrics(m) => match self.set_metrics(m) {
                Ok(()) => done(),
                Err(e) => fault(&e),
            },
            Request::Action(ActionType::FlushMetrics) => match self.flush_metrics() {
                Ok(()) => done(),
                Err(e) => fault(&e),
            },
            request if self.running.is_none() => self.before_start(request),
            request => self.after_start(request),
        }
    }

    fn before_start(&mut self, request: Request) -> Outcome {
        let result = match request {
            Request::PutMachineConfig(m) => self.resources.set_machine(m),
            Request::PatchMachineConfig(m) => self.resources.patch_machine(m),
            Request::PutBootSource(b) => self.resources.set_boot_source(b),
            Request::PutDrive(d) => self.resources.put_drive(d),
            Request::PutNetworkInterface(n) => self.resources.put_net(n),
            Request::Action(ActionType::InstanceStart) => return Outcome::Start,
            Request::LoadSnapshot(p) => {
                let configured = VmResources {
                    logger: None,
                    metrics: None,
                    ..self.resources.clone()
                } != VmResources::default();
                if configured {
                    return fault(
                        "Loading a snapshot is only allowed before any resource but the logger and metrics is configured",
                    );
                }
                return match load_params(p) {
                    Ok(params) => Outcome::Load(params),
                    Err(e) => fault(&e),
                };
            }
            _ => return fault(BEFORE_START),
        };
        match result {
            Ok(()) => done(),
            Err(e) => Outcome::Reply(e.into()),
        }
    }

    fn after_start(&mut self, request: Request) -> Outcome {
        let Some(running) = &self.running else {
            return fault(BEFORE_START);
        };
        match request {
            Request::PatchVm(VmState::Paused) => {
                if !running.pause() {
                    return Outcome::Reply(Response::fault(
                        500,
                        "The vCPUs did not stop within 5 s",
                    ));
                }
                self.counters.pauses += 1;
                done()
            }
            Request::PatchVm(VmState::Resumed) => {
                running.resume();
                self.counters.resumes += 1;
                done()
            }
            Request::Action(ActionType::SendCtrlAltDel) => {
                let mut i8042 = lock(&running.i8042);
                if !i8042.ctrl_alt_del() {
                    return fault("The guest has not read the previous key presses yet");
                }
                self.counters.ctrl_alt_del += 1;
                done()
            }
            Request::Action(ActionType::InstanceStart) => fault("The microVM is already running"),
            Request::PatchDrive(d) => self.patch_drive(d),
            Request::PatchNetworkInterface(n) => self.patch_net(n),
            Request::CreateSnapshot(p) => self.create_snapshot(p),
            _ => fault(AFTER_START),
        }
    }

    /// `PATCH /drives/{id}` after boot: a new backing file (opened with the
    /// drive's read-only setting; the guest sees a configuration change if
    /// the capacity differs) and/or new limits, applied between requests.
    fn patch_drive(&mut self, patch: PartialDrive) -> Outcome {
        let index = match self.resources.check_drive_patch(&patch) {
            Ok(index) => index,
            Err(e) => return Outcome::Reply(e.into()),
        };
        let read_only = self.resources.ordered_drives()[index].is_read_only;
        let disk = match &patch.path_on_host {
            Some(path) => match RawFile::open(Path::new(path), read_only) {
                Ok(file) => Some(Box::new(file) as Box<dyn DiskBackend>),
                Err(e) => return fault(&format!("path_on_host: {}", crate::error_chain(&e))),
            },
            None => None,
        };
        let update = DeviceUpdate::Block {
            disk,
            rate_limiter: patch.rate_limiter.map(Into::into),
        };
        let handle = self
            .running
            .as_ref()
            .and_then(|r| r.devices.blocks.get(index));
        match update_device(handle, update) {
            Ok(()) => {
                if let Some(r) = &self.running {
                    let mut config = lock(&r.machine.config);
                    let disk = &mut config.disks[index];
                    if let Some(path) = &patch.path_on_host {
                        disk.path = path.into();
                    }
                    if let Some(limiter) = patch.rate_limiter {
                        disk.rate_limiter = Some(limiter.into());
                    }
                }
                self.resources.record_drive_patch(patch);
                done()
            }
            Err(e) => fault(&e),
        }
    }

    /// `PUT /snapshot/create` of the paused VM, full or diff.
    fn create_snapshot(&mut self, params: SnapshotCreateParams) -> Outcome {
        let Some(running) = &self.running else {
            return fault(BEFORE_START);
        };
        let kind = match params.snapshot_type {
            SnapshotType::Full => Kind::Full,
            SnapshotType::Diff => Kind::Diff,
        };
        let result = crate::snapshot::create::create(
            running,
            Path::new(&params.snapshot_path),
            Path::new(&params.mem_file_path),
            kind,
        );
        match result {
            Ok(written) => {
                log::info!(
                    "{kind:?} snapshot: {} KiB of RAM written to {}",
                    written >> 10,
                    params.mem_file_path
                );
                self.counters.snapshots += 1;
                done()
            }
            Err(e) => fault(&crate::error_chain(&e)),
        }
    }

    /// `PATCH /network-interfaces/{id}` after boot: new limits.
    fn patch_net(&mut self, patch: PartialNetworkInterface) -> Outcome {
        let index = match self.resources.check_net_patch(&patch) {
            Ok(index) => index,
            Err(e) => return Outcome::Reply(e.into()),
        };
        let update = DeviceUpdate::Net {
            rx_rate_limiter: patch.rx_rate_limiter.map(Into::into),
            tx_rate_limiter: patch.tx_rate_limiter.map(Into::into),
        };
        let handle = self
            .running
            .as_ref()
            .and_then(|r| r.devices.nets.get(index));
        match update_device(handle, update) {
            Ok(()) => {
                if let Some(r) = &self.running {
                    let net = &mut lock(&r.machine.config).nets[index];
                    if let Some(limiter) = patch.rx_rate_limiter {
                        net.rx_rate_limiter = Some(limiter.into());
                    }
                    if let Some(limiter) = patch.tx_rate_limiter {
                        net.tx_rate_limiter = Some(limiter.into());
                    }
                }
                self.resources.record_net_patch(patch);
                done()
            }
            Err(e) => fault(&e),
        }
    }

    fn instance_info(&self) -> InstanceInfo {
        let state = match &self.running {
            None => "Not started",
            Some(r) if r.is_paused() => "Paused",
            Some(_) => "Running",
        };
        InstanceInfo {
            app_name: "minivmm".into(),
            id: self.id.clone(),
            state: state.into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Writes a metrics line now.
    pub fn flush_metrics(&mut self) -> Result<(), String> {
        let totals = self.totals();
        let file = self
            .metrics
            .as_mut()
            .ok_or("The metrics system is not initialized (PUT /metrics)")?;
        file.write(totals)
            .map_err(|e| format!("Cannot write the metrics: {e}"))
    }

    /// The counters now, by section.
    fn totals(&self) -> Map<String, Value> {
        let mut out = Map::new();
        let h = &self.http;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        out.insert(
            "api_server".into(),
            json!({
                "ok": get(&h.ok),
                "client_errors": get(&h.client_errors),
                "server_errors": get(&h.server_errors),
                "dropped_connections": get(&h.dropped_connections),
            }),
        );
        let (written, lost) = self
            .metrics
            .as_ref()
            .map_or((0, 0), |m| (m.written, m.lost));
        out.insert(
            "vmm".into(),
            json!({
                "pauses": self.counters.pauses,
                "resumes": self.counters.resumes,
                "ctrl_alt_del": self.counters.ctrl_alt_del,
                "snapshots": self.counters.snapshots,
                "metrics_lines": written,
                "metrics_lines_lost": lost,
            }),
        );
        let Some(running) = &self.running else {
            return out;
        };
        let e = &running.buses.exits;
        out.insert(
            "vcpu".into(),
            json!({
                "exit_io_in": get(&e.io_in),
                "exit_io_out": get(&e.io_out),
                "exit_mmio_read": get(&e.mmio_read),
                "exit_mmio_write": get(&e.mmio_write),
                "exit_hlt": get(&e.hlt),
                "exit_interrupted": get(&e.interrupted),
                "exit_other": get(&e.other),
            }),
        );
        let drives = self.resources.ordered_drives();
        let mut blocks = Vec::new();
        for (i, b) in running.devices.blocks.iter().enumerate() {
            let mut s = metrics::section(&b.metrics.snapshot(), "");
            let transport = b
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics();
            s.extend(metrics::section(&transport, "transport_"));
            let name = drives
                .get(i)
                .map_or_else(|| format!("drive{i}"), |d| d.drive_id.clone());
            blocks.push((format!("block_{name}"), s));
        }
        let mut nets = Vec::new();
        for (i, n) in running.devices.nets.iter().enumerate() {
            let mut s = metrics::section(&n.metrics.snapshot(), "");
            let transport = n
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics();
            s.extend(metrics::section(&transport, "transport_"));
            let name = self
                .resources
                .nets
                .get(i)
                .map_or_else(|| format!("net{i}"), |n| n.iface_id.clone());
            nets.push((format!("net_{name}"), s));
        }
        out.insert(
            "block".into(),
            Value::Object(metrics::sum(blocks.iter().map(|(_, s)| s))),
        );
        out.insert(
            "net".into(),
            Value::Object(metrics::sum(nets.iter().map(|(_, s)| s))),
        );
        for (name, s) in blocks.into_iter().chain(nets) {
            out.insert(name, Value::Object(s));
        }
        out
    }
}

/// Applies `update` to the device of `handle` between its batches (the
/// event loop, which runs them, is the thread calling this).
fn update_device<M>(handle: Option<&DeviceHandle<M>>, update: DeviceUpdate) -> Result<(), String> {
    let handle = handle.ok_or("The microVM has no such device")?;
    let mut transport = handle.transport.lock().unwrap_or_else(|p| p.into_inner());
    transport
        .update_device(update)
        .map(|_| ())
        .map_err(|e| crate::error_chain(&e))
}

/// Opens a log file or named pipe for appending, without waiting for a
/// pipe's reader.
fn open_output(path: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Event data of the API's wake event.
const API: u32 = 0;
/// Event data of the metrics timer.
const TIMER: u32 = 1;

/// The controller on the running VM's event loop.
#[derive(Debug)]
pub struct ControlEvents {
    controller: Controller,
    api: Option<ApiChannel>,
    timer: Option<TimerFd>,
}

impl ControlEvents {
    /// Serves `api` (if any) and writes the metrics every period.
    pub fn new(controller: Controller, api: Option<ApiChannel>) -> ControlEvents {
        let timer = match TimerFd::new() {
            Ok(mut t) => match t.reset(metrics::PERIOD, Some(metrics::PERIOD)) {
                Ok(()) => Some(t),
                Err(e) => {
                    log::warn!("no periodic metrics: {e}");
                    None
                }
            },
            Err(e) => {
                log::warn!("no periodic metrics: {e}");
                None
            }
        };
        ControlEvents {
            controller,
            api,
            timer,
        }
    }

    fn serve_api(&mut self) {
        let Some(api) = &self.api else { return };
        let _ = api.wake.read();
        for _ in 0..BUDGET {
            let Ok(call) = api.calls.try_recv() else {
                return;
            };
            let response = match self.controller.handle(call.request) {
                Outcome::Reply(r) => r,
                Outcome::Start => Response::fault(400, "The microVM is already running"),
                Outcome::Load(_) => Response::fault(400, AFTER_START),
            };
            let _ = call.reply.send(response);
        }
        // More may be waiting: come back after the devices had their turn.
        let _ = api.wake.write(1);
    }
}

impl Drop for ControlEvents {
    /// The last metrics line, as the VM stops (the event loop drops its
    /// subscribers before the devices go).
    fn drop(&mut self) {
        if self.controller.metrics.is_some() {
            let _ = self.controller.flush_metrics();
        }
    }
}

impl MutEventSubscriber for ControlEvents {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(api) = &self.api
            && let Err(e) = ops.add(Events::with_data(&*api.wake, API, EventSet::IN))
        {
            log::error!("cannot watch the API: {e:?}");
        }
        if let Some(timer) = &self.timer
            && let Err(e) = ops.add(Events::with_data(timer, TIMER, EventSet::IN))
        {
            log::error!("cannot watch the metrics timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        match events.data() {
            API => self.serve_api(),
            _ => {
                if let Some(t) = &mut self.timer {
                    let _ = t.wait();
                }
                if self.controller.metrics.is_some() {
                    let _ = self.controller.flush_metrics();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> Result<restore::Params, String> {
        load_params(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn load_params_take_either_memory_field_and_refuse_what_minivmm_lacks() {
        let p = params(
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m", "shared": true},
                "track_dirty_pages": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "t"}]}"#,
        )
        .unwrap();
        assert_eq!(
            (p.state_path.to_str(), p.mem_path.to_str(), p.shared),
            (Some("/s"), Some("/m"), true)
        );
        assert!(p.track_dirty_pages && !p.resume);
        assert_eq!(p.network_overrides, [("eth0".into(), "t".into())]);
        let old = params(
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": true}"#,
        );
        assert!(old.is_ok_and(|p| p.track_dirty_pages && !p.shared));
        for (body, why) in [
            (r#"{"snapshot_path": "/s"}"#, "mem_backend"),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
                "not both",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}"#,
                "Uffd",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "clock_realtime": true}"#,
                "clock_realtime",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "vsock_override": {"uds_path": "v"}}"#,
                "vsock",
            ),
            (
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "huge_pages": "2M"}"#,
                "huge pages",
            ),
        ] {
            let e = params(body).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }
}
