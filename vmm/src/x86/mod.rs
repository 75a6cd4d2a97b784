//! x86-64 specifics: CPUID template, MP table, boot CPU state.

pub mod cpuid;
pub mod mptable;
pub mod regs;
