//! Fuzz target `api_request`: bytes as what an API client sends on the
//! socket, through minivmm's HTTP framing (`api::http::frame`), its router
//! (`api::router::route`) and the pre-boot controller (`api::controller`),
//! request after request as on one keep-alive connection.
//!
//! Invariants: no panic; a framed request lies within the bytes and moves
//! the connection forward; every refusal is a 4xx with a JSON
//! `fault_message`; the controller's VM description stays valid
//! (`vm_config` either builds or refuses, never panics, vCPUs and RAM in
//! range). `PUT /logger` and `PUT /metrics` are routed but not applied:
//! they open files named by the input.

use std::sync::Arc;

use vmm::api::controller::{Controller, Outcome};
use vmm::api::http::{Frame, HttpMetrics, Response, frame};
use vmm::api::resources::VmResources;
use vmm::api::router::{Request, route};

/// Requests per input.
const MAX_REQUESTS: usize = 64;

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let mut controller = Controller::new(
        "fuzz".into(),
        VmResources::default(),
        Arc::new(HttpMetrics::default()),
    );
    let mut rest = data;
    for _ in 0..MAX_REQUESTS {
        if rest.is_empty() {
            return;
        }
        let (method, path, body, length) = match frame(rest) {
            Frame::Partial { .. } => return,
            Frame::Bad(message) => {
                assert!(!message.is_empty());
                return;
            }
            Frame::Whole {
                method,
                path,
                body,
                length,
                ..
            } => (method, path, body, length),
        };
        assert!(body <= length && length <= rest.len() && length > 0);
        let response: Response = match route(method, &path, &rest[body..length]) {
            Ok(Request::PutLogger(_) | Request::PutMetrics(_)) => Response::no_content(),
            Ok(request) => match controller.handle(request) {
                Outcome::Reply(r) => r,
                // Building the VM needs KVM: the description must at least
                // convert.
                Outcome::Start => match controller.resources().vm_config() {
                    Ok(config) => {
                        assert!((1..=254).contains(&config.cpus));
                        assert!(config.mem >= 16 << 20 && config.mem % 4096 == 0);
                        Response::no_content()
                    }
                    Err(e) => e.into(),
                },
                // Restoring needs KVM and the files: only a load asks.
                Outcome::Load(_) => {
                    assert!(path.starts_with("/snapshot/load"), "{path}");
                    Response::no_content()
                }
            },
            Err(e) => e.into(),
        };
        check(&response);
        rest = &rest[length..];
    }
}

/// A refusal carries a fault message; a success a JSON body or none.
fn check(r: &Response) {
    match r.status {
        200 => {
            let body = r.body.as_deref().expect("a 200 has a body");
            serde_json::from_str::<serde_json::Value>(body).expect("JSON");
        }
        204 => assert!(r.body.is_none()),
        400..=499 => {
            let body = r.body.as_deref().expect("a fault has a body");
            let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
            assert!(v["fault_message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        other => panic!("status {other} for a pre-boot request"),
    }
}
