//! Firecracker's API (firecracker-microvm/firecracker,
//! `src/firecracker/swagger/firecracker.yaml`) and its `--config-file`:
//! orchestrators written for Firecracker drive minivmm unchanged.
//!
//! - `model.rs`: the request and response bodies;
//! - `router.rs`: method, path and body to a request, or a 400;
//! - `http.rs`: the HTTP/1.1 server on a Unix socket, on its own thread;
//! - `resources.rs`: the VM described before boot, to a `VmConfig`;
//! - `controller.rs`: requests applied, before boot and on the running VM's
//!   event loop (pause, resume, device updates, actions);
//! - `metrics.rs`: the metrics file, JSON lines as Firecracker writes them.

pub mod controller;
pub mod http;
pub mod metrics;
pub mod model;
pub mod resources;
pub mod router;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use controller::{ControlEvents, Controller, Outcome};
use http::{ApiChannel, HttpMetrics, Response};
use model::FullVmConfig;
use resources::VmResources;

use crate::exit::VmExit;
use crate::run::{self, Subscriber, VmConfig, Vmm};
use crate::snapshot::restore;

/// How minivmm was asked to get its VM.
#[derive(Debug, Default)]
pub struct Launch {
    /// `--api-sock`.
    pub api_sock: Option<PathBuf>,
    /// `--config-file`.
    pub config_file: Option<PathBuf>,
    /// `--id`.
    pub id: String,
    /// `--boot-timer` (for a VM from the config file or the API).
    pub boot_timer: bool,
    /// The VM the command-line flags describe (`--kernel` ...), started at
    /// once.
    pub flags: Option<VmConfig>,
    /// `--restore DIR`: the snapshot to restore at once.
    pub restore: Option<restore::Params>,
}

/// Why minivmm could not start or run the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API socket could not be bound.
    #[error("Cannot listen on the API socket {0}")]
    Socket(PathBuf, #[source] std::io::Error),
    /// The config file could not be read.
    #[error("Cannot read the config file {0}")]
    ReadConfig(PathBuf, #[source] std::io::Error),
    /// The config file is not a valid configuration.
    #[error("Invalid config file {0}: {1}")]
    Config(PathBuf, String),
    /// Building or running the VM failed.
    #[error(transparent)]
    Run(#[from] run::Error),
    /// The snapshot could not be restored.
    #[error(transparent)]
    Restore(#[from] restore::Error),
}

/// Serves the API (if asked), builds the VM from the flags, the config file
/// or the API's `InstanceStart`, and runs it until it stops.
pub fn launch(launch: Launch) -> Result<VmExit, Error> {
    let api = match &launch.api_sock {
        Some(path) => Some(http::spawn(path).map_err(|e| Error::Socket(path.clone(), e))?),
        None => None,
    };
    let http_metrics = api
        .as_ref()
        .map_or_else(|| Arc::new(HttpMetrics::default()), |a| a.metrics.clone());
    let (mut controller, vmm) = match (&launch.config_file, launch.flags, &launch.restore) {
        (_, _, Some(params)) => {
            let vmm = restore::restore(params)?;
            (restored_controller(&launch.id, &vmm, http_metrics), vmm)
        }
        (Some(path), _, None) => {
            let controller = from_config_file(path, launch.id.clone(), http_metrics)?;
            let mut config = controller
                .resources()
                .vm_config()
                .map_err(|e| Error::Config(path.clone(), e.message))?;
            config.boot_timer = launch.boot_timer;
            let vmm = Vmm::new(&config)?;
            (controller, vmm)
        }
        (None, Some(flags), None) => {
            let resources = VmResources::from_vm_config(&flags);
            let vmm = Vmm::new(&flags)?;
            (
                Controller::new(launch.id.clone(), resources, http_metrics),
                vmm,
            )
        }
        (None, None, None) => {
            let Some(api) = &api else {
                return Err(Error::Config(
                    PathBuf::new(),
                    "give --kernel, --config-file or --api-sock".into(),
                ));
            };
            let mut controller =
                Controller::new(launch.id.clone(), VmResources::default(), http_metrics);
            let vmm = serve_until_start(&mut controller, api, launch.boot_timer)?;
            (controller, vmm)
        }
    };
    let exit = vmm.run_with(move |running| {
        controller.started(running);
        let control: Subscriber = Arc::new(Mutex::new(ControlEvents::new(controller, api)));
        vec![control]
    });
    // The socket goes with the VM (the server thread ends with the process).
    if let Some(path) = &launch.api_sock {
        let _ = std::fs::remove_file(path);
    }
    Ok(exit?)
}

/// The controller of a restored VM, its resources read off the VM.
fn restored_controller(id: &str, vmm: &Vmm, http: Arc<HttpMetrics>) -> Controller {
    let config = crate::lock(&vmm.machine.config).clone();
    Controller::new(id.to_owned(), VmResources::from_vm_config(&config), http)
}

/// The controller of the VM a config file describes, its logger and
/// metrics applied.
fn from_config_file(
    path: &std::path::Path,
    id: String,
    http_metrics: Arc<HttpMetrics>,
) -> Result<Controller, Error> {
    let text = std::fs::read(path).map_err(|e| Error::ReadConfig(path.to_owned(), e))?;
    let bad = |m: String| Error::Config(path.to_owned(), m);
    let config: FullVmConfig = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let mut resources = VmResources::from_config(&config).map_err(|e| bad(e.message))?;
    let (logger, metrics) = (resources.logger.take(), resources.metrics.take());
    let mut controller = Controller::new(id, resources, http_metrics);
    if let Some(logger) = logger {
        controller.set_logger(logger).map_err(bad)?;
    }
    if let Some(metrics) = metrics {
        controller.set_metrics(metrics).map_err(bad)?;
    }
    Ok(controller)
}

/// Answers API requests until an `InstanceStart` builds the VM.
fn serve_until_start(
    controller: &mut Controller,
    api: &ApiChannel,
    boot_timer: bool,
) -> Result<Vmm, Error> {
    loop {
        let Ok(call) = api.calls.recv() else {
            return Err(Error::Config(
                PathBuf::new(),
                "the API server stopped".into(),
            ));
        };
        let response = match controller.handle(call.request) {
            Outcome::Reply(r) => r,
            Outcome::Load(params) => match restore::restore(&params) {
                Ok(vmm) => {
                    let config = crate::lock(&vmm.machine.config).clone();
                    controller.set_resources(VmResources::from_vm_config(&config));
                    let _ = call.reply.send(Response::no_content());
                    return Ok(vmm);
                }
                Err(e) => Response::fault(
                    400,
                    &format!("Cannot load the snapshot: {}", crate::error_chain(&e)),
                ),
            },
            Outcome::Start => match controller.resources().vm_config() {
                Err(e) => e.into(),
                Ok(mut config) => match Vmm::new(&{
                    config.boot_timer = boot_timer;
                    config
                }) {
                    Ok(vmm) => {
                        let _ = call.reply.send(Response::no_content());
                        return Ok(vmm);
                    }
                    Err(e) => Response::fault(
                        400,
                        &format!("Cannot start the microVM: {}", crate::error_chain(&e)),
                    ),
                },
            },
        };
        let _ = call.reply.send(response);
    }
}
