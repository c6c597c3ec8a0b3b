//! The MSI-X table and Pending Bit Array (PBA) of a virtual PCI function, as pure
//! logic (PCI Local Bus 3.0, 6.8.2; virtio 1.2, 4.1.4.5).
//!
//! Each entry is 16 bytes in the table: message address (low, high), message data
//! and vector control (bit 0: mask). The function signals entry `i` with
//! [`MsixTable::signal`]:
//!
//! - MSI-X disabled in the message control register: nothing is sent and nothing is
//!   held (the function would use INTx, which this device does not have);
//! - the entry masked, or the whole function masked (message control bit 14): the
//!   message is not sent, the entry's pending bit is set instead;
//! - otherwise the message (the entry's address and data as they are now) is sent.
//!
//! A pending message is sent, once, as soon as it becomes deliverable: when the
//! driver clears the entry's mask bit, clears the function mask, or enables MSI-X
//! again. Every such change returns the entries released by it
//! ([`MsixTable::write`], [`MsixTable::set_control`]), so the caller delivers them
//! right away. The PBA reads the pending bits, one per entry, in 64-bit words; it is
//! read-only. Each of up to 64 entries is one bit of one word here.

/// Bytes of one table entry.
pub const ENTRY_BYTES: u64 = 16;
/// Most entries a [`MsixTable`] models (one PBA word).
pub const MAX_ENTRIES: usize = 64;

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control bit 0: masked.
    pub masked: bool,
}

impl Default for MsixEntry {
    /// Every entry is masked after reset (PCI Local Bus 3.0, 6.8.2.9).
    fn default() -> Self {
        Self {
            addr: 0,
            data: 0,
            masked: true,
        }
    }
}

/// What [`MsixTable::signal`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Send this message (address, data) now.
    Send(u64, u32),
    /// Held in the PBA until the entry and the function are unmasked.
    Pending,
    /// Not sent and not held: MSI-X is disabled, or there is no such entry.
    Dropped,
}

/// The MSI-X state of one function with `N` entries (`N <= 64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixTable<const N: usize> {
    entries: [MsixEntry; N],
    pending: u64,
    enabled: bool,
    function_masked: bool,
}

impl<const N: usize> Default for MsixTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> MsixTable<N> {
    const ALL: u64 = if N >= 64 { u64::MAX } else { (1u64 << N) - 1 };

    /// A table after reset: MSI-X disabled, every entry masked, nothing pending.
    pub const fn new() -> Self {
        assert!(N > 0 && N <= MAX_ENTRIES);
        Self {
            entries: [MsixEntry {
                addr: 0,
                data: 0,
                masked: true,
            }; N],
            pending: 0,
            enabled: false,
            function_masked: false,
        }
    }

    /// Entry `i`, if it exists.
    pub fn entry(&self, i: usize) -> Option<&MsixEntry> {
        self.entries.get(i)
    }

    /// The pending bits (bit `i`: entry `i`), as the PBA's first word reads.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Whether MSI-X is enabled (message control bit 15).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the whole function is masked (message control bit 14).
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Whether a message of entry `i` would be sent now.
    fn deliverable(&self, i: usize) -> bool {
        self.enabled && !self.function_masked && self.entries.get(i).is_some_and(|e| !e.masked)
    }

    /// Takes the pending entries that are deliverable now (their bits are cleared).
    fn release(&mut self) -> u64 {
        let mut out = 0;
        for i in 0..N {
            if self.pending & (1 << i) != 0 && self.deliverable(i) {
                out |= 1 << i;
            }
        }
        self.pending &= !out;
        out
    }

    /// The message entry `i` sends now (address, data).
    pub fn message(&self, i: usize) -> Option<(u64, u32)> {
        self.entries.get(i).map(|e| (e.addr, e.data))
    }

    /// The function signals entry `i`.
    pub fn signal(&mut self, i: usize) -> Signal {
        let Some(e) = self.entries.get(i) else {
            return Signal::Dropped;
        };
        if !self.enabled {
            return Signal::Dropped;
        }
        if e.masked || self.function_masked {
            self.pending |= 1 << i;
            return Signal::Pending;
        }
        Signal::Send(e.addr, e.data)
    }

    /// The driver wrote the message control register's enable (bit 15) and function
    /// mask (bit 14). Returns the entries whose pending message must be sent now
    /// (bit `i`: entry `i`; see [`message`](Self::message)).
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) -> u64 {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.release()
    }

    /// Reads `size` bytes (4 or 8) at `off` in the table; anything that is not a
    /// field reads 0.
    pub fn read(&self, off: u64, size: u8) -> u64 {
        let (i, field) = ((off / ENTRY_BYTES) as usize, off % ENTRY_BYTES);
        let Some(e) = self.entries.get(i) else {
            return 0;
        };
        match (field, size) {
            (0, 8) => e.addr,
            (0, _) => e.addr & 0xffff_ffff,
            (4, _) => e.addr >> 32,
            (8, 8) => u64::from(e.data) | (u64::from(e.masked) << 32),
            (8, _) => u64::from(e.data),
            (12, _) => u64::from(e.masked),
            _ => 0,
        }
    }

    /// Writes `size` bytes (4 or 8) at `off` in the table. Returns the entries whose
    /// pending message must be sent now, because this write unmasked them.
    pub fn write(&mut self, off: u64, size: u8, v: u64) -> u64 {
        let (i, field) = ((off / ENTRY_BYTES) as usize, off % ENTRY_BYTES);
        let Some(e) = self.entries.get_mut(i) else {
            return 0;
        };
        match (field, size) {
            (0, 8) => e.addr = v,
            (0, _) => e.addr = (e.addr & !0xffff_ffff) | (v & 0xffff_ffff),
            (4, _) => e.addr = (e.addr & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
            (8, 8) => {
                e.data = v as u32;
                e.masked = (v >> 32) & 1 != 0;
            }
            (8, _) => e.data = v as u32,
            (12, _) => e.masked = v & 1 != 0,
            _ => {}
        }
        self.release()
    }

    /// Reads `size` bytes at `off` in the PBA: the pending bits, little-endian.
    /// Writes to the PBA are ignored (it is read-only).
    pub fn read_pba(&self, off: u64, size: u8) -> u64 {
        let bits = (self.pending & Self::ALL) as u128;
        let Some(shifted) = off.checked_mul(8).and_then(|s| u32::try_from(s).ok()) else {
            return 0;
        };
        let v = bits.checked_shr(shifted).unwrap_or(0) as u64;
        match size {
            1 => v & 0xff,
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn programmed() -> MsixTable<3> {
        let mut t = MsixTable::<3>::new();
        assert_eq!(t.set_control(true, true), 0);
        for i in 0..3u64 {
            t.write(i * 16, 4, 0xfee0_0000);
            t.write(i * 16 + 4, 4, 0);
            t.write(i * 16 + 8, 4, 0x40 + i);
            assert_eq!(t.write(i * 16 + 12, 4, 0), 0);
        }
        assert_eq!(t.set_control(true, false), 0);
        t
    }

    #[test]
    fn entries_start_masked_and_msix_disabled_drops() {
        let mut t = MsixTable::<3>::new();
        assert_eq!(t.read(12, 4), 1);
        assert_eq!(t.signal(0), Signal::Dropped);
        assert_eq!(t.pending(), 0);
        t.set_control(true, false);
        assert_eq!(t.signal(0), Signal::Pending, "masked at reset");
        assert_eq!(t.signal(3), Signal::Dropped, "no such entry");
    }

    #[test]
    fn an_unmasked_entry_sends_its_message() {
        let mut t = programmed();
        assert_eq!(t.signal(1), Signal::Send(0xfee0_0000, 0x41));
        assert_eq!(t.pending(), 0);
        assert_eq!(t.read(16 + 8, 4), 0x41);
        assert_eq!(t.read(16, 8), 0xfee0_0000);
    }

    #[test]
    fn a_masked_entry_holds_its_message_until_unmasked() {
        let mut t = programmed();
        t.write(16 + 12, 4, 1);
        assert_eq!(t.signal(1), Signal::Pending);
        assert_eq!(
            t.signal(1),
            Signal::Pending,
            "one pending bit, however many"
        );
        assert_eq!(t.read_pba(0, 8), 0b010);
        assert_eq!(t.read_pba(0, 4), 0b010);
        assert_eq!(t.read_pba(4, 4), 0);
        // Other entries are not held back.
        assert_eq!(t.signal(2), Signal::Send(0xfee0_0000, 0x42));
        // Changing the data while masked: the message sent is the current one.
        t.write(16 + 8, 4, 0x55);
        assert_eq!(t.write(16 + 12, 4, 0), 0b010);
        assert_eq!(t.message(1), Some((0xfee0_0000, 0x55)));
        assert_eq!(t.pending(), 0);
        assert_eq!(t.write(16 + 12, 4, 0), 0, "sent once");
    }

    #[test]
    fn the_function_mask_holds_every_entry() {
        let mut t = programmed();
        assert_eq!(t.set_control(true, true), 0);
        assert_eq!(t.signal(0), Signal::Pending);
        assert_eq!(t.signal(2), Signal::Pending);
        assert_eq!(t.read_pba(0, 8), 0b101);
        // Entry 2 is masked on its own too: only entry 0 is released.
        t.write(2 * 16 + 12, 4, 1);
        assert_eq!(t.set_control(true, false), 0b001);
        assert_eq!(t.read_pba(0, 8), 0b100);
        assert_eq!(t.write(2 * 16 + 12, 4, 0), 0b100);
        assert_eq!(t.read_pba(0, 8), 0);
    }

    #[test]
    fn disabling_msix_keeps_pending_bits_for_later() {
        let mut t = programmed();
        t.write(12, 4, 1);
        assert_eq!(t.signal(0), Signal::Pending);
        assert_eq!(t.set_control(false, false), 0);
        assert_eq!(t.signal(1), Signal::Dropped);
        t.write(12, 4, 0);
        assert_eq!(t.read_pba(0, 8), 0b001, "not deliverable while disabled");
        assert_eq!(t.set_control(true, false), 0b001);
    }

    #[test]
    fn odd_accesses_read_zero_and_change_nothing() {
        let mut t = programmed();
        let before = t;
        assert_eq!(t.write(3 * 16, 4, 0), 0);
        assert_eq!(t.write(u64::MAX, 4, 0), 0);
        assert_eq!(t.write(2, 4, 7), 0);
        assert_eq!(t, before);
        assert_eq!(t.read(u64::MAX, 8), 0);
        assert_eq!(t.read_pba(u64::MAX, 8), 0);
        assert_eq!(t.read_pba(16, 8), 0);
    }

    #[test]
    fn a_64_bit_write_sets_data_and_mask_together() {
        let mut t = programmed();
        t.write(8, 8, (1 << 32) | 0x77);
        assert_eq!(t.entry(0).map(|e| (e.data, e.masked)), Some((0x77, true)));
        assert_eq!(t.signal(0), Signal::Pending);
        assert_eq!(t.write(8, 8, 0x78), 0b001);
        assert_eq!(t.message(0), Some((0xfee0_0000, 0x78)));
    }
}
