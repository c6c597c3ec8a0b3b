//! Decoding the guest instruction that touched an emulated MMIO page (there are no
//! decode assists under TCG, and none are relied on anywhere): the forms compilers
//! and kernels emit for device registers. `mov` between a general register (or an
//! immediate) and memory, 1 to 8 bytes (Linux's `readb`..`readq`, `writeb`..`writeq`);
//! `movzx`/`movsx` of a byte or word and `movsxd` of a dword into a wider register
//! (what a compiler makes of a volatile 8- or 16-bit read used as a wider value);
//! `movs` and `stos` of 1 to 8 bytes, with or without `rep` (Linux's
//! `memcpy_toio`/`memcpy_fromio` and what `memset_io` compiles to), run here against
//! a [`StringBus`] the kernel gives, so their semantics are host-tested too.

use iced_x86::{Decoder, DecoderOptions, OpKind};
/// The register and mnemonic types of [`Access`] and [`MmioError`].
pub use iced_x86::{Mnemonic, Register};

use crate::GuestRegs;

/// How a loaded value is widened to its destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Not at all: the destination is as wide as the load (`mov`).
    None,
    /// With zeros (`movzx`).
    Zero,
    /// With the sign bit (`movsx`, `movsxd`).
    Sign,
}

/// A load from the MMIO location into a register, completed with
/// [`Load::complete`] once the device answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Destination register.
    pub reg: Register,
    /// Bytes read from the device (1, 2, 4 or 8).
    pub size: u8,
    /// How the value is widened to `reg`.
    pub extend: Extend,
}

/// What the instruction does to the MMIO location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Loads `size` bytes into a register.
    Read(Load),
    /// Stores `value` (`size` bytes).
    Write {
        /// Value.
        value: u64,
        /// Bytes.
        size: u8,
    },
    /// A string instruction (see [`StringOp::run`]).
    String(StringOp),
}

/// Which string instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringKind {
    /// `movs`: [RSI] to [RDI].
    Movs,
    /// `stos`: RAX's low bytes to [RDI].
    Stos,
}

/// A string instruction touching the MMIO location (as source or destination), run
/// with [`StringOp::run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringOp {
    /// Which.
    pub kind: StringKind,
    /// Bytes per element (1, 2, 4 or 8).
    pub size: u8,
    /// With a `rep` prefix: RCX elements.
    pub rep: bool,
}

/// Guest-virtual memory as a string instruction reaches it (RAM or a device, through
/// the guest's page tables): the kernel's side of [`StringOp::run`].
pub trait StringBus {
    /// Reads `size` bytes at guest-virtual `va`; `None`: the access faults or is not
    /// emulated.
    fn read(&mut self, va: u64, size: u8) -> Option<u64>;
    /// Writes the low `size` bytes of `value` at `va`; false as for `read`.
    fn write(&mut self, va: u64, size: u8, value: u64) -> bool;
}

/// How far [`StringOp::run`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringProgress {
    /// Finished: the instruction is done (skip it).
    Done,
    /// Elements remain (RCX > 0): the instruction runs again from the same RIP, as a
    /// CPU resumes an interrupted `rep` (SDM 2, REP: "interrupted ... resumed").
    Partial,
    /// An element could not be read or written; the registers show the elements done.
    Fault,
}

/// Why an MMIO instruction could not be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// Not a valid instruction.
    Invalid,
    /// Valid but not an emulated form (string ops, RMW arithmetic, RSP operands...).
    Unsupported(Mnemonic),
}

fn slot(regs: &mut GuestRegs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn reg_value(regs: &mut GuestRegs, r: Register) -> Option<u64> {
    let v = *slot(regs, r.full_register())?;
    Some(match r.size() {
        1 if matches!(r, Register::AH | Register::BH | Register::CH | Register::DH) => {
            (v >> 8) & 0xff
        }
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    })
}

/// Decodes the instruction in `bytes` (64-bit mode). Returns the access and the
/// instruction's length.
pub fn decode(bytes: &[u8], regs: &mut GuestRegs) -> Result<(Access, usize), MmioError> {
    let mut d = Decoder::new(64, bytes, DecoderOptions::NONE);
    let ins = d.decode();
    if ins.is_invalid() {
        return Err(MmioError::Invalid);
    }
    let len = ins.len();
    if let Some(op) = string_op(&ins)? {
        return Ok((Access::String(op), len));
    }
    let extend = match ins.mnemonic() {
        Mnemonic::Mov => Extend::None,
        Mnemonic::Movzx => Extend::Zero,
        Mnemonic::Movsx | Mnemonic::Movsxd => Extend::Sign,
        m => return Err(MmioError::Unsupported(m)),
    };
    if ins.op_count() != 2 {
        return Err(MmioError::Unsupported(ins.mnemonic()));
    }
    match (ins.op0_kind(), ins.op1_kind()) {
        (OpKind::Register, OpKind::Memory) => {
            let reg = ins.op0_register();
            slot(regs, reg.full_register()).ok_or(MmioError::Unsupported(ins.mnemonic()))?;
            let size = match extend {
                Extend::None => reg.size(),
                Extend::Zero | Extend::Sign => ins.memory_size().size(),
            };
            if !matches!(size, 1 | 2 | 4 | 8) || size > reg.size() {
                return Err(MmioError::Unsupported(ins.mnemonic()));
            }
            Ok((
                Access::Read(Load {
                    reg,
                    size: size as u8,
                    extend,
                }),
                len,
            ))
        }
        _ if extend != Extend::None => Err(MmioError::Unsupported(ins.mnemonic())),
        (OpKind::Memory, OpKind::Register) => {
            let reg = ins.op1_register();
            let value = reg_value(regs, reg).ok_or(MmioError::Unsupported(ins.mnemonic()))?;
            Ok((
                Access::Write {
                    value,
                    size: reg.size() as u8,
                },
                len,
            ))
        }
        (
            OpKind::Memory,
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate32to64,
        ) => {
            let size = ins.memory_size().size() as u8;
            Ok((
                Access::Write {
                    value: ins.immediate(1),
                    size,
                },
                len,
            ))
        }
        _ => Err(MmioError::Unsupported(ins.mnemonic())),
    }
}

/// The string instruction `ins` is, if it is one: `Ok(None)` for other instructions.
/// 32-bit addressing (an 0x67 prefix) and FS/GS sources are refused.
fn string_op(ins: &iced_x86::Instruction) -> Result<Option<StringOp>, MmioError> {
    let kind = match ins.mnemonic() {
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsq => StringKind::Movs,
        // MOVSD is also SSE's scalar move: the string form writes ES:[RDI].
        Mnemonic::Movsd if ins.op0_kind() == OpKind::MemoryESRDI => StringKind::Movs,
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => StringKind::Stos,
        Mnemonic::Movsd => return Ok(None),
        m @ (Mnemonic::Lodsb
        | Mnemonic::Lodsw
        | Mnemonic::Lodsd
        | Mnemonic::Lodsq
        | Mnemonic::Cmpsb
        | Mnemonic::Cmpsw
        | Mnemonic::Cmpsd
        | Mnemonic::Cmpsq
        | Mnemonic::Scasb
        | Mnemonic::Scasw
        | Mnemonic::Scasd
        | Mnemonic::Scasq) => return Err(MmioError::Unsupported(m)),
        _ => return Ok(None),
    };
    let unsupported = Err(MmioError::Unsupported(ins.mnemonic()));
    if ins.op0_kind() != OpKind::MemoryESRDI {
        return unsupported;
    }
    if kind == StringKind::Movs
        && (ins.op1_kind() != OpKind::MemorySegRSI
            || matches!(ins.memory_segment(), Register::FS | Register::GS))
    {
        return unsupported;
    }
    let size = ins.memory_size().size();
    if !matches!(size, 1 | 2 | 4 | 8) {
        return unsupported;
    }
    Ok(Some(StringOp {
        kind,
        size: size as u8,
        rep: ins.has_rep_prefix() || ins.has_repne_prefix(),
    }))
}

impl StringOp {
    /// Runs the instruction on `regs` against `bus`, at most `max` elements (then
    /// [`StringProgress::Partial`] if more remain); `df` is RFLAGS.DF (addresses go
    /// down). RSI, RDI and, with `rep`, RCX advance per element done, as on the CPU.
    pub fn run(
        &self,
        regs: &mut GuestRegs,
        df: bool,
        bus: &mut impl StringBus,
        max: u64,
    ) -> StringProgress {
        let step = if df {
            0u64.wrapping_sub(u64::from(self.size))
        } else {
            u64::from(self.size)
        };
        let mut done = 0;
        loop {
            if self.rep && regs.rcx == 0 {
                return StringProgress::Done;
            }
            if done == max {
                return StringProgress::Partial;
            }
            let value = match self.kind {
                StringKind::Movs => match bus.read(regs.rsi, self.size) {
                    Some(v) => v,
                    None => return StringProgress::Fault,
                },
                StringKind::Stos => regs.rax,
            } & mask(self.size);
            if !bus.write(regs.rdi, self.size, value) {
                return StringProgress::Fault;
            }
            if self.kind == StringKind::Movs {
                regs.rsi = regs.rsi.wrapping_add(step);
            }
            regs.rdi = regs.rdi.wrapping_add(step);
            done += 1;
            if !self.rep {
                return StringProgress::Done;
            }
            regs.rcx -= 1;
        }
    }
}

fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(size) * 8)) - 1
    }
}

impl Load {
    /// Completes the load with the device's `value` (its low `size` bytes count):
    /// widened as the instruction says, then written into the register as the CPU
    /// would (32-bit destinations zero-extend, 8/16-bit ones merge).
    pub fn complete(&self, regs: &mut GuestRegs, value: u64) {
        let bits = u32::from(self.size) * 8;
        let value = match bits {
            64 => value,
            _ => {
                let low = value & ((1u64 << bits) - 1);
                match self.extend {
                    Extend::Sign if low >> (bits - 1) & 1 == 1 => low | !((1u64 << bits) - 1),
                    _ => low,
                }
            }
        };
        complete_read(regs, self.reg, value);
    }
}

/// Writes `value` into `reg` as the CPU would (32-bit destinations zero-extend,
/// 8/16-bit ones merge).
fn complete_read(regs: &mut GuestRegs, reg: Register, value: u64) {
    let high8 = matches!(
        reg,
        Register::AH | Register::BH | Register::CH | Register::DH
    );
    let size = reg.size();
    let Some(s) = slot(regs, reg.full_register()) else {
        return;
    };
    *s = match size {
        1 if high8 => (*s & !0xff00) | ((value & 0xff) << 8),
        1 => (*s & !0xff) | (value & 0xff),
        2 => (*s & !0xffff) | (value & 0xffff),
        4 => value & 0xffff_ffff,
        _ => value,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> GuestRegs {
        GuestRegs {
            rax: 0x1111_1111_1111_1111,
            rbx: 0x2222_2222_2222_2222,
            rcx: 0x3333_3333_3333_3333,
            rdx: 0x4444_4444_4444_4444,
            r15: 0xffff_ffff_ffff_ffff,
            ..GuestRegs::default()
        }
    }

    fn read(reg: Register, size: u8) -> Access {
        Access::Read(Load {
            reg,
            size,
            extend: Extend::None,
        })
    }

    fn load(bytes: &[u8], r: &mut GuestRegs) -> (Load, usize) {
        match decode(bytes, r) {
            Ok((Access::Read(l), len)) => (l, len),
            other => panic!("{bytes:x?}: {other:?}"),
        }
    }

    fn write(value: u64, size: u8) -> Access {
        Access::Write { value, size }
    }

    #[test]
    fn register_reads_complete_like_the_cpu() {
        let mut r = regs();
        // mov eax, [rdi]: zero-extends.
        let decoded = decode(&[0x8b, 0x07], &mut r);
        assert_eq!(decoded, Ok((read(Register::EAX, 4), 2)));
        load(&[0x8b, 0x07], &mut r)
            .0
            .complete(&mut r, 0xdead_beef_cafe);
        assert_eq!(r.rax, 0xbeef_cafe);
        // mov ah, [rdi]: merges into bits 8-15.
        let decoded = decode(&[0x8a, 0x27], &mut r);
        assert_eq!(decoded, Ok((read(Register::AH, 1), 2)));
        load(&[0x8a, 0x27], &mut r).0.complete(&mut r, 0x1ff);
        assert_eq!(r.rax, 0xbeef_fffe);
        // mov r15w, [rdi]: merges the low 16 bits.
        let decoded = decode(&[0x66, 0x44, 0x8b, 0x3f], &mut r);
        assert_eq!(decoded, Ok((read(Register::R15W, 2), 4)));
        load(&[0x66, 0x44, 0x8b, 0x3f], &mut r)
            .0
            .complete(&mut r, 0x1234);
        assert_eq!(r.r15, 0xffff_ffff_ffff_1234);
        // mov rbx, [rdi]: all 64 bits.
        let decoded = decode(&[0x48, 0x8b, 0x1f], &mut r);
        assert_eq!(decoded, Ok((read(Register::RBX, 8), 3)));
    }

    #[test]
    fn widening_loads_extend_like_the_cpu() {
        let mut r = regs();
        // movzx eax, word [rax+0x1c]: what a compiler makes of a volatile u16 read
        // (a virtio driver's queue_enable); zero-extends into all of RAX.
        let (l, len) = load(&[0x0f, 0xb7, 0x40, 0x1c], &mut r);
        assert_eq!(
            (l.reg, l.size, l.extend, len),
            (Register::EAX, 2, Extend::Zero, 4)
        );
        l.complete(&mut r, 0xffff_8001);
        assert_eq!(r.rax, 0x8001);
        // movzx ecx, byte [rdi]
        let (l, _) = load(&[0x0f, 0xb6, 0x0f], &mut r);
        assert_eq!((l.reg, l.size), (Register::ECX, 1));
        l.complete(&mut r, 0x1_80);
        assert_eq!(r.rcx, 0x80);
        // movsx rdx, byte [rdi]: the sign fills 64 bits.
        let (l, _) = load(&[0x48, 0x0f, 0xbe, 0x17], &mut r);
        assert_eq!((l.reg, l.size, l.extend), (Register::RDX, 1, Extend::Sign));
        l.complete(&mut r, 0x80);
        assert_eq!(r.rdx, 0xffff_ffff_ffff_ff80);
        // movsx bx, byte [rdi]: 16-bit destination merges.
        let (l, _) = load(&[0x66, 0x0f, 0xbe, 0x1f], &mut r);
        l.complete(&mut r, 0xfe);
        assert_eq!(r.rbx, 0x2222_2222_2222_fffe);
        // movsxd r15, dword [rdi]
        let (l, len) = load(&[0x4c, 0x63, 0x3f], &mut r);
        assert_eq!(
            (l.reg, l.size, l.extend, len),
            (Register::R15, 4, Extend::Sign, 3)
        );
        l.complete(&mut r, 0x8000_0000);
        assert_eq!(r.r15, 0xffff_ffff_8000_0000);
        l.complete(&mut r, 0x7fff_ffff);
        assert_eq!(r.r15, 0x7fff_ffff);
        // movsxd eax, dword [rdi]: as wide as its source, a plain move (and the
        // 32-bit destination clears the upper half).
        let (l, _) = load(&[0x63, 0x07], &mut r);
        assert_eq!((l.reg, l.size), (Register::EAX, 4));
        l.complete(&mut r, 0x8000_0000);
        assert_eq!(r.rax, 0x8000_0000);
        // movzx eax, word [rdi]: a positive value is not sign-extended.
        let (l, _) = load(&[0x0f, 0xb7, 0x07], &mut r);
        l.complete(&mut r, 0x7fff);
        assert_eq!(r.rax, 0x7fff);
    }

    #[test]
    fn writes_take_register_or_immediate() {
        let mut r = regs();
        // mov [rdi], ch
        assert_eq!(decode(&[0x88, 0x2f], &mut r), Ok((write(0x33, 1), 2)));
        // mov [rdi], edx
        let decoded = decode(&[0x89, 0x17], &mut r);
        assert_eq!(decoded, Ok((write(0x4444_4444, 4), 2)));
        // mov qword [rdi], -1 (imm32 sign-extended)
        let decoded = decode(&[0x48, 0xc7, 0x07, 0xff, 0xff, 0xff, 0xff], &mut r);
        assert_eq!(decoded, Ok((write(u64::MAX, 8), 7)));
        // mov word [rdi], 0x1234
        let decoded = decode(&[0x66, 0xc7, 0x07, 0x34, 0x12], &mut r);
        assert_eq!(decoded, Ok((write(0x1234, 2), 5)));
    }

    /// 64 KiB of guest-virtual memory at 0x1000 with an MMIO "device" page at 0x8000
    /// that records its accesses.
    struct Bus {
        ram: std::vec::Vec<u8>,
        device: std::vec::Vec<(bool, u64, u8, u64)>,
    }

    impl Bus {
        fn new() -> Self {
            Bus {
                ram: (0..0x10000u32).map(|i| i as u8).collect(),
                device: std::vec::Vec::new(),
            }
        }
    }

    impl StringBus for Bus {
        fn read(&mut self, va: u64, size: u8) -> Option<u64> {
            if (0x8000..0x9000).contains(&va) {
                let v = 0x1122_3344_5566_7788 & mask(size);
                self.device.push((false, va, size, v));
                return Some(v);
            }
            let at = usize::try_from(va.checked_sub(0x1000)?).ok()?;
            let bytes = self.ram.get(at..at + usize::from(size))?;
            Some(bytes.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b)))
        }
        fn write(&mut self, va: u64, size: u8, value: u64) -> bool {
            if (0x8000..0x9000).contains(&va) {
                self.device.push((true, va, size, value));
                return true;
            }
            let Some(at) = va.checked_sub(0x1000).and_then(|a| usize::try_from(a).ok()) else {
                return false;
            };
            match self.ram.get_mut(at..at + usize::from(size)) {
                Some(b) => {
                    b.copy_from_slice(&value.to_le_bytes()[..usize::from(size)]);
                    true
                }
                None => false,
            }
        }
    }

    fn string(bytes: &[u8]) -> StringOp {
        match decode(bytes, &mut regs()) {
            Ok((Access::String(op), len)) => {
                assert_eq!(len, bytes.len(), "{bytes:x?}");
                op
            }
            other => panic!("{bytes:x?}: {other:?}"),
        }
    }

    #[test]
    fn string_forms_decode_with_size_and_rep() {
        let s = |kind, size, rep| StringOp { kind, size, rep };
        use StringKind::{Movs, Stos};
        assert_eq!(string(&[0xa4]), s(Movs, 1, false));
        assert_eq!(string(&[0x66, 0xa5]), s(Movs, 2, false));
        assert_eq!(string(&[0xf3, 0xa5]), s(Movs, 4, true));
        assert_eq!(string(&[0xf3, 0x48, 0xa5]), s(Movs, 8, true));
        assert_eq!(string(&[0xaa]), s(Stos, 1, false));
        assert_eq!(string(&[0xf3, 0x48, 0xab]), s(Stos, 8, true));
        // SSE's movsd xmm0, [rdi] is not a string move.
        assert!(decode(&[0xf2, 0x0f, 0x10, 0x07], &mut regs()).is_err());
        // 32-bit addressing, an FS source, lods and cmps: refused.
        assert!(decode(&[0x67, 0xa4], &mut regs()).is_err());
        assert!(decode(&[0x64, 0xa4], &mut regs()).is_err());
        assert_eq!(
            decode(&[0xac], &mut regs()),
            Err(MmioError::Unsupported(Mnemonic::Lodsb))
        );
        assert!(decode(&[0xa6], &mut regs()).is_err());
    }

    #[test]
    fn rep_movsl_copies_from_ram_to_the_device_and_advances_the_registers() {
        // Linux's memcpy_toio: rep movsl, then movsw for the tail.
        let mut bus = Bus::new();
        let mut r = GuestRegs {
            rsi: 0x2000,
            rdi: 0x8000,
            rcx: 3,
            ..GuestRegs::default()
        };
        assert_eq!(
            string(&[0xf3, 0xa5]).run(&mut r, false, &mut bus, 64),
            StringProgress::Done
        );
        assert_eq!((r.rsi, r.rdi, r.rcx), (0x200c, 0x800c, 0));
        assert_eq!(
            bus.device,
            [
                (true, 0x8000, 4, 0x0302_0100),
                (true, 0x8004, 4, 0x0706_0504),
                (true, 0x8008, 4, 0x0b0a_0908)
            ]
        );
        assert_eq!(
            string(&[0x66, 0xa5]).run(&mut r, false, &mut bus, 64),
            StringProgress::Done
        );
        assert_eq!((r.rsi, r.rdi, r.rcx), (0x200e, 0x800e, 0));
        assert_eq!(bus.device[3], (true, 0x800c, 2, 0x0d0c));
    }

    #[test]
    fn movs_from_the_device_lands_in_ram_and_df_counts_down() {
        let mut bus = Bus::new();
        let mut r = GuestRegs {
            rsi: 0x8008,
            rdi: 0x3008,
            rcx: 2,
            ..GuestRegs::default()
        };
        let op = string(&[0xf3, 0x48, 0xa5]);
        assert_eq!(op.run(&mut r, true, &mut bus, 64), StringProgress::Done);
        assert_eq!((r.rsi, r.rdi, r.rcx), (0x7ff8, 0x2ff8, 0));
        assert_eq!(
            &bus.ram[0x2000..0x2008],
            &0x1122_3344_5566_7788u64.to_le_bytes()
        );
        assert_eq!(
            &bus.ram[0x2008..0x2010],
            &0x1122_3344_5566_7788u64.to_le_bytes()
        );
    }

    #[test]
    fn rep_stops_at_the_budget_and_at_a_fault_with_exact_registers() {
        let mut bus = Bus::new();
        let mut r = GuestRegs {
            rax: 0xabcd,
            rdi: 0x8000,
            rcx: 10,
            ..GuestRegs::default()
        };
        let stosw = string(&[0xf3, 0x66, 0xab]);
        assert_eq!(
            stosw.run(&mut r, false, &mut bus, 4),
            StringProgress::Partial
        );
        assert_eq!((r.rdi, r.rcx), (0x8008, 6));
        assert_eq!(stosw.run(&mut r, false, &mut bus, 64), StringProgress::Done);
        assert_eq!((r.rdi, r.rcx, bus.device.len()), (0x8014, 0, 10));
        assert!(bus.device.iter().all(|d| d.3 == 0xabcd && d.2 == 2));
        // rep with RCX = 0 does nothing.
        assert_eq!(stosw.run(&mut r, false, &mut bus, 64), StringProgress::Done);
        assert_eq!(bus.device.len(), 10);
        // Past the end of RAM: the elements before the fault are done.
        let mut r = GuestRegs {
            rsi: 0x8000,
            rdi: 0x10ff8,
            rcx: 4,
            ..GuestRegs::default()
        };
        let movsq = string(&[0xf3, 0x48, 0xa5]);
        assert_eq!(
            movsq.run(&mut r, false, &mut bus, 64),
            StringProgress::Fault
        );
        assert_eq!((r.rsi, r.rdi, r.rcx), (0x8008, 0x11000, 3));
    }

    #[test]
    fn other_forms_are_refused() {
        let mut r = regs();
        assert_eq!(decode(&[0xff; 15], &mut r), Err(MmioError::Invalid));
        assert_eq!(decode(&[], &mut r), Err(MmioError::Invalid));
        // add [rdi], eax
        let decoded = decode(&[0x01, 0x07], &mut r);
        assert_eq!(decoded, Err(MmioError::Unsupported(Mnemonic::Add)));
        // mov rsp, [rdi] and mov [rdi], rsp: RSP is not in GuestRegs.
        assert!(decode(&[0x48, 0x8b, 0x27], &mut r).is_err());
        assert!(decode(&[0x48, 0x89, 0x27], &mut r).is_err());
        // mov es, [rdi]
        assert!(decode(&[0x8e, 0x07], &mut r).is_err());
        // mov eax, ebx: no memory operand.
        assert!(decode(&[0x89, 0xd8], &mut r).is_err());
        // movzx into RSP, or from a register: refused.
        assert!(decode(&[0x48, 0x0f, 0xb6, 0x27], &mut r).is_err());
        assert!(decode(&[0x0f, 0xb6, 0xc3], &mut r).is_err());
        // Completing into a register GuestRegs lacks changes nothing.
        let before = r;
        complete_read(&mut r, Register::RSP, 1);
        assert_eq!(r, before);
    }
}
