/*
 * boot.S - multiboot v1 entry for the VMBEAM test guest.
 *
 * QEMU's -kernel loader refuses 64-bit ELF multiboot images, so the guest is
 * a flat binary carrying an "a.out kludge" header (flag bit 16): the header
 * itself tells the loader where to put the file and where to jump.  We get
 * control in 32-bit protected mode with paging off, build identity page
 * tables with 2 MiB pages for the low 64 GiB, switch to long mode and call
 * guest_main(mbi) in C.
 */

#define MB_MAGIC        0x1BADB002
#define MB_FLAGS        ((1 << 1) | (1 << 16))  /* want memory map; a.out kludge */

#define PT_GIB          64                      /* physical space identity mapped */

        .section .multiboot, "a"
        .balign 4
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)
        .long   mb_header                       /* header_addr */
        .long   __image_start                   /* load_addr */
        .long   __load_end                      /* load_end_addr */
        .long   __bss_end                       /* bss_end_addr */
        .long   _start                          /* entry_addr */

        .section .text.boot, "ax"
        .code32
        .globl  _start
_start:
        cli
        cld
        /* Keep the loader's handoff for C; registers get clobbered below. */
        movl    %eax, mb_magic
        movl    %ebx, mb_info

        /* Zero .bss ourselves instead of trusting the loader to have done it:
         * the page tables below rely on unused entries being zero. */
        movl    $__bss_start, %edi
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        shrl    $2, %ecx
        xorl    %eax, %eax
        rep stosl

        /* PML4[0] -> PDPT; PDPT[i] -> PD page i (one per GiB). */
        movl    $pdpt, %eax
        orl     $0x3, %eax                      /* present | writable */
        movl    %eax, pml4

        movl    $pd, %eax
        orl     $0x3, %eax
        xorl    %ecx, %ecx
1:      movl    %eax, pdpt(,%ecx,8)
        addl    $4096, %eax
        incl    %ecx
        cmpl    $PT_GIB, %ecx
        jb      1b

        /* PD entry k maps 2 MiB page k; bits above 4 GiB go in the high dword. */
        xorl    %ecx, %ecx
2:      movl    %ecx, %eax
        shll    $21, %eax
        orl     $0x83, %eax                     /* present | writable | 2 MiB */
        movl    %eax, pd(,%ecx,8)
        movl    %ecx, %eax
        shrl    $11, %eax
        movl    %eax, pd+4(,%ecx,8)
        incl    %ecx
        cmpl    $(PT_GIB * 512), %ecx
        jb      2b

        /* Long mode: PAE, CR3, EFER.LME, then paging. */
        movl    %cr4, %eax
        orl     $(1 << 5), %eax
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $0xC0000080, %ecx
        rdmsr
        orl     $(1 << 8), %eax
        wrmsr
        movl    %cr0, %eax
        orl     $((1 << 31) | 1), %eax
        movl    %eax, %cr0

        lgdt    gdt_ptr
        ljmp    $0x08, $long_mode

        .code64
long_mode:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorw    %ax, %ax
        movw    %ax, %fs
        movw    %ax, %gs
        movq    $stack_top, %rsp
        movl    mb_magic, %edi
        movl    mb_info, %esi
        call    guest_main
3:      hlt
        jmp     3b

        .section .rodata
        .balign 8
gdt:
        .quad   0
        .quad   0x00209A0000000000              /* 0x08: 64-bit code, DPL 0 */
        .quad   0x0000920000000000              /* 0x10: data */
gdt_end:
gdt_ptr:
        .word   gdt_end - gdt - 1
        .long   gdt

        .section .data
        .balign 4
        .globl  mb_magic, mb_info
mb_magic:       .long 0
mb_info:        .long 0

        .section .bss
        .balign 4096
pml4:   .skip   4096
pdpt:   .skip   4096
pd:     .skip   4096 * PT_GIB
        .balign 16
        .skip   16384
stack_top:

        .section .note.GNU-stack, "", @progbits
