//! Hypercalls: the guest ABI's calls into the hypervisor (console output, yield,
//! zero-copy buffer registration, shutdown).

use gpu_pv::abi::hypercall;
use gpu_pv::memory::{Gpa, GuestMemory};
use log::{info, warn};

use super::{StopReason, Vm, VmState};

impl Vm {
    pub(super) fn hypercall(&mut self, idx: usize) -> bool {
        let r = *self.vcpus[idx].regs();
        let (ret, keep_running) = match r.rax {
            hypercall::VERSION => {
                self.vcpus[idx].regs().rdi = 0;
                (1, true)
            }
            hypercall::CONSOLE_WRITE => {
                let len = r.rsi.min(512);
                let mut buf = alloc::vec![0u8; len as usize];
                if self.read_guest(r.rdi, &mut buf) {
                    for b in buf {
                        self.serial_byte(b);
                    }
                    (hypercall::OK, true)
                } else {
                    (hypercall::ERR_INVALID, true)
                }
            }
            hypercall::YIELD => (hypercall::OK, false),
            hypercall::GPU_REGISTER_BUFFER => {
                // Trust boundary: the guest names its buffer by a raw number in a
                // register; it is a guest-physical address, checked by the mediator.
                let gpa = Gpa::new(r.rdi);
                match self
                    .port
                    .as_ref()
                    .and_then(|p| p.register_buffer(gpa, r.rsi))
                {
                    Some(handle) => {
                        self.vcpus[idx].regs().rdi = handle;
                        // Registered, so it translates (the same check passed).
                        let reach = self
                            .memory()
                            .translate(gpa, r.rsi)
                            .ok()
                            .and_then(crate::gpu_share::gpu_can_reach);
                        info!("zero-copy buffer {handle}: GPU can reach it: {reach:?}");
                        (hypercall::OK, true)
                    }
                    None => {
                        warn!("zero-copy buffer refused: guest {:#x}+{:#x}", r.rdi, r.rsi);
                        (hypercall::ERR_INVALID, true)
                    }
                }
            }
            hypercall::GPU_UNREGISTER_BUFFER => {
                if self
                    .port
                    .as_ref()
                    .is_some_and(|p| p.unregister_buffer(r.rdi))
                {
                    (hypercall::OK, true)
                } else {
                    (hypercall::ERR_INVALID, true)
                }
            }
            hypercall::VCPU_START => {
                let target = r.rdi as usize;
                if target == 0 || target >= self.vcpus.len() || self.started[target] {
                    (hypercall::ERR_INVALID, true)
                } else {
                    let t = &mut self.vcpus[target];
                    t.set_rip(r.rsi);
                    t.set_rsp(r.rdx);
                    t.regs().rdi = r.rcx;
                    self.started[target] = true;
                    self.startup[target] = super::Startup::Running;
                    self.wake[target].store(0, core::sync::atomic::Ordering::Relaxed);
                    info!("vcpu{target} started at {:#x}", r.rsi);
                    (hypercall::OK, true)
                }
            }
            hypercall::SHUTDOWN => {
                info!("guest requested shutdown with code {}", r.rdi);
                self.state = VmState::Stopped(StopReason::Shutdown(r.rdi));
                (hypercall::OK, false)
            }
            _ => (hypercall::ERR_UNKNOWN, true),
        };
        self.vcpus[idx].regs().rax = ret;
        keep_running
    }
}
