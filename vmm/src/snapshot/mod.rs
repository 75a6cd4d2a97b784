//! Snapshots of a paused VM (issue 14): the state file's format
//! ([`format`]), what it holds ([`state`]), taking one ([`create`]) and
//! restoring one into a new process ([`restore`]).
//! The vCPU state is read and written by `crate::vcpu_state`, each vCPU's
//! by its own thread at the pause gate.

pub mod create;
pub mod format;
pub mod restore;
pub mod state;
