//! COM1 as the guest sees it (emulated by the hypervisor: every byte written to the
//! data port is one port I/O exit; a completed line becomes the log line
//! `[vmname] text`), and the [`print!`](crate::print)/[`println!`](crate::println)
//! macros on it.

use core::fmt;

const COM1: u16 = 0x3f8;

fn outb(port: u16, v: u8) {
    // SAFETY: port output to COM1 has no memory effects; in a VM it exits to the
    // hypervisor's serial emulation.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Writes `s` to COM1 (`\n` becomes `\r\n`).
pub fn write(s: &str) {
    write_bytes(s.as_bytes());
}

/// Writes raw bytes to COM1 (`\n` becomes `\r\n`).
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            outb(COM1, b'\r');
        }
        outb(COM1, b);
    }
}

/// COM1 as a [`fmt::Write`] sink.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write(s);
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let _ = fmt::Write::write_fmt(&mut Serial, args);
}

/// Prints to COM1, like `std::print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to COM1, like `std::println!`.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::write("\n")
    };
    ($($arg:tt)*) => {
        $crate::serial::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
