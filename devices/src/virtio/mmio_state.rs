//! The transport's state for snapshots (virtio 1.2 §4.2.2): its registers
//! and every queue's, taken after the device gave back the chains it held
//! ([`VirtioDevice::quiesce`]). A saved state is hostile input: restoring
//! checks it as the driver's writes are checked — only defined status bits,
//! in the order of §3.1.1; only offered features; queues re-validated — and
//! then activates the device again as DRIVER_OK does.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use super::{MmioTransport, STATUS_STEPS};
use crate::virtio::{
    ActivateError, QueueError, QueueState, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// Everything a transport and its queues need to resume.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device ID it was saved from (checked on restore).
    pub device_type: u32,
    /// Status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device was activated at DRIVER_OK.
    pub active: bool,
    /// Every queue.
    pub queues: Vec<QueueState>,
}

/// Why a transport's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The device still holds chains it could not give back.
    #[error("queue {0} still has chains in flight")]
    InFlight(usize),
    /// The device could not give back what it held.
    #[error("the device could not give back its chains")]
    Quiesce(#[source] QueueError),
    /// A state for another kind of device or queue layout.
    #[error(
        "saved for device type {saved} with {saved_queues} queues, this is type {device} with {queues}"
    )]
    Mismatch {
        /// The saved device type.
        saved: u32,
        /// The saved number of queues.
        saved_queues: usize,
        /// This device's type.
        device: u32,
        /// This device's queues.
        queues: usize,
    },
    /// A register value the driver could not have written.
    #[error("invalid {0} in the saved state")]
    Invalid(&'static str),
    /// A saved queue is not valid here.
    #[error("queue {index}")]
    Queue {
        /// The queue.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: QueueError,
    },
    /// The device refused to start again.
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

impl MmioTransport {
    /// The state to save: the device first gives back every chain it holds
    /// (the VM is paused; nothing else touches the queues).
    pub fn save_state(&mut self) -> Result<TransportState, StateError> {
        self.device
            .quiesce(&mut self.queues, &self.frames)
            .map_err(StateError::Quiesce)?;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.state().ok_or(StateError::InFlight(i)))
            .collect::<Result<_, _>>()?;
        // What the device watches may have changed (a receive side that
        // gave its chains back watches its TAP again).
        self.update_sources();
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            active: self.active,
            queues,
        })
    }

    /// Restores `state` into this (new) transport. On error the transport
    /// is left reset, as a new device.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), StateError> {
        let result = self.try_restore(state);
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn try_restore(&mut self, s: &TransportState) -> Result<(), StateError> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(StateError::Mismatch {
                saved: s.device_type,
                saved_queues: s.queues.len(),
                device: self.device.device_type(),
                queues: self.queues.len(),
            });
        }
        check_status(s.status)?;
        if s.acked_features & !self.device.avail_features() != 0 {
            return Err(StateError::Invalid("features (not offered)"));
        }
        if s.interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return Err(StateError::Invalid("interrupt status"));
        }
        let features_ok = s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        if features_ok && s.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(StateError::Invalid(
                "features (FEATURES_OK without VERSION_1)",
            ));
        }
        let live = s.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && s.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0;
        if s.active && !live {
            return Err(StateError::Invalid("activation (device not live)"));
        }
        self.reset();
        if features_ok {
            self.device.ack_features(s.acked_features);
        }
        let event_idx = s.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let indirect = s.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        for (index, (queue, saved)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            if saved.event_idx != (features_ok && event_idx)
                || saved.indirect != (features_ok && indirect)
            {
                return Err(StateError::Invalid("queue features"));
            }
            if saved.active && !live {
                return Err(StateError::Invalid("queue activation (device not live)"));
            }
            queue
                .restore(saved, &self.frames)
                .map_err(|source| StateError::Queue { index, source })?;
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if s.active {
            self.device.activate(&mut self.queues, &self.frames)?;
            self.active = true;
        }
        self.update_sources();
        Ok(())
    }
}

/// A status the driver could have reached: defined bits only, each step of
/// §3.1.1 only after the ones before it.
fn check_status(status: u32) -> Result<(), StateError> {
    let steps = STATUS_STEPS.iter().fold(0, |all, s| all | s);
    if status & !(steps | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) != 0 {
        return Err(StateError::Invalid("status (undefined bits)"));
    }
    let reached = STATUS_STEPS
        .iter()
        .take_while(|&&s| status & s != 0)
        .count();
    if STATUS_STEPS[reached..].iter().any(|&s| status & s != 0) {
        return Err(StateError::Invalid("status (a step skipped)"));
    }
    Ok(())
}
