//! Test-only fault injection, compiled in only with the `test-inject` cargo feature
//! (a scenario asks for that build with `hv_features = ["test-inject"]`). Each hook
//! stands in for a fault the emulated hardware or a correct mediator never makes, so
//! that the isolation meant to contain it can be seen working on its own. Without the
//! feature every hook answers "no" and arming one fails.

#[cfg(feature = "test-inject")]
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why an injection cannot be armed.
pub const NOT_BUILT: &str = "this hypervisor was built without the test-inject feature";

/// `test=iommu-bypass`: the next ATTACH_BACKING that reaches the physical GPU gets one
/// backing address the mediator never granted (a stand-in for a mediator bug), so the
/// IOMMU's isolation can be seen to hold by itself.
#[cfg(feature = "test-inject")]
static BAD_DMA: AtomicBool = AtomicBool::new(false);

/// `hang_vm=N`: once VM N has had enough commands completed, the GPU's completions of
/// its commands are withheld (a stand-in for a GPU that hangs on that VM's work:
/// QEMU's virtio-gpu always completes), until its channel is reset.
#[cfg(feature = "test-inject")]
static HANG_VM: AtomicU64 = AtomicU64::new(u64::MAX);
/// Whether the injected hang has started (announced once).
#[cfg(feature = "test-inject")]
static HANGING: AtomicBool = AtomicBool::new(false);

/// Arms the bad-DMA injection.
pub fn arm_bad_dma() -> Result<(), &'static str> {
    #[cfg(feature = "test-inject")]
    {
        BAD_DMA.store(true, Ordering::SeqCst);
        Ok(())
    }
    #[cfg(not(feature = "test-inject"))]
    Err(NOT_BUILT)
}

/// Whether this ATTACH_BACKING is to carry the ungranted address (once).
pub fn take_bad_dma() -> bool {
    #[cfg(feature = "test-inject")]
    {
        BAD_DMA.swap(false, Ordering::SeqCst)
    }
    #[cfg(not(feature = "test-inject"))]
    false
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

/// Whether the GPU's completion of a command of VM `vm` (which had `completed`
/// commands completed before) is to be withheld.
pub fn withhold_completion(vm: u16, completed: u64) -> bool {
    #[cfg(feature = "test-inject")]
    {
        if HANG_VM.load(Ordering::Relaxed) != u64::from(vm)
            || completed < crate::gpupv::REACHED_COMPLETIONS
        {
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
        let _ = (vm, completed);
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
