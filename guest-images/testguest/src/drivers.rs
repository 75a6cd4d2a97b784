//! The device part of the self-test: virtio-mmio devices from the ACPI DSDT
//! when the VMM gave ACPI tables, else from the command line; interrupts,
//! the DMA pool, the block and network self-tests on each device, and a
//! final check that every DMA buffer went back to the allocator.

use crate::acpi;
use crate::blk::{self, VIRTIO_ID_BLOCK};
use crate::cmdline::Options;
use crate::dma::{DmaError, DmaPool, ToDevice};
use crate::irq;
use crate::log;
use crate::net::{self, VIRTIO_ID_NET};
use crate::ram::Allocator;
use crate::snapshot::Pattern;
use crate::startinfo::BOOT_MAPPED_LIMIT;
use crate::virtio_mmio::{self, MmioDevice};

/// Frames the DMA pool may hand out at once (1 MiB).
pub const DMA_BUDGET_FRAMES: u64 = 256;

/// Runs the device self-tests on `cmdline`'s devices with the allocator
/// (which the DMA pool takes over); returns whether all passed. With a
/// snapshot `pattern`, the snapshot point comes during the first block
/// device's test (a write in flight across it) or, failing that, after the
/// block tests and before the network tests.
pub fn run(
    alloc: Allocator,
    cmdline: &str,
    tables: Option<&acpi::Tables>,
    options: &Options,
    pattern: Option<Pattern>,
) -> bool {
    let mut pass = true;
    let mut point = Point {
        pattern,
        reached: 0,
        intact: true,
    };
    let found = match tables {
        Some(t) => t.devices,
        None => virtio_mmio::discover(cmdline, |word, why| {
            log!("error: {word}: {why}");
            pass = false;
        }),
    };
    if found.ignored > 0 {
        log!(
            "warning: {} virtio_mmio.device entries beyond the first {} ignored",
            found.ignored,
            virtio_mmio::MAX_DEVICES
        );
    }
    if found.windows().is_empty() {
        if point.armed() {
            // The point sleeps on the APIC timer between polls.
            match irq::init() {
                Ok(_controllers) => point.last(),
                Err(e) => {
                    log!("error: interrupts: {e}");
                    return false;
                }
            }
            pass &= point.intact;
        }
        log!(
            "virtio: no devices {}",
            if tables.is_some() {
                "in the DSDT"
            } else {
                "on the command line"
            }
        );
        return pass;
    }
    let mut controllers = match irq::init() {
        Ok(c) => c,
        Err(e) => {
            log!("error: interrupts: {e}");
            return false;
        }
    };
    let pool = DmaPool::new(alloc, DMA_BUDGET_FRAMES);
    let start = pool.allocator_stats();
    let (mut blocks, mut nets) = (0, 0);
    for (k, w) in found.windows().iter().enumerate() {
        let dev = match MmioDevice::probe(*w) {
            Ok(dev) => dev,
            Err(e) => {
                log!("virtio{k}: 0x{:x} irq {}: {e}", w.base, w.irq);
                pass = false;
                continue;
            }
        };
        if dev.device_id() == VIRTIO_ID_NET {
            log!(
                "virtio{k}: 0x{:x} irq {}: network, version 2",
                w.base,
                w.irq
            );
            let n = nets;
            nets += 1;
            match controllers.route(w.irq) {
                Ok(line) => {
                    let cfg = options.net.get(n).copied().flatten();
                    let armed = n == 0 && point.armed();
                    let mut at = || point.run();
                    let at = armed.then_some(&mut at as &mut dyn FnMut());
                    pass &= net::selftest(n, dev, &pool, line, cfg, at);
                }
                Err(e) => {
                    log!("net{n}: FAIL {e}");
                    pass = false;
                }
            }
            continue;
        }
        if dev.device_id() != VIRTIO_ID_BLOCK {
            log!(
                "virtio{k}: 0x{:x} irq {}: device id {}, no driver",
                w.base,
                w.irq,
                dev.device_id()
            );
            continue;
        }
        log!("virtio{k}: 0x{:x} irq {}: block, version 2", w.base, w.irq);
        let n = blocks;
        blocks += 1;
        match controllers.route(w.irq) {
            Ok(line) => {
                let armed = n == 0 && point.armed();
                let mut across = || point.run();
                let across = armed.then_some(&mut across as &mut dyn FnMut());
                pass &= blk::selftest(n, dev, &pool, line, options.blk, across);
            }
            Err(e) => {
                log!("blk{n}: FAIL {e}");
                pass = false;
            }
        }
    }
    point.last();
    pass &= point.intact;
    controllers.mask_all();
    pass &= check_dma(&pool, start);
    pass
}

/// The snapshot points: during the first block device's write test (a
/// write in flight), once the first network device is live, and — if the
/// guest reached neither — after the device tests.
struct Point {
    pattern: Option<Pattern>,
    reached: u32,
    intact: bool,
}

impl Point {
    /// Whether there are snapshot points at all.
    fn armed(&self) -> bool {
        self.pattern.is_some()
    }

    fn run(&mut self) {
        if let Some(p) = &mut self.pattern {
            self.reached += 1;
            self.intact &= p.wait_and_check();
        }
    }

    /// The points after the device tests, if no other was reached.
    fn last(&mut self) {
        if self.reached == 0 {
            let points = self.pattern.map_or(0, |p| p.points);
            for _ in 0..points {
                self.run();
            }
        }
    }
}

/// Every buffer is back, the allocator is where it started, and a request
/// beyond the budget fails cleanly.
fn check_dma(pool: &DmaPool, start: memory::Stats) -> bool {
    let failures = pool.stats().failures;
    let too_big = pool.alloc::<ToDevice>(((DMA_BUDGET_FRAMES + 1) * memory::PAGE_SIZE) as usize);
    let exhausted = matches!(too_big, Err(DmaError::Exhausted { .. }));
    drop(too_big);
    let s = pool.stats();
    log!(
        "dma: allocs {} frees {} failures {} orphaned {} in use {} (peak {} frames, highest end 0x{:x})",
        s.allocs,
        s.frees,
        s.failures,
        s.orphaned,
        s.buffers_in_use,
        s.peak_frames,
        s.highest_end
    );
    let now = pool.allocator_stats();
    let why = if !exhausted || s.failures != failures + 1 {
        Some("a request beyond the budget was not refused and counted")
    } else if s.buffers_in_use != 0 || s.frames_in_use != 0 {
        Some("buffers still in use")
    } else if s.highest_end > BOOT_MAPPED_LIMIT {
        Some("a buffer above 4 GiB")
    } else if now != start {
        Some("the frame allocator's statistics did not return to their start")
    } else {
        None
    };
    match why {
        None => {
            log!("check dma: ok");
            true
        }
        Some(why) => {
            log!("check dma: FAIL {why}");
            false
        }
    }
}
