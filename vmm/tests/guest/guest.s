# A tiny test guest for the vdisk VMM (GNU as, AT&T syntax).
#
# It boots either through PVH (32-bit protected mode, %ebx -> hvm_start_info) or through the
# 64-bit Linux boot protocol (%rsi -> zero page); assembled with `--defsym NO_PVH=1` it has no
# PVH note, so the VMM takes the 64-bit path. The same driver code is assembled once per mode.
#
# What it does, reporting each step on COM1 (0x3f8), then resetting through the i8042:
#   1. finds `virtio_mmio.device=4K@0xADDR:GSI` on the kernel command line;
#   2. checks the virtio-mmio magic, version 2 and device id 2 (block);
#   3. negotiates VERSION_1 + FLUSH and sets up queue 0 with 8 entries;
#   4. reads sectors 0-7 and prints the 32-bit wrapping sum of their dwords;
#   5. prints the interrupt status (1 = used-buffer interrupt raised) and acknowledges it;
#   6. GET_ID and prints the serial;
#   7. writes sectors 8-9 with dword k = k * 0x9e3779b9, flushes, reads them back and prints
#      the sum;
#   8. prints "done" and writes 0xfe to port 0x64.
# Interrupts stay masked; completions are found by polling the used ring. Every instruction
# is emulated on slow hosts, so the guest stays a few thousand instructions long.

        .set COM1, 0x3f8
        .set MMIO_MAGIC, 0x00
        .set MMIO_VERSION, 0x04
        .set MMIO_DEVICE_ID, 0x08
        .set MMIO_DEVICE_FEATURES, 0x10
        .set MMIO_DEVICE_FEATURES_SEL, 0x14
        .set MMIO_DRIVER_FEATURES, 0x20
        .set MMIO_DRIVER_FEATURES_SEL, 0x24
        .set MMIO_QUEUE_SEL, 0x30
        .set MMIO_QUEUE_NUM_MAX, 0x34
        .set MMIO_QUEUE_NUM, 0x38
        .set MMIO_QUEUE_READY, 0x44
        .set MMIO_QUEUE_NOTIFY, 0x50
        .set MMIO_INTERRUPT_STATUS, 0x60
        .set MMIO_INTERRUPT_ACK, 0x64
        .set MMIO_STATUS, 0x70
        .set MMIO_QUEUE_DESC, 0x80
        .set MMIO_QUEUE_AVAIL, 0x90
        .set MMIO_QUEUE_USED, 0xa0
        .set MMIO_CONFIG, 0x100
        .set QSIZE, 8
        .set T_IN, 0
        .set T_OUT, 1
        .set T_FLUSH, 4
        .set T_GET_ID, 8
        .set F_NEXT, 1
        .set F_WRITE, 2

.ifndef NO_PVH
        .section .note.pvh, "a"
        .p2align 2
        .long 4                 # name size ("Xen\0")
        .long 4                 # descriptor size
        .long 18                # XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .long pvh_start
.endif

        .text

# ---------------------------------------------------------------------------------------------
# The driver, assembled once per CPU mode; every label carries the mode suffix.
        .macro DRIVER sfx, modestr
main\sfx:
        mov     $stack_top, %esp
        mov     $\modestr, %edi
        call    puts\sfx

        # 1. Find the device on the command line (%esi -> NUL-terminated string).
1:      movb    (%esi), %al
        test    %al, %al
        jz      nodev\sfx
        mov     %esi, %edi
        mov     $pattern, %ebx
2:      movb    (%ebx), %cl
        test    %cl, %cl
        jz      3f
        cmpb    (%edi), %cl
        jne     4f
        inc     %edi
        inc     %ebx
        jmp     2b
4:      inc     %esi
        jmp     1b
3:      movb    (%edi), %al     # skip "4K" up to '@'
        test    %al, %al
        jz      nodev\sfx
        inc     %edi
        cmp     $'@', %al
        jne     3b
        add     $2, %edi        # "0x"
        xor     %ebp, %ebp
5:      movzbl  (%edi), %eax
        sub     $'0', %eax
        cmp     $9, %eax
        jbe     6f
        movzbl  (%edi), %eax
        sub     $'a', %eax
        cmp     $5, %eax
        ja      7f
        add     $10, %eax
6:      shl     $4, %ebp
        or      %eax, %ebp
        inc     %edi
        jmp     5b
7:      mov     $s_dev, %edi
        call    puts\sfx
        mov     %ebp, %eax
        call    puthex\sfx

        # 2. Identify.
        cmpl    $0x74726976, MMIO_MAGIC(%ebp)
        jne     nodev\sfx
        cmpl    $2, MMIO_VERSION(%ebp)
        jne     nodev\sfx
        cmpl    $2, MMIO_DEVICE_ID(%ebp)
        jne     nodev\sfx

        # 3. Initialise: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue, DRIVER_OK.
        movl    $0, MMIO_STATUS(%ebp)
        movl    $1, MMIO_STATUS(%ebp)
        movl    $3, MMIO_STATUS(%ebp)
        movl    $1, MMIO_DEVICE_FEATURES_SEL(%ebp)
        testl   $1, MMIO_DEVICE_FEATURES(%ebp)
        jz      fail\sfx
        movl    $1, MMIO_DRIVER_FEATURES_SEL(%ebp)
        movl    $1, MMIO_DRIVER_FEATURES(%ebp)          # VERSION_1
        movl    $0, MMIO_DRIVER_FEATURES_SEL(%ebp)
        movl    $0x200, MMIO_DRIVER_FEATURES(%ebp)      # FLUSH
        movl    $0xb, MMIO_STATUS(%ebp)
        testl   $8, MMIO_STATUS(%ebp)
        jz      fail\sfx
        movl    $0, MMIO_QUEUE_SEL(%ebp)
        cmpl    $QSIZE, MMIO_QUEUE_NUM_MAX(%ebp)
        jb      fail\sfx
        movl    $QSIZE, MMIO_QUEUE_NUM(%ebp)
        movl    $desc, MMIO_QUEUE_DESC(%ebp)
        movl    $0, MMIO_QUEUE_DESC+4(%ebp)
        movl    $avail, MMIO_QUEUE_AVAIL(%ebp)
        movl    $0, MMIO_QUEUE_AVAIL+4(%ebp)
        movl    $used, MMIO_QUEUE_USED(%ebp)
        movl    $0, MMIO_QUEUE_USED+4(%ebp)
        movl    $1, MMIO_QUEUE_READY(%ebp)
        movl    $0xf, MMIO_STATUS(%ebp)
        mov     $s_cap, %edi
        call    puts\sfx
        movl    MMIO_CONFIG(%ebp), %eax
        call    puthex\sfx

        # 4. Read sectors 0-7 and sum them.
        mov     $T_IN, %eax
        xor     %ecx, %ecx
        mov     $4096, %edx
        mov     $F_WRITE, %ebx
        call    req\sfx
        test    %eax, %eax
        jnz     fail\sfx
        mov     $s_read, %edi
        call    puts\sfx
        mov     $1024, %ecx
        call    sum\sfx
        call    puthex\sfx

        # 5. The interrupt status shows the used-buffer interrupt; acknowledge it.
        mov     $s_isr, %edi
        call    puts\sfx
        movl    MMIO_INTERRUPT_STATUS(%ebp), %eax
        movl    %eax, MMIO_INTERRUPT_ACK(%ebp)
        add     $'0', %al
        mov     $COM1, %dx
        out     %al, %dx

        # 6. GET_ID.
        movl    $0, databuf+20
        mov     $T_GET_ID, %eax
        xor     %ecx, %ecx
        mov     $20, %edx
        mov     $F_WRITE, %ebx
        call    req\sfx
        test    %eax, %eax
        jnz     fail\sfx
        mov     $s_id, %edi
        call    puts\sfx
        mov     $databuf, %edi
        call    puts\sfx

        # 7. Write sectors 8-9, flush, read them back.
        mov     $databuf, %edi
        xor     %ecx, %ecx
8:      mov     %ecx, %eax
        imul    $0x9e3779b9, %eax, %eax
        mov     %eax, (%edi,%ecx,4)
        inc     %ecx
        cmp     $256, %ecx
        jne     8b
        mov     $T_OUT, %eax
        mov     $8, %ecx
        mov     $1024, %edx
        xor     %ebx, %ebx
        call    req\sfx
        mov     %eax, %esi
        mov     $s_write, %edi
        call    puts\sfx
        mov     %esi, %eax
        add     $'0', %al
        mov     $COM1, %dx
        out     %al, %dx
        mov     $T_FLUSH, %eax
        xor     %ecx, %ecx
        xor     %edx, %edx
        xor     %ebx, %ebx
        call    req\sfx
        mov     %eax, %esi
        mov     $s_flush, %edi
        call    puts\sfx
        mov     %esi, %eax
        add     $'0', %al
        mov     $COM1, %dx
        out     %al, %dx
        mov     $databuf, %edi          # clear, so the sum proves the read
        xor     %ecx, %ecx
9:      movl    $0, (%edi,%ecx,4)
        inc     %ecx
        cmp     $256, %ecx
        jne     9b
        mov     $T_IN, %eax
        mov     $8, %ecx
        mov     $1024, %edx
        mov     $F_WRITE, %ebx
        call    req\sfx
        test    %eax, %eax
        jnz     fail\sfx
        mov     $s_verify, %edi
        call    puts\sfx
        mov     $256, %ecx
        call    sum\sfx
        call    puthex\sfx

        # 8. Done.
        mov     $s_done, %edi
        call    puts\sfx
        jmp     reset\sfx

nodev\sfx:
        mov     $s_nodev, %edi
        call    puts\sfx
        jmp     reset\sfx
fail\sfx:
        mov     $s_fail, %edi
        call    puts\sfx
reset\sfx:
        mov     $0xfe, %al
        out     %al, $0x64
10:     hlt
        jmp     10b

# puts: prints the string at %edi. Clobbers %eax, %edx, %edi.
puts\sfx:
        mov     $COM1, %dx
1:      movb    (%edi), %al
        test    %al, %al
        jz      2f
        out     %al, %dx
        inc     %edi
        jmp     1b
2:      ret

# puthex: prints %eax as 8 hex digits. Clobbers %eax, %ebx, %ecx, %edx.
puthex\sfx:
        mov     %eax, %ebx
        mov     $8, %ecx
        mov     $COM1, %dx
1:      rol     $4, %ebx
        mov     %ebx, %eax
        and     $0xf, %eax
        movb    hexdigits(%eax), %al
        out     %al, %dx
        dec     %ecx
        jnz     1b
        ret

# sum: wrapping sum of %ecx dwords at databuf into %eax. Clobbers %ecx, %edi.
sum\sfx:
        xor     %eax, %eax
        mov     $databuf, %edi
1:      add     (%edi), %eax
        add     $4, %edi
        dec     %ecx
        jnz     1b
        ret

# req: one request of type %eax at sector %ecx with %edx data bytes at databuf (descriptor
# flags %ebx: F_WRITE for device-writable data; no data descriptor when %edx is 0). Submits
# it, notifies, polls the used ring, returns the status byte in %eax. Clobbers %ebx-%edx.
req\sfx:
        movl    %eax, hdr
        movl    $0, hdr+4
        movl    %ecx, hdr+8
        movl    $0, hdr+12
        movb    $0xff, statusb
        movl    $hdr, desc
        movl    $0, desc+4
        movl    $16, desc+8
        movw    $F_NEXT, desc+12
        movw    $1, desc+14
        test    %edx, %edx
        jnz     1f
        movw    $2, desc+14
1:      movl    $databuf, desc+16
        movl    $0, desc+20
        movl    %edx, desc+24
        or      $F_NEXT, %ebx
        movw    %bx, desc+28
        movw    $2, desc+30
        movl    $statusb, desc+32
        movl    $0, desc+36
        movl    $1, desc+40
        movw    $F_WRITE, desc+44
        movw    $0, desc+46
        movzwl  avail+2, %eax
        mov     %eax, %ecx
        and     $(QSIZE - 1), %ecx
        movw    $0, avail+4(,%ecx,2)
        inc     %eax
        movw    %ax, avail+2
        movl    $0, MMIO_QUEUE_NOTIFY(%ebp)
2:      cmpw    %ax, used+2
        jne     2b
        movzbl  statusb, %eax
        ret
        .endm

# ---------------------------------------------------------------------------------------------
        .code32
        .globl pvh_start
pvh_start:
        mov     0x18(%ebx), %esi        # hvm_start_info.cmdline_paddr
        jmp     main32
        DRIVER  32, s_pvh

        .code64
        DRIVER  64, s_64

# The 64-bit entry sits 0x200 bytes into the image (see guest.ld), where a bzImage's
# startup_64 is, so that the same code also boots as the payload of a bzImage.
        .section .text.entry64, "ax"
        .globl start64
start64:
        mov     0x228(%rsi), %esi       # boot_params.hdr.cmd_line_ptr
        jmp     main64

        .section .rodata
pattern:   .asciz "virtio_mmio.device="
hexdigits: .ascii "0123456789abcdef"
s_pvh:     .asciz "vdisk-guest: mode=pvh"
s_64:      .asciz "vdisk-guest: mode=64"
s_dev:     .asciz " dev="
s_cap:     .asciz " cap="
s_read:    .asciz "\nread="
s_isr:     .asciz " isr="
s_id:      .asciz "\nid="
s_write:   .asciz "\nwrite="
s_flush:   .asciz " flush="
s_verify:  .asciz " verify="
s_done:    .asciz "\ndone\n"
s_nodev:   .asciz "\nno virtio-blk device\n"
s_fail:    .asciz "\nfail\n"

        .bss
        .p2align 12
desc:      .skip 16 * QSIZE
        .p2align 2
avail:     .skip 4 + 2 * QSIZE + 2
        .p2align 2
used:      .skip 4 + 8 * QSIZE + 2
        .p2align 4
hdr:       .skip 16
statusb:   .skip 4
        .p2align 12
databuf:   .skip 4096 + 64
        .p2align 4
           .skip 1024
stack_top:
