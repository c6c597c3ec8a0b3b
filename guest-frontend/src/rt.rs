//! Start-up and panic support behind [`crate::entry!`].

use crate::boot_info::BootInfo;

/// Sets the runtime up (heap, IDT), reads the boot-info page at `boot_info` and runs
/// `main`.
pub fn start(boot_info: u64, main: fn(&BootInfo) -> !) -> ! {
    crate::heap::init();
    crate::idt::init();
    let info = match BootInfo::read(boot_info) {
        Ok(info) => info,
        Err(e) => {
            crate::println!("guest: no usable boot-info page at {boot_info:#x}: {e:?}");
            BootInfo::unknown()
        }
    };
    main(&info)
}

/// Prints the panic and shuts the VM down with [`crate::exit::PANIC`].
pub fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::cpu::cli();
    crate::println!("guest panic: {info}");
    crate::hypercall::shutdown(crate::exit::PANIC)
}
