//! From an HTTP method, path and body to a [`Request`] — or to the 400 and
//! fault message Firecracker's API answers a bad one with. Pure: no state,
//! no I/O, so unit tests and the `api_request` fuzz target drive it alone.
//!
//! Paths and methods are the spec's (`paths` in Firecracker's
//! `firecracker.yaml`); the endpoints of devices minivmm does not have are
//! answered with a message naming them.

use serde::de::DeserializeOwned;

use super::model::*;

/// A well-formed API request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Request {
    GetInstanceInfo,
    GetVersion,
    GetVmConfig,
    GetMachineConfig,
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigPatch),
    PutBootSource(BootSource),
    PutDrive(Drive),
    PatchDrive(PartialDrive),
    PutNetworkInterface(NetworkInterface),
    PatchNetworkInterface(PartialNetworkInterface),
    Action(ActionType),
    PatchVm(VmState),
    PutLogger(Logger),
    PutMetrics(Metrics),
    CreateSnapshot(SnapshotCreateParams),
    LoadSnapshot(SnapshotLoadParams),
}

/// The HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Method {
    Get,
    Put,
    Patch,
    Other,
}

impl Method {
    /// The method of a request line's first word.
    pub fn parse(method: &str) -> Method {
        match method {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }
}

/// A refused request: its status and fault message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (400 for every client error, as Firecracker answers).
    pub status: u16,
    /// The `fault_message`.
    pub message: String,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }
}

/// Endpoints of Firecracker's that minivmm does not have, and what they are.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("balloon", "balloon devices"),
    ("vsock", "vsock devices"),
    ("mmds", "the microVM metadata service (MMDS)"),
    ("entropy", "entropy devices"),
    ("hotplug", "memory hotplug"),
    ("pmem", "pmem devices"),
    ("cpu-config", "custom CPU templates"),
    ("serial", "serial console configuration"),
];

/// Routes one request. `body` is the raw request body (empty when none).
pub fn route(method: Method, path: &str, body: &[u8]) -> Result<Request, ApiError> {
    // The query string plays no part in any endpoint.
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let parts: Vec<&str> = path
        .strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(first) = parts.first()
        && let Some((name, what)) = UNSUPPORTED.iter().find(|(name, _)| name == first)
    {
        return Err(ApiError::bad_request(format!(
            "minivmm does not support /{name} ({what})"
        )));
    }
    use Method::*;
    let request = match (method, parts.as_slice()) {
        (Get, []) => Request::GetInstanceInfo,
        (Get, ["version"]) => Request::GetVersion,
        (Get, ["vm", "config"]) => Request::GetVmConfig,
        (Get, ["machine-config"]) => Request::GetMachineConfig,
        (Put, ["machine-config"]) => Request::PutMachineConfig(parse(body)?),
        (Patch, ["machine-config"]) => Request::PatchMachineConfig(parse(body)?),
        (Put, ["boot-source"]) => Request::PutBootSource(parse(body)?),
        (Put, ["drives", id]) => {
            let drive: Drive = parse(body)?;
            same_id(id, &drive.drive_id)?;
            Request::PutDrive(drive)
        }
        (Patch, ["drives", id]) => {
            let drive: PartialDrive = parse(body)?;
            same_id(id, &drive.drive_id)?;
            Request::PatchDrive(drive)
        }
        (Put, ["network-interfaces", id]) => {
            let iface: NetworkInterface = parse(body)?;
            same_id(id, &iface.iface_id)?;
            Request::PutNetworkInterface(iface)
        }
        (Patch, ["network-interfaces", id]) => {
            let iface: PartialNetworkInterface = parse(body)?;
            same_id(id, &iface.iface_id)?;
            Request::PatchNetworkInterface(iface)
        }
        (Put, ["actions"]) => Request::Action(parse::<InstanceActionInfo>(body)?.action_type),
        (Patch, ["vm"]) => Request::PatchVm(parse::<Vm>(body)?.state),
        (Put, ["logger"]) => Request::PutLogger(parse(body)?),
        (Put, ["metrics"]) => Request::PutMetrics(parse(body)?),
        (Put, ["snapshot", "create"]) => Request::CreateSnapshot(parse(body)?),
        (Put, ["snapshot", "load"]) => Request::LoadSnapshot(parse(body)?),
        _ => {
            let shown: String = path.chars().take(64).collect();
            return Err(ApiError::bad_request(format!(
                "Invalid request method and/or path: {} {shown}",
                match method {
                    Get => "GET",
                    Put => "PUT",
                    Patch => "PATCH",
                    Other => "(unsupported method)",
                }
            )));
        }
    };
    Ok(request)
}

/// A JSON body of type `T`, or a 400 saying what is wrong with it.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("The request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid: {e}")))
}

/// The id in the path must be the one in the body (Firecracker's rule).
fn same_id(path: &str, body: &str) -> Result<(), ApiError> {
    if path != body {
        let cut = |s: &str| s.chars().take(64).collect::<String>();
        return Err(ApiError::bad_request(format!(
            "The id from the path [{}] does not match the id from the body [{}]",
            cut(path),
            cut(body)
        )));
    }
    if body.is_empty() || body.len() > 64 || !body.bytes().all(valid_id_byte) {
        return Err(ApiError::bad_request(
            "An id is 1 to 64 characters: letters, digits and _",
        ));
    }
    Ok(())
}

/// Firecracker's ids: alphanumeric and `_`.
fn valid_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &str, body: &str) -> Result<Request, ApiError> {
        route(Method::Put, path, body.as_bytes())
    }

    fn fault(r: Result<Request, ApiError>) -> String {
        let e = r.expect_err("accepted");
        assert_eq!(e.status, 400);
        e.message
    }

    #[test]
    fn get_endpoints_route_without_a_body() {
        assert_eq!(route(Method::Get, "/", b""), Ok(Request::GetInstanceInfo));
        assert_eq!(route(Method::Get, "/version", b""), Ok(Request::GetVersion));
        assert_eq!(
            route(Method::Get, "/vm/config", b""),
            Ok(Request::GetVmConfig)
        );
        assert_eq!(
            route(Method::Get, "/machine-config?x=1", b""),
            Ok(Request::GetMachineConfig)
        );
    }

    #[test]
    fn machine_config_takes_the_required_fields_and_defaults_the_rest() {
        assert_eq!(
            put(
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#
            ),
            Ok(Request::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..MachineConfig::default()
            }))
        );
        assert!(fault(put("/machine-config", r#"{"vcpu_count": 2}"#)).contains("mem_size_mib"));
        assert!(fault(put("/machine-config", r#"{"mem_size_mib": 2}"#)).contains("vcpu_count"));
        assert!(
            fault(put(
                "/machine-config",
                r#"{"vcpu_count": "2", "mem_size_mib": 256}"#
            ))
            .contains("invalid type")
        );
        assert!(
            fault(put(
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256, "cpus": 1}"#
            ))
            .contains("unknown field `cpus`")
        );
        assert!(
            fault(put(
                "/machine-config",
                r#"{"vcpu_count": -1, "mem_size_mib": 256}"#
            ))
            .contains("invalid value")
        );
    }

    #[test]
    fn drive_ids_must_match_the_path_and_be_simple() {
        let body = r#"{"drive_id": "rootfs", "path_on_host": "/a", "is_root_device": true}"#;
        assert!(matches!(
            put("/drives/rootfs", body),
            Ok(Request::PutDrive(_))
        ));
        assert!(fault(put("/drives/other", body)).contains("does not match"));
        let odd = r#"{"drive_id": "a b", "path_on_host": "/a", "is_root_device": true}"#;
        assert!(fault(put("/drives/a b", odd)).contains("letters, digits"));
        assert!(
            fault(put("/drives/rootfs", r#"{"drive_id": "rootfs"}"#)).contains("is_root_device")
        );
    }

    #[test]
    fn actions_and_vm_state_are_the_spec_enums() {
        assert_eq!(
            put("/actions", r#"{"action_type": "InstanceStart"}"#),
            Ok(Request::Action(ActionType::InstanceStart))
        );
        assert!(fault(put("/actions", r#"{"action_type": "Reboot"}"#)).contains("unknown variant"));
        assert_eq!(
            route(Method::Patch, "/vm", br#"{"state": "Paused"}"#),
            Ok(Request::PatchVm(VmState::Paused))
        );
        assert!(fault(route(Method::Patch, "/vm", br#"{"state": "Stopped"}"#)).contains("variant"));
    }

    #[test]
    fn unsupported_endpoints_are_named() {
        for (path, name) in [
            ("/balloon", "balloon"),
            ("/balloon/statistics", "balloon"),
            ("/vsock", "vsock"),
            ("/mmds/config", "MMDS"),
            ("/entropy", "entropy"),
            ("/hotplug/memory", "hotplug"),
        ] {
            assert!(fault(put(path, "{}")).contains(name), "{path}");
        }
    }

    #[test]
    fn snapshot_create_takes_firecrackers_body() {
        let body = r#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#;
        assert_eq!(
            put("/snapshot/create", body),
            Ok(Request::CreateSnapshot(SnapshotCreateParams {
                mem_file_path: "/m".into(),
                snapshot_path: "/s".into(),
                snapshot_type: SnapshotType::Full,
            }))
        );
        assert!(
            fault(put("/snapshot/create", r#"{"snapshot_path": "/s"}"#)).contains("mem_file_path")
        );
        assert!(
            fault(put(
                "/snapshot/create",
                r#"{"snapshot_path": "/s", "mem_file_path": "/m", "version": "1"}"#
            ))
            .contains("unknown field")
        );
    }

    #[test]
    fn snapshot_load_takes_firecrackers_body() {
        let body = r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"},
                       "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}"#;
        let Ok(Request::LoadSnapshot(p)) = put("/snapshot/load", body) else {
            panic!("not a load");
        };
        assert_eq!(p.snapshot_path, "/s");
        assert!(p.resume_vm && !p.track_dirty_pages);
        assert_eq!(
            p.mem_backend,
            Some(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/m".into(),
                shared: false,
            })
        );
        assert_eq!(p.network_overrides[0].host_dev_name, "tap1");
        assert!(
            fault(put("/snapshot/load", r#"{"mem_file_path": "/m"}"#)).contains("snapshot_path")
        );
        let bad_type = r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}}"#;
        assert!(fault(put("/snapshot/load", bad_type)).contains("variant"));
    }

    #[test]
    fn unknown_paths_methods_and_bodies_are_400() {
        assert!(fault(put("/nowhere", "{}")).contains("Invalid request"));
        assert!(fault(route(Method::Other, "/", b"")).contains("Invalid request"));
        assert!(fault(route(Method::Get, "/actions", b"")).contains("Invalid request"));
        assert!(fault(put("/boot-source", "")).contains("needs a JSON body"));
        assert!(fault(put("/boot-source", "\u{0}\u{1}")).contains("not valid"));
        assert!(fault(put("/boot-source", "[1,2]")).contains("not valid"));
    }
}
