//! PVH entry: the Xen ELF note, the 32-bit entry point and the switch to long mode.
//!
//! The PVH boot protocol (Xen's `docs/misc/pvh.pandoc`, `arch-x86/hvm/start_info.h`)
//! enters `pvh_start32` in 32-bit protected mode with paging off, flat CS/DS/ES/SS,
//! and `ebx` holding the physical address of `hvm_start_info`. The entry point
//! zeroes the bss, loads its own GDT, identity-maps the first 4 GiB with 2 MiB
//! pages (PML4 + PDPT + four page directories, all in the bss), enables PAE,
//! EFER.LME and paging, far-jumps to 64-bit code and calls [`crate::kmain`] with
//! the `hvm_start_info` address on a 256 KiB bss stack (the network driver keeps two queues and its
//! frame buffers on it).
//!
//! The note (`XEN_ELFNOTE_PHYS32_ENTRY`, type 18, name "Xen") holds the entry as
//! a 4-byte `.long`. linux-loader 0.14 accepts any `descsz >= 4` and reads 4
//! bytes. QEMU 7.2 reads 8 bytes (a `size_t`) for a 64-bit ELF before cutting
//! the value to 32 bits, so the note is followed by an empty note (namesz,
//! descsz and type 0) whose first word keeps even that wide value exact. Both
//! loaders stop at the first matching note, and the note's PT_NOTE is the only
//! one (see `link.ld`).

use core::arch::global_asm;

/// Page-table entry bits.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// A 2 MiB page in a page directory entry.
pub const PTE_HUGE: u64 = 1 << 7;

global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32       /* desc: 32-bit physical entry */
    /* Empty note: keeps an 8-byte read of the desc (QEMU 7.2) exact too. */
    .long 0, 0, 0

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* hvm_start_info, kept until kmain */

    /* Zero the bss (page tables, stack, statics). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx                   /* link.ld aligns __bss_end to 8 */
    xorl %eax, %eax
    rep stosl

    movl $boot_stack_top, %esp
    lgdtl boot_gdt_ptr
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs

    /* PML4[0] -> PDPT. */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4

    /* PDPT[0..4] -> the four page directories. */
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl $boot_pdpt, %edi
    movl $4, %ecx
1:  movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    decl %ecx
    jnz 1b

    /* 2048 2 MiB pages: entry i maps i << 21, present, writable, huge. */
    movl $boot_pd, %edi
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, (%edi,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmpl $0x08, $3f

    .code64
3:  movq $boot_stack_top, %rsp
    movl %esi, %edi                 /* zero-extends: rdi = hvm_start_info */
    call {kmain}
4:  cli
    hlt
    jmp 4b

    .section .data.boot, "aw"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08: 64-bit code, accessed */
    .quad 0x00cf93000000ffff        /* 0x10: flat data, accessed */
boot_gdt_end:
    .balign 8
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .balign 16
boot_stack_bottom:
    .skip 256 * 1024
boot_stack_top:
    "#,
    kmain = sym crate::kmain,
    options(att_syntax)
);

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static boot_pml4: u8;
}

/// Physical `[start, end)` of the loaded image, bss included, page aligned.
pub fn image_range() -> (u64, u64) {
    // Addresses of linker symbols; identity mapping makes them physical.
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}

/// Physical address of the boot PML4 (identity mapped, in the bss).
pub fn pml4_addr() -> u64 {
    &raw const boot_pml4 as u64
}
