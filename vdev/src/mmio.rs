//! Decoding the guest instruction that touched an emulated MMIO page (there are no
//! decode assists under TCG, and none are relied on anywhere): the forms compilers
//! and kernels emit for device registers. `mov` between a general register (or an
//! immediate) and memory, 1 to 8 bytes (Linux's `readb`..`readq`, `writeb`..`writeq`);
//! `movzx`/`movsx` of a byte or word and `movsxd` of a dword into a wider register
//! (what a compiler makes of a volatile 8- or 16-bit read used as a wider value).

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
