//! x86-64 platform code: the address map, boot protocols, CPU state and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
pub mod regs;
