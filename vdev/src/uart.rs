//! A virtual 16550A UART: the eight byte registers of a PC serial port (COM1 at
//! I/O port 0x3F8, IRQ 4), as pure logic.
//!
//! Why it exists: an unmodified Linux guest must find a real 16550A on COM1, so
//! that its 8250 driver binds ttyS0 ("ttyS0 at I/O 0x3f8 (irq = 4, base_baud =
//! 115200) is a 16550A") and a shell on it works with interrupts, input included.
//! The model therefore passes every probe of Linux's `8250_port.c` as a 16550A
//! and nothing more: the scratch and IER tests and the loopback MSR test of
//! `autoconfig`, the IIR FIFO bits, the EFR probes of `autoconfig_16550a` (offset
//! 2 is always IIR/FCR here, whatever LCR holds, so no EFR is found), the 16750,
//! NatSemi and XScale tests (IIR bits 5:4, MCR bits 7:5 and IER bits 7:4 read as
//! zero), `size_fifo` (16 bytes come back in loopback), and the THRE and TXEN
//! tests of `serial8250_do_startup`.
//!
//! Transmission is instantaneous: a THR write hands the byte to the caller (or to
//! the receive FIFO in loopback mode) and the transmitter is empty again, so LSR
//! always reports THRE and TEMT. The receive FIFO is a fixed ring of 16 bytes
//! (one byte while FIFOs are disabled, as a 16450-mode RBR).
//!
//! Interrupts: the caller (the kernel) delivers an interrupt on each rising edge
//! of [`Uart16550::irq_level`], checked with [`Uart16550::take_irq_edge`] after
//! every access ([`Uart16550::read`], [`Uart16550::write`],
//! [`Uart16550::receive`]), because the guest's IRQ 4 is edge-triggered through
//! an I/O APIC. A THR write while the THRE interrupt is pending drops the line
//! and raises it again within the one access, as the hardware does; the model
//! records that edge internally so the caller still sees it.

/// The first I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u8 = 4;
/// How many consecutive I/O ports the UART decodes.
pub const PORT_COUNT: u16 = 8;

// Register offsets (DLAB selects the divisor latch at 0 and 1).
const REG_RBR_THR_DLL: u8 = 0;
const REG_IER_DLM: u8 = 1;
const REG_IIR_FCR: u8 = 2;
const REG_LCR: u8 = 3;
const REG_MCR: u8 = 4;
const REG_LSR: u8 = 5;
const REG_MSR: u8 = 6;
const REG_SCR: u8 = 7;

// IER: the four interrupt enables of a 16550A; bits 7:4 read as zero.
const IER_ERBFI: u8 = 1 << 0; // received data available
const IER_ETBEI: u8 = 1 << 1; // THR empty
const IER_ELSI: u8 = 1 << 2; // receiver line status
const IER_EDSSI: u8 = 1 << 3; // modem status
const IER_MASK: u8 = 0x0f;

// IIR: bit 0 set means "no interrupt pending", bits 3:1 the source, 7:6 FIFOs on.
const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_RX_TIMEOUT: u8 = 0x0c;
const IIR_ID_MASK: u8 = 0x0f;
const IIR_FIFOS_ENABLED: u8 = 0xc0;

// FCR (write-only, shares offset 2 with IIR).
const FCR_ENABLE: u8 = 1 << 0;
const FCR_CLEAR_RX: u8 = 1 << 1;
const FCR_DMA_MODE: u8 = 1 << 3;
const FCR_TRIGGER_SHIFT: u8 = 6;
/// FCR bits kept: enable, DMA mode (no effect here) and the trigger level.
const FCR_KEPT: u8 = FCR_ENABLE | FCR_DMA_MODE | (3 << FCR_TRIGGER_SHIFT);
/// Receive FIFO trigger levels selected by FCR bits 7:6.
const RX_TRIGGER: [usize; 4] = [1, 4, 8, 14];

// LCR.
const LCR_DLAB: u8 = 1 << 7;

// MCR: bits 7:5 read as zero on a 16550A.
const MCR_DTR: u8 = 1 << 0;
const MCR_RTS: u8 = 1 << 1;
const MCR_OUT1: u8 = 1 << 2;
const MCR_OUT2: u8 = 1 << 3;
const MCR_LOOP: u8 = 1 << 4;
const MCR_MASK: u8 = 0x1f;

// LSR. Parity, framing and break errors never happen on a virtual line.
const LSR_DR: u8 = 1 << 0;
const LSR_OE: u8 = 1 << 1;
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;

// MSR: delta bits 3:0, line states 7:4.
const MSR_DCTS: u8 = 1 << 0;
const MSR_DDSR: u8 = 1 << 1;
const MSR_TERI: u8 = 1 << 2;
const MSR_DDCD: u8 = 1 << 3;
const MSR_CTS: u8 = 1 << 4;
const MSR_DSR: u8 = 1 << 5;
const MSR_RI: u8 = 1 << 6;
const MSR_DCD: u8 = 1 << 7;
/// The modem inputs of a connected line outside loopback.
const MSR_CONNECTED: u8 = MSR_CTS | MSR_DSR | MSR_DCD;

/// Depth of the receive FIFO.
const FIFO_SIZE: usize = 16;
/// Divisor at reset: 9600 baud, what a PC BIOS leaves behind.
const RESET_DIVISOR: u16 = 12;

/// The receive FIFO: a fixed ring buffer.
#[derive(Clone, Debug)]
struct RxFifo {
    buf: [u8; FIFO_SIZE],
    head: usize,
    len: usize,
}

impl RxFifo {
    const fn new() -> Self {
        Self {
            buf: [0; FIFO_SIZE],
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, byte: u8) {
        debug_assert!(self.len < FIFO_SIZE);
        self.buf[(self.head + self.len) % FIFO_SIZE] = byte;
        self.len += 1;
    }

    fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let byte = self.buf[self.head];
        self.head = (self.head + 1) % FIFO_SIZE;
        self.len -= 1;
        Some(byte)
    }

    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }
}

/// A 16550A UART as the guest sees it through its eight I/O ports.
#[derive(Clone, Debug)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    /// The FCR bits in effect (`FCR_KEPT`); zero while FIFOs are disabled.
    fcr: u8,
    scr: u8,
    divisor: u16,
    rx: RxFifo,
    /// What RBR reads when the FIFO is empty: the last byte received.
    last_rx: u8,
    /// LSR.OE: a byte was lost to a full receive FIFO since LSR was last read.
    overrun: bool,
    /// MSR bits 3:0, cleared by reading MSR.
    msr_delta: u8,
    /// The THRE interrupt source: set when the THR empties (after every THR
    /// write, and when ETBEI is enabled), cleared by an IIR read reporting it
    /// or by a THR write.
    thre_pending: bool,
    /// `irq_level()` as last seen, to find rising edges.
    irq_prev: bool,
    /// A rising edge happened since `take_irq_edge` last ran.
    irq_edge: bool,
}

impl Default for Uart16550 {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart16550 {
    /// A UART in its reset state: interrupts disabled, FIFOs off, MCR clear.
    pub const fn new() -> Self {
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            fcr: 0,
            scr: 0,
            divisor: RESET_DIVISOR,
            rx: RxFifo::new(),
            last_rx: 0,
            overrun: false,
            msr_delta: 0,
            thre_pending: false,
            irq_prev: false,
            irq_edge: false,
        }
    }

    /// Guest read of register `offset` (0..=7, relative to the base port).
    /// Reading RBR pops the receive FIFO; reading IIR acknowledges a THRE
    /// interrupt; reading LSR clears the error bits; reading MSR clears the
    /// delta bits. An offset past 7 reads as 0xFF (nothing decodes it).
    pub fn read(&mut self, offset: u8) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        let value = match offset {
            REG_RBR_THR_DLL if dlab => self.divisor.to_le_bytes()[0],
            REG_RBR_THR_DLL => {
                if let Some(byte) = self.rx.pop() {
                    self.last_rx = byte;
                }
                self.last_rx
            }
            REG_IER_DLM if dlab => self.divisor.to_le_bytes()[1],
            REG_IER_DLM => self.ier,
            REG_IIR_FCR => {
                let iir = self.iir();
                if iir & IIR_ID_MASK == IIR_THRI {
                    self.thre_pending = false;
                }
                iir
            }
            REG_LCR => self.lcr,
            REG_MCR => self.mcr,
            REG_LSR => {
                let lsr = self.lsr();
                self.overrun = false;
                lsr
            }
            REG_MSR => {
                let msr = self.modem_inputs() | self.msr_delta;
                self.msr_delta = 0;
                msr
            }
            REG_SCR => self.scr,
            _ => 0xff,
        };
        self.update_irq();
        value
    }

    /// Guest write. Returns `Some(byte)` when a byte is transmitted to the
    /// outside world (THR written, DLAB clear, not in loopback mode); in
    /// loopback mode the byte goes into the receive FIFO instead. Writes to LSR,
    /// MSR and past offset 7 are ignored.
    pub fn write(&mut self, offset: u8, value: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        let mut sent = None;
        match offset {
            REG_RBR_THR_DLL if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            REG_RBR_THR_DLL => {
                // The THR fills (THRE interrupt cleared, line may drop) ...
                self.thre_pending = false;
                self.update_irq();
                if self.loopback() {
                    self.push_rx(value);
                } else {
                    sent = Some(value);
                }
                // ... and is empty again at once (THRE interrupt raised anew).
                self.thre_pending = true;
            }
            REG_IER_DLM if dlab => {
                self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8);
            }
            REG_IER_DLM => {
                let enabled = !self.ier & value & IER_ETBEI != 0;
                self.ier = value & IER_MASK;
                if enabled {
                    // The THR is always empty: enabling ETBEI raises THRE.
                    self.thre_pending = true;
                }
            }
            REG_IIR_FCR => self.write_fcr(value),
            REG_LCR => self.lcr = value,
            REG_MCR => self.write_mcr(value),
            REG_SCR => self.scr = value,
            _ => {}
        }
        self.update_irq();
        sent
    }

    /// A byte typed on the host side arrives; false (byte dropped, LSR.OE set)
    /// when the receive FIFO is full. In loopback mode the receiver is cut off
    /// from the line and the byte is dropped too.
    pub fn receive(&mut self, byte: u8) -> bool {
        let taken = !self.loopback() && self.push_rx(byte);
        self.update_irq();
        taken
    }

    /// Whether the receive FIFO has room (so the host can hold input back
    /// instead of dropping). False in loopback mode.
    pub fn can_receive(&self) -> bool {
        !self.loopback() && self.rx.len < self.rx_capacity()
    }

    /// The interrupt output as the IRQ pin sees it: some enabled interrupt
    /// pending AND MCR.OUT2 set (on a PC, OUT2 gates the UART's IRQ line).
    pub fn irq_level(&self) -> bool {
        self.iir() & IIR_NO_INT == 0 && self.mcr & MCR_OUT2 != 0
    }

    /// True once per rising edge of [`Self::irq_level`] since the last call,
    /// including an edge hidden inside a single access (a THR write that drops
    /// and re-raises THRE). The caller delivers one interrupt per true.
    pub fn take_irq_edge(&mut self) -> bool {
        core::mem::take(&mut self.irq_edge)
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            FIFO_SIZE
        } else {
            1
        }
    }

    /// Queues a received byte, or records an overrun when there is no room.
    fn push_rx(&mut self, byte: u8) -> bool {
        if self.rx.len < self.rx_capacity() {
            self.rx.push(byte);
            true
        } else {
            self.overrun = true;
            false
        }
    }

    fn write_fcr(&mut self, value: u8) {
        let enable = value & FCR_ENABLE != 0;
        if enable != self.fifo_enabled() {
            // Switching between FIFO and 16450 mode resets the FIFOs.
            self.rx.clear();
        }
        if !enable {
            // The other bits are only programmed together with FCR0.
            self.fcr = 0;
            return;
        }
        if value & FCR_CLEAR_RX != 0 {
            self.rx.clear();
        }
        // Clearing the transmit FIFO has nothing to do: it is always empty.
        self.fcr = value & FCR_KEPT;
    }

    fn write_mcr(&mut self, value: u8) {
        let before = self.modem_inputs();
        self.mcr = value & MCR_MASK;
        let after = self.modem_inputs();
        let changed = before ^ after;
        if changed & MSR_CTS != 0 {
            self.msr_delta |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            self.msr_delta |= MSR_DDSR;
        }
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            self.msr_delta |= MSR_TERI; // trailing edge of RI
        }
        if changed & MSR_DCD != 0 {
            self.msr_delta |= MSR_DDCD;
        }
    }

    /// MSR bits 7:4: the MCR outputs wired back in loopback, else a connected line.
    fn modem_inputs(&self) -> u8 {
        if !self.loopback() {
            return MSR_CONNECTED;
        }
        let mut msr = 0;
        if self.mcr & MCR_RTS != 0 {
            msr |= MSR_CTS;
        }
        if self.mcr & MCR_DTR != 0 {
            msr |= MSR_DSR;
        }
        if self.mcr & MCR_OUT1 != 0 {
            msr |= MSR_RI;
        }
        if self.mcr & MCR_OUT2 != 0 {
            msr |= MSR_DCD;
        }
        msr
    }

    fn lsr(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if self.rx.len > 0 {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        lsr
    }

    /// IIR without side effects: the highest-priority enabled source.
    fn iir(&self) -> u8 {
        let id = if self.ier & IER_ELSI != 0 && self.overrun {
            IIR_RLSI
        } else if self.ier & IER_ERBFI != 0 && self.rx.len > 0 {
            let trigger = RX_TRIGGER[usize::from(self.fcr >> FCR_TRIGGER_SHIFT)];
            if self.fifo_enabled() && self.rx.len < trigger {
                // Below the trigger level: the character timeout, at once.
                IIR_RX_TIMEOUT
            } else {
                IIR_RDI
            }
        } else if self.ier & IER_ETBEI != 0 && self.thre_pending {
            IIR_THRI
        } else if self.ier & IER_EDSSI != 0 && self.msr_delta != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        };
        if self.fifo_enabled() {
            id | IIR_FIFOS_ENABLED
        } else {
            id
        }
    }

    /// Notes the IRQ level after a state change, latching a rising edge.
    fn update_irq(&mut self) {
        let level = self.irq_level();
        if level && !self.irq_prev {
            self.irq_edge = true;
        }
        self.irq_prev = level;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LCR value that selects the divisor latch (Linux's UART_LCR_CONF_MODE_A).
    const LCR_CONF_MODE_A: u8 = 0x80;
    /// LCR value that exposes an EFR on 16650-class parts (UART_LCR_CONF_MODE_B).
    const LCR_CONF_MODE_B: u8 = 0xbf;
    /// FCR bit 5: 64-byte FIFO on a TI16750.
    const FCR7_64BYTE: u8 = 1 << 5;
    /// IER bit 6: UART unit enable on XScale parts.
    const IER_UUE: u8 = 1 << 6;

    /// `size_fifo` as Linux runs it: loopback at divisor 1, 256 bytes out,
    /// count what comes back; every register restored afterwards.
    fn size_fifo(u: &mut Uart16550) -> usize {
        let old_lcr = u.read(REG_LCR);
        u.write(REG_LCR, 0);
        let old_fcr = u.read(REG_IIR_FCR);
        let old_mcr = u.read(REG_MCR);
        u.write(REG_IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | 0x04);
        u.write(REG_MCR, MCR_LOOP);
        u.write(REG_LCR, LCR_CONF_MODE_A);
        let old_dl = [u.read(0), u.read(1)];
        u.write(0, 1);
        u.write(1, 0);
        u.write(REG_LCR, 0x03);
        for byte in 0..=255u8 {
            assert_eq!(
                u.write(REG_RBR_THR_DLL, byte),
                None,
                "loopback must not transmit"
            );
        }
        let mut count = 0;
        while u.read(REG_LSR) & LSR_DR != 0 && count < 256 {
            u.read(REG_RBR_THR_DLL);
            count += 1;
        }
        u.write(REG_IIR_FCR, old_fcr);
        u.write(REG_MCR, old_mcr);
        u.write(REG_LCR, LCR_CONF_MODE_A);
        u.write(0, old_dl[0]);
        u.write(1, old_dl[1]);
        u.write(REG_LCR, old_lcr);
        count
    }

    /// Linux's `autoconfig` and `autoconfig_16550a` for a port at COM1, step by
    /// step; returns the port type Linux would settle on.
    fn linux_autoconfig(u: &mut Uart16550) -> &'static str {
        // IER existence test.
        let scratch = u.read(REG_IER_DLM);
        u.write(REG_IER_DLM, 0);
        let scratch2 = u.read(REG_IER_DLM) & 0x0f;
        u.write(REG_IER_DLM, 0x0f);
        let scratch3 = u.read(REG_IER_DLM) & 0x0f;
        u.write(REG_IER_DLM, scratch);
        if scratch2 != 0 || scratch3 != 0x0f {
            return "none (IER test)";
        }
        // Loopback test: RTS|OUT2 come back as CTS|DCD.
        let save_mcr = u.read(REG_MCR);
        let save_lcr = u.read(REG_LCR);
        u.write(REG_MCR, MCR_LOOP | MCR_RTS | MCR_OUT2);
        let status1 = u.read(REG_MSR) & 0xf0;
        u.write(REG_MCR, save_mcr);
        if status1 != 0x90 {
            return "none (loop test)";
        }
        // Zero the EFR (if any), then look at the IIR FIFO bits.
        u.write(REG_LCR, LCR_CONF_MODE_B);
        u.write(REG_IIR_FCR, 0);
        u.write(REG_LCR, 0);
        u.write(REG_IIR_FCR, FCR_ENABLE);
        let kind = match u.read(REG_IIR_FCR) >> 6 {
            0 => "8250/16450",
            1 => "unknown",
            2 => "16550",
            _ => autoconfig_16550a(u),
        };
        u.write(REG_LCR, save_lcr);
        // Reset as Linux leaves it.
        u.write(REG_MCR, save_mcr);
        u.write(REG_IIR_FCR, FCR_ENABLE);
        u.write(REG_IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | 0x04);
        u.write(REG_IIR_FCR, 0);
        u.read(REG_RBR_THR_DLL);
        u.write(REG_IER_DLM, 0);
        kind
    }

    fn autoconfig_16550a(u: &mut Uart16550) -> &'static str {
        // EFR with DLAB set (ST16C650V1).
        u.write(REG_LCR, LCR_CONF_MODE_A);
        if u.read(REG_IIR_FCR) == 0 {
            u.write(REG_IIR_FCR, 0xa8);
            return if u.read(REG_IIR_FCR) != 0 {
                "16650"
            } else {
                "16550A_FSL64/other"
            };
        }
        // EFR at LCR=0xBF (16650V2, 16654, 16850, 16C950).
        u.write(REG_LCR, LCR_CONF_MODE_B);
        if u.read(REG_IIR_FCR) == 0 {
            return "16650V2 or later (EFR)";
        }
        // National Semiconductor SuperIO: EXCR1 in bank 2 mirrors MCR.LOOP.
        u.write(REG_LCR, 0);
        let mcr = u.read(REG_MCR);
        u.write(REG_LCR, 0xe0);
        let excr1 = u.read(REG_IIR_FCR);
        if (excr1 ^ mcr) & MCR_LOOP == 0 {
            u.write(REG_LCR, 0);
            u.write(REG_MCR, mcr ^ MCR_LOOP);
            u.write(REG_LCR, 0xe0);
            let excr1 = u.read(REG_IIR_FCR);
            u.write(REG_LCR, 0);
            u.write(REG_MCR, mcr);
            if (excr1 ^ mcr) & MCR_LOOP != 0 {
                return "NS16550A";
            }
        }
        // TI16750: IIR bit 5 follows FCR bit 5 with DLAB set.
        u.write(REG_LCR, 0);
        u.write(REG_IIR_FCR, FCR_ENABLE | FCR7_64BYTE);
        let status1 = u.read(REG_IIR_FCR) >> 5;
        u.write(REG_IIR_FCR, FCR_ENABLE);
        u.write(REG_LCR, LCR_CONF_MODE_A);
        u.write(REG_IIR_FCR, FCR_ENABLE | FCR7_64BYTE);
        let status2 = u.read(REG_IIR_FCR) >> 5;
        u.write(REG_IIR_FCR, FCR_ENABLE);
        u.write(REG_LCR, 0);
        if status1 == 6 && status2 == 7 {
            return "16750";
        }
        // XScale: a writable IER.UUE.
        let iersave = u.read(REG_IER_DLM);
        u.write(REG_IER_DLM, iersave & !IER_UUE);
        if u.read(REG_IER_DLM) & IER_UUE == 0 {
            u.write(REG_IER_DLM, iersave | IER_UUE);
            if u.read(REG_IER_DLM) & IER_UUE != 0 {
                return "XScale";
            }
        }
        u.write(REG_IER_DLM, iersave);
        // U6_16550A: a 64-byte FIFO.
        if size_fifo(u) == 64 {
            return "U6_16550A";
        }
        "16550A"
    }

    /// Enables interrupts as `serial8250_do_startup` leaves a port: 8N1, DTR,
    /// RTS and OUT2, FIFOs on with the 8-byte trigger.
    fn started() -> Uart16550 {
        let mut u = Uart16550::new();
        u.write(REG_LCR, 0x03);
        u.write(REG_MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        u.write(REG_IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | 0x80);
        u
    }

    #[test]
    fn linux_autoconfig_finds_a_16550a() {
        let mut u = Uart16550::new();
        assert_eq!(linux_autoconfig(&mut u), "16550A");
        // The probes leave the port quiet.
        assert_eq!(u.read(REG_IER_DLM), 0);
        assert_eq!(u.read(REG_LCR), 0);
        assert_eq!(u.read(REG_IIR_FCR), IIR_NO_INT);
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT);
        assert!(!u.irq_level());
    }

    #[test]
    fn scratch_register_holds_any_byte() {
        let mut u = Uart16550::new();
        for v in [0xa5, 0x5a, 0x00, 0xff] {
            u.write(REG_SCR, v);
            assert_eq!(u.read(REG_SCR), v);
        }
    }

    #[test]
    fn ier_keeps_only_the_four_16550a_enables() {
        let mut u = Uart16550::new();
        u.write(REG_IER_DLM, 0xff);
        assert_eq!(u.read(REG_IER_DLM), 0x0f);
        u.write(REG_IER_DLM, 0);
        assert_eq!(u.read(REG_IER_DLM), 0);
    }

    #[test]
    fn loopback_msr_reflects_mcr_with_deltas() {
        let mut u = Uart16550::new();
        assert_eq!(
            u.read(REG_MSR),
            MSR_CTS | MSR_DSR | MSR_DCD,
            "a connected line"
        );
        u.write(REG_MCR, MCR_LOOP | MCR_RTS | MCR_OUT2);
        // DSR dropped (DTR clear), CTS and DCD stay: only DDSR changes.
        assert_eq!(u.read(REG_MSR), 0x90 | MSR_DDSR);
        assert_eq!(u.read(REG_MSR), 0x90, "reading MSR clears the deltas");
        u.write(REG_MCR, MCR_LOOP | MCR_DTR | MCR_OUT1);
        assert_eq!(
            u.read(REG_MSR),
            MSR_DSR | MSR_RI | MSR_DCTS | MSR_DDSR | MSR_DDCD
        );
        u.write(REG_MCR, MCR_LOOP | MCR_DTR);
        assert_eq!(u.read(REG_MSR), MSR_DSR | MSR_TERI, "RI's trailing edge");
    }

    #[test]
    fn fcr_enables_fifos_in_iir_top_bits() {
        let mut u = Uart16550::new();
        assert_eq!(u.read(REG_IIR_FCR), IIR_NO_INT);
        u.write(REG_IIR_FCR, 0xe7);
        assert_eq!(u.read(REG_IIR_FCR) & 0xc0, 0xc0);
        assert_eq!(u.read(REG_IIR_FCR), 0xc1, "no 16750 bit 5, no interrupt");
        u.write(REG_IIR_FCR, 0);
        assert_eq!(u.read(REG_IIR_FCR), IIR_NO_INT);
    }

    #[test]
    fn efr_probe_at_lcr_bf_finds_no_efr() {
        let mut u = Uart16550::new();
        u.write(REG_IIR_FCR, FCR_ENABLE);
        for lcr in [LCR_CONF_MODE_A, LCR_CONF_MODE_B] {
            u.write(REG_LCR, lcr);
            assert_ne!(
                u.read(REG_IIR_FCR),
                0,
                "EFR must not read as 0 at LCR={lcr:#x}"
            );
        }
        // An "EFR" write at LCR=0xBF is an FCR write on a 16550A; the divisor
        // latch, not an EFR, sits at offsets 0 and 1.
        u.write(REG_IIR_FCR, 0);
        assert_eq!(u.read(REG_IIR_FCR), IIR_NO_INT);
        u.write(REG_RBR_THR_DLL, 0x34);
        assert_eq!(u.read(REG_RBR_THR_DLL), 0x34);
    }

    #[test]
    fn size_fifo_counts_16_bytes() {
        let mut u = Uart16550::new();
        u.write(REG_LCR, 0x03);
        u.write(REG_MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        assert_eq!(size_fifo(&mut u), 16);
        // Everything restored, divisor included.
        assert_eq!(u.read(REG_LCR), 0x03);
        assert_eq!(u.read(REG_MCR), MCR_DTR | MCR_RTS | MCR_OUT2);
        u.write(REG_LCR, LCR_CONF_MODE_A);
        assert_eq!((u.read(0), u.read(1)), (12, 0));
    }

    #[test]
    fn size_fifo_counts_one_byte_without_fifos() {
        // The 16450-mode RBR holds a single byte; the rest overrun.
        let mut u = Uart16550::new();
        u.write(REG_MCR, MCR_LOOP);
        for byte in 0..4 {
            u.write(REG_RBR_THR_DLL, byte);
        }
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT | LSR_OE | LSR_DR);
        assert_eq!(u.read(REG_RBR_THR_DLL), 0);
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0);
    }

    #[test]
    fn transmit_returns_the_byte() {
        let mut u = started();
        assert_eq!(u.write(REG_RBR_THR_DLL, b'A'), Some(b'A'));
        assert_eq!(u.read(REG_LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0, "nothing looped back");
        // Other registers transmit nothing.
        for offset in 1..=7 {
            assert_eq!(u.write(offset, 0), None);
        }
    }

    #[test]
    fn loopback_echoes_into_rbr() {
        let mut u = started();
        u.write(REG_MCR, MCR_LOOP);
        assert_eq!(u.write(REG_RBR_THR_DLL, b'x'), None);
        assert_eq!(u.write(REG_RBR_THR_DLL, b'y'), None);
        assert!(!u.can_receive(), "the line is cut off in loopback");
        assert!(!u.receive(b'z'));
        assert_eq!(u.read(REG_LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(REG_RBR_THR_DLL), b'x');
        assert_eq!(u.read(REG_RBR_THR_DLL), b'y');
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0);
        u.write(REG_MCR, 0);
        assert_eq!(u.write(REG_RBR_THR_DLL, b'!'), Some(b'!'));
    }

    #[test]
    fn receive_fills_rbr_in_order_until_full() {
        let mut u = started();
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0);
        for i in 0..16u8 {
            assert!(u.can_receive());
            assert!(u.receive(i));
        }
        assert!(!u.can_receive());
        assert!(!u.receive(0xee), "a full FIFO drops the byte");
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT | LSR_DR | LSR_OE);
        assert_eq!(
            u.read(REG_LSR),
            LSR_THRE | LSR_TEMT | LSR_DR,
            "LSR read clears OE"
        );
        for i in 0..16u8 {
            assert_eq!(u.read(REG_LSR) & LSR_DR, LSR_DR);
            assert_eq!(u.read(REG_RBR_THR_DLL), i);
        }
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0);
        assert!(u.can_receive());
        // The ring wraps.
        assert!(u.receive(b'a'));
        assert_eq!(u.read(REG_RBR_THR_DLL), b'a');
    }

    #[test]
    fn fcr_clears_the_receive_fifo() {
        let mut u = started();
        u.receive(1);
        u.receive(2);
        u.write(REG_IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0);
        u.receive(3);
        u.write(REG_IIR_FCR, 0); // leaving FIFO mode resets the FIFO too
        assert_eq!(u.read(REG_LSR) & LSR_DR, 0);
        assert!(u.receive(4));
        assert!(!u.can_receive(), "one byte without FIFOs");
    }

    #[test]
    fn thre_interrupt_edges() {
        let mut u = started();
        assert!(!u.take_irq_edge());
        // Enabling ETBEI with the THR empty raises THRE.
        u.write(REG_IER_DLM, IER_ETBEI);
        assert!(u.irq_level());
        assert!(u.take_irq_edge());
        assert!(!u.take_irq_edge(), "one edge, reported once");
        // The IIR read reporting THRE acknowledges it.
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_THRI);
        assert!(!u.irq_level());
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_NO_INT);
        // A THR write: transmitted, THR empty again, a new edge.
        assert_eq!(u.write(REG_RBR_THR_DLL, b'a'), Some(b'a'));
        assert!(u.irq_level());
        assert!(u.take_irq_edge());
        // Another THR write without an IIR read in between: the line drops and
        // rises again inside the write, which must still count as an edge.
        assert_eq!(u.write(REG_RBR_THR_DLL, b'b'), Some(b'b'));
        assert!(u.irq_level());
        assert!(
            u.take_irq_edge(),
            "falling-then-rising edge inside a THR write"
        );
        // Disabling ETBEI drops the line.
        u.write(REG_IER_DLM, 0);
        assert!(!u.irq_level());
        assert!(!u.take_irq_edge());
    }

    #[test]
    fn linux_thre_and_txen_tests_pass() {
        // serial8250_do_startup: ETBEI on -> THRE; off and on again -> THRE again
        // (else UART_BUG_THRE).
        let mut u = Uart16550::new();
        u.write(REG_IER_DLM, IER_ETBEI);
        let iir1 = u.read(REG_IIR_FCR);
        u.write(REG_IER_DLM, 0);
        u.write(REG_IER_DLM, IER_ETBEI);
        let iir = u.read(REG_IIR_FCR);
        u.write(REG_IER_DLM, 0);
        assert_eq!(iir1 & IIR_NO_INT, 0);
        assert_eq!(iir & IIR_NO_INT, 0, "THRE must be reasserted");
        // The TXEN test: TEMT and no interrupt would set UART_BUG_TXEN.
        u.write(REG_IER_DLM, IER_ETBEI);
        let lsr = u.read(REG_LSR);
        let iir = u.read(REG_IIR_FCR);
        u.write(REG_IER_DLM, 0);
        assert!(lsr & LSR_TEMT != 0 && iir & IIR_NO_INT == 0);
    }

    #[test]
    fn out2_gates_the_irq_line() {
        let mut u = Uart16550::new();
        u.write(REG_IER_DLM, IER_ERBFI);
        assert!(u.receive(b'k'));
        assert_eq!(u.read(REG_IIR_FCR), IIR_RDI, "pending inside the UART");
        assert!(!u.irq_level(), "but OUT2 is clear");
        assert!(!u.take_irq_edge());
        u.write(REG_MCR, MCR_OUT2);
        assert!(u.irq_level());
        assert!(u.take_irq_edge(), "setting OUT2 raises the line");
        u.write(REG_MCR, 0);
        assert!(!u.irq_level());
        u.read(REG_RBR_THR_DLL);
        u.write(REG_MCR, MCR_OUT2);
        assert!(!u.irq_level(), "nothing pending any more");
    }

    #[test]
    fn received_data_beats_thre() {
        let mut u = started();
        u.write(REG_IER_DLM, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI);
        assert!(u.take_irq_edge());
        assert!(u.receive(b'q'));
        assert!(!u.take_irq_edge(), "the line was already high");
        // One byte below the 8-byte trigger: character timeout, ahead of THRE.
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_RX_TIMEOUT);
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_RX_TIMEOUT);
        for b in 0..7 {
            u.receive(b);
        }
        assert_eq!(
            u.read(REG_IIR_FCR),
            IIR_FIFOS_ENABLED | IIR_RDI,
            "at the trigger"
        );
        // Draining the FIFO reveals THRE, not yet acknowledged.
        while u.read(REG_LSR) & LSR_DR != 0 {
            u.read(REG_RBR_THR_DLL);
        }
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_THRI);
        // Then the modem status change from setting loopback, lowest priority.
        u.write(REG_MCR, MCR_OUT2 | MCR_LOOP);
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_MSI);
        u.read(REG_MSR);
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_NO_INT);
        // An overrun (loopback into a full FIFO) outranks received data.
        for b in 0..17 {
            u.write(REG_RBR_THR_DLL, b);
        }
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_RLSI);
        u.read(REG_LSR);
        assert_eq!(u.read(REG_IIR_FCR), IIR_FIFOS_ENABLED | IIR_RDI);
    }

    #[test]
    fn rx_interrupt_edge_when_enabled_after_data() {
        let mut u = started();
        assert!(u.receive(b'r'));
        assert!(!u.take_irq_edge(), "ERBFI still off");
        u.write(REG_IER_DLM, IER_ERBFI | IER_ELSI);
        assert!(u.take_irq_edge());
        assert_eq!(u.read(REG_RBR_THR_DLL), b'r');
        assert!(!u.irq_level());
        assert!(u.receive(b's'));
        assert!(u.take_irq_edge(), "new input raises the line again");
    }

    #[test]
    fn divisor_latch_with_dlab() {
        let mut u = Uart16550::new();
        u.write(REG_IER_DLM, IER_ERBFI);
        u.write(REG_LCR, LCR_DLAB | 0x03);
        assert_eq!((u.read(0), u.read(1)), (12, 0), "9600 baud at reset");
        // 115200 baud: divisor 1.
        assert_eq!(u.write(0, 0x01), None, "DLL write transmits nothing");
        u.write(1, 0x02);
        assert_eq!((u.read(0), u.read(1)), (0x01, 0x02));
        u.write(REG_LCR, 0x03);
        assert_eq!(u.read(REG_IER_DLM), IER_ERBFI, "IER untouched by DLM");
        assert_eq!(u.write(0, b'T'), Some(b'T'));
        u.write(REG_LCR, LCR_DLAB);
        assert_eq!(
            (u.read(0), u.read(1)),
            (0x01, 0x02),
            "THR untouched the latch"
        );
    }

    #[test]
    fn offsets_past_seven_decode_nothing() {
        let mut u = Uart16550::new();
        assert_eq!(u.write(8, b'x'), None);
        assert_eq!(u.read(8), 0xff);
        assert_eq!(u.read(REG_SCR), 0);
    }
}
