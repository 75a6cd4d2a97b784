//! minivmm's VMM library: KVM setup, vCPUs, boot and the event loop.
//!
//! The binary `minivmm` is a thin CLI over this library so that integration
//! tests can drive the same code. KVM support arrives with the boot issue.
