//! Decoding the guest instruction that touched an emulated MMIO page (there are no
//! decode assists under TCG, and none are relied on anywhere): `mov` between a
//! general register (or an immediate) and memory, 1 to 8 bytes.

use iced_x86::{Decoder, DecoderOptions, OpKind};
/// The register and mnemonic types of [`Access`] and [`MmioError`].
pub use iced_x86::{Mnemonic, Register};

use crate::GuestRegs;

/// What the instruction does to the MMIO location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Loads `size` bytes into `reg`.
    Read {
        /// Destination register.
        reg: Register,
        /// Bytes.
        size: u8,
    },
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
    if ins.mnemonic() != Mnemonic::Mov || ins.op_count() != 2 {
        return Err(MmioError::Unsupported(ins.mnemonic()));
    }
    match (ins.op0_kind(), ins.op1_kind()) {
        (OpKind::Register, OpKind::Memory) => {
            let reg = ins.op0_register();
            slot(regs, reg.full_register()).ok_or(MmioError::Unsupported(ins.mnemonic()))?;
            Ok((
                Access::Read {
                    reg,
                    size: reg.size() as u8,
                },
                len,
            ))
        }
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

/// Completes a read: writes `value` into `reg` as the CPU would (32-bit destinations
/// zero-extend, 8/16-bit ones merge).
pub fn complete_read(regs: &mut GuestRegs, reg: Register, value: u64) {
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
        Access::Read { reg, size }
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
        complete_read(&mut r, Register::EAX, 0xdead_beef_cafe);
        assert_eq!(r.rax, 0xbeef_cafe);
        // mov ah, [rdi]: merges into bits 8-15.
        let decoded = decode(&[0x8a, 0x27], &mut r);
        assert_eq!(decoded, Ok((read(Register::AH, 1), 2)));
        complete_read(&mut r, Register::AH, 0x1ff);
        assert_eq!(r.rax, 0xbeef_fffe);
        // mov r15w, [rdi]: merges the low 16 bits.
        let decoded = decode(&[0x66, 0x44, 0x8b, 0x3f], &mut r);
        assert_eq!(decoded, Ok((read(Register::R15W, 2), 4)));
        complete_read(&mut r, Register::R15W, 0x1234);
        assert_eq!(r.r15, 0xffff_ffff_ffff_1234);
        // mov rbx, [rdi]: all 64 bits.
        let decoded = decode(&[0x48, 0x8b, 0x1f], &mut r);
        assert_eq!(decoded, Ok((read(Register::RBX, 8), 3)));
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
        // Completing into a register GuestRegs lacks changes nothing.
        let before = r;
        complete_read(&mut r, Register::RSP, 1);
        assert_eq!(r, before);
    }
}
