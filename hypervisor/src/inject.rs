//! Test-only fault injection, compiled in only with the `test-inject` cargo feature
//! (a scenario asks for that build with `hv_features = ["test-inject"]`). Each hook
//! stands in for a fault the emulated hardware or a correct mediator never makes, so
//! that the isolation meant to contain it can be seen working on its own. Without the
//! feature every hook answers "no" and arming one fails.

#[cfg(feature = "test-inject")]
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why an injection cannot be armed.
#[cfg_attr(feature = "test-inject", allow(dead_code))]
pub const NOT_BUILT: &str = "this hypervisor was built without the test-inject feature";

/// `test=iommu-bypass bypass_vm=N`: the next ATTACH_BACKING of VM N that reaches the
/// physical GPU gets one backing address the mediator never granted (a stand-in for a
/// mediator bug), so the IOMMU's isolation can be seen to hold by itself.
#[cfg(feature = "test-inject")]
static BAD_DMA_VM: AtomicU64 = AtomicU64::new(u64::MAX);
/// The ungranted page given to the GPU (0: none yet).
#[cfg(feature = "test-inject")]
static BAD_DMA_ADDR: AtomicU64 = AtomicU64::new(0);

/// `hang_vm=N`: once VM N has had enough commands completed, the GPU's completions of
/// its commands are withheld (a stand-in for a GPU that hangs on that VM's work:
/// QEMU's virtio-gpu always completes), until its channel is reset.
#[cfg(feature = "test-inject")]
static HANG_VM: AtomicU64 = AtomicU64::new(u64::MAX);
/// Whether the injected hang has started (announced once).
#[cfg(feature = "test-inject")]
static HANGING: AtomicBool = AtomicBool::new(false);

/// Arms the bad-DMA injection for VM `vm`.
#[cfg_attr(not(feature = "selftest"), allow(dead_code))]
pub fn arm_bad_dma(vm: u16) -> Result<(), &'static str> {
    #[cfg(feature = "test-inject")]
    {
        BAD_DMA_VM.store(u64::from(vm), Ordering::SeqCst);
        Ok(())
    }
    #[cfg(not(feature = "test-inject"))]
    {
        let _ = vm;
        Err(NOT_BUILT)
    }
}

/// Whether this ATTACH_BACKING of VM `vm` is to carry an ungranted address (once).
pub fn take_bad_dma(vm: u16) -> bool {
    #[cfg(feature = "test-inject")]
    {
        BAD_DMA_VM
            .compare_exchange(u64::from(vm), u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
    #[cfg(not(feature = "test-inject"))]
    {
        let _ = vm;
        false
    }
}

/// Records the ungranted page address given to the GPU.
pub fn note_bad_dma(addr: u64) {
    #[cfg(feature = "test-inject")]
    BAD_DMA_ADDR.store(addr & !0xfff, Ordering::SeqCst);
    #[cfg(not(feature = "test-inject"))]
    let _ = addr;
}

/// After an injected bad DMA: says, for each IOMMU fault, whether it is at the injected
/// page, so a scenario can tell "the IOMMU stopped what we let through" from
/// "something else faulted".
pub fn check_faults(faults: &[crate::iommu::Fault]) {
    #[cfg(feature = "test-inject")]
    {
        let bad = BAD_DMA_ADDR.load(Ordering::SeqCst);
        if bad == 0 {
            return;
        }
        for page in faults.iter().map(|f| f.addr) {
            if page == bad {
                log::info!("iommu: the fault is at the injected ungranted address {bad:#x}");
            } else {
                log::warn!("iommu: DMA fault at {page:#x}, not the injected address {bad:#x}");
            }
        }
    }
    #[cfg(not(feature = "test-inject"))]
    let _ = faults;
}

/// Arms the hang of VM `vm`'s channel.
pub fn arm_hang(vm: u16) -> Result<(), &'static str> {
    #[cfg(feature = "test-inject")]
    {
        HANG_VM.store(u64::from(vm), Ordering::SeqCst);
        Ok(())
    }
    #[cfg(not(feature = "test-inject"))]
    {
        let _ = vm;
        Err(NOT_BUILT)
    }
}

/// Whether the GPU's completion of a command of VM `vm` is to be withheld (from
/// when it `reached` the GPU: enough of its commands completed to see it draw).
pub fn withhold_completion(vm: u16, reached: bool) -> bool {
    #[cfg(feature = "test-inject")]
    {
        if HANG_VM.load(Ordering::Relaxed) != u64::from(vm) || !reached {
            return false;
        }
        if !HANGING.swap(true, Ordering::SeqCst) {
            log::warn!(
                "gpu-pv: TEST ONLY: the GPU's completions of vm {vm}'s commands are withheld from now on (a hung channel)"
            );
        }
        true
    }
    #[cfg(not(feature = "test-inject"))]
    {
        let _ = (vm, reached);
        false
    }
}

/// VM `vm`'s channel was reset: an injected hang of it is over.
pub fn channel_reset(vm: u16) {
    #[cfg(feature = "test-inject")]
    {
        let _ =
            HANG_VM.compare_exchange(u64::from(vm), u64::MAX, Ordering::SeqCst, Ordering::Relaxed);
    }
    #[cfg(not(feature = "test-inject"))]
    let _ = vm;
}
