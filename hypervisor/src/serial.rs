//! The serial console (COM1) and the `log` backend: every line carries its level,
//! the CPU it was printed on and, when running on behalf of a VM, the VM's name.

use core::fmt::Write;

use spin::Mutex;
use uart_16550::SerialPort;

use crate::arch::cpu;

static COM1: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Programs COM1 (115200 8N1).
pub fn init() {
    // SAFETY: 0x3f8 is COM1 on every PC platform we boot on; nobody else drives it.
    let mut port = unsafe { SerialPort::new(0x3f8) };
    port.init();
    *COM1.lock() = Some(port);
    log::set_logger(&LOGGER).ok();
    log::set_max_level(log::LevelFilter::Info);
}

/// Writes formatted text to COM1 as is.
pub fn write_fmt(args: core::fmt::Arguments<'_>) {
    let mut g = COM1.lock();
    if let Some(p) = g.as_mut() {
        let _ = p.write_fmt(args);
    }
}

/// A byte COM1 received, if one waits (never blocks: when another CPU is
/// printing, the byte is read on a later poll).
pub fn try_read_byte() -> Option<u8> {
    COM1.try_lock()?.as_mut()?.try_receive().ok()
}

/// Writes to COM1 without taking the lock: only for the crash path, where the lock
/// may be held by the code that faulted.
pub fn write_fmt_unlocked(args: core::fmt::Arguments<'_>) {
    // SAFETY: COM1 exists; interleaving with a concurrent writer garbles text at worst.
    let mut p = unsafe { SerialPort::new(0x3f8) };
    let _ = p.write_fmt(args);
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!("{}\r\n", format_args!($($arg)*))) };
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let cpu = cpu::current_index();
        let lvl = r.level().as_str();
        crate::vm_context::with_current(|vm| match vm {
            Some(name) => write_fmt(format_args!("[{lvl:>5} cpu{cpu} {name}] {}\r\n", r.args())),
            None => write_fmt(format_args!("[{lvl:>5} cpu{cpu}] {}\r\n", r.args())),
        })
    }
    fn flush(&self) {}
}

/// Waits until COM1 has sent everything (LSR bit 6), so the last lines reach the log
/// before an emulator exits.
pub fn drain() {
    let mut lsr = x86_64::instructions::port::PortReadOnly::<u8>::new(0x3fd);
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effects.
        if unsafe { lsr.read() } & 0x40 != 0 {
            break;
        }
    }
}
