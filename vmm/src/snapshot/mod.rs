//! Snapshots of a paused VM (issue 14): the state file's format
//! ([`format`]); the vCPU state it holds is read and written by
//! `crate::vcpu_state`.

pub mod format;
