//! rmc's own guest program, generated as x86-64 machine code with iced-x86's `CodeAssembler`.
//!
//! The build machines' KVM cannot boot a stock Linux kernel, and a checkpointing system needs
//! a guest whose behaviour it can check anyway, so the guest is a small program with three
//! entry points, one per workload. The VMM starts each vCPU in long mode at the entry of its
//! workload with `rdi` = vCPU index and `rsi` = the vCPU's config record (see
//! [`crate::layout`]). The guest never takes interrupts: it waits by writing to "blocking"
//! ports (`NIC_RX_WAIT`, `SLEEP_US`, `IDLE`) that the VMM implements by sleeping until there
//! is work, which keeps idle vCPUs off the host CPU.
//!
//! ## `counter`: a request/response service on the NIC
//!
//! Payloads follow the NIC's 20-byte address header (see [`crate::nic`]); all integers are
//! little endian.
//!
//! ```text
//! request (20 bytes)  magic u32 = REQUEST_MAGIC | client_id u64 | seq u64
//! reply   (32 bytes)  magic u32 = REPLY_MAGIC | status u32 | client_id u64 | seq u64 | counter u64
//! ```
//!
//! The guest keeps a global counter and a table of clients (`CLIENT_TABLE_ADDR`, open
//! addressing, 4,096 entries) holding each client's last seq and the reply it got. A request
//! with a seq above the client's last one is new: the counter goes up by one and the reply
//! carries the new value. A request with the client's last seq is a repeat and gets the very
//! same reply again. An older seq gets `STATUS_STALE`; a malformed request (short, wrong
//! magic, client id 0 or seq 0) gets `STATUS_BAD`; a full table gets `STATUS_FULL`.
//!
//! ## `dirtier`: a configurable memory writer
//!
//! Writes 16 bytes (an SSE register, so the FPU/XSAVE state matters to its results) into one
//! page after another of its working set, wrapping around, at `RATE` pages per second (rate
//! control reads the TSC and sleeps through `SLEEP_US`), and stops after `LIMIT` writes if
//! `LIMIT` is not 0. After each write it stores its progress (writes done) in its status
//! record, so the host can read the guest's speed. What it writes depends only on how many
//! writes it did, so two runs with the same `LIMIT` leave the same memory behind.
//!
//! ## `idle`
//!
//! Does nothing, pausably.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use crate::layout::{self, config, ports, ring, status};

/// log2 of the page size: the dirtier turns a page index into an offset with it.
const PAGE_SHIFT: u32 = layout::PAGE_SIZE.trailing_zeros();

/// Magic of a counter request.
pub const REQUEST_MAGIC: u32 = 0x5152_4d52; // "RMRQ"
/// Magic of a counter reply.
pub const REPLY_MAGIC: u32 = 0x5052_4d52; // "RMRP"
/// Reply status: applied (or a repeat of an applied request).
pub const STATUS_OK: u32 = 0;
/// Reply status: the seq is older than the client's last one.
pub const STATUS_STALE: u32 = 1;
/// Reply status: malformed request.
pub const STATUS_BAD: u32 = 2;
/// Reply status: the client table is full.
pub const STATUS_FULL: u32 = 3;
/// Size of a request payload.
pub const REQUEST_LEN: usize = 20;
/// Size of a reply payload.
pub const REPLY_LEN: usize = 32;

/// Guest codes reported through `GUEST_PANIC`.
pub const PANIC_UNREACHABLE: u32 = 1;

/// The assembled guest program and its entry points.
#[derive(Debug, Clone)]
pub struct GuestProgram {
    /// Machine code, to be loaded at `CODE_ADDR`.
    pub code: Vec<u8>,
    /// Entry of the counter workload.
    pub counter_entry: u64,
    /// Entry of the dirtier workload.
    pub dirtier_entry: u64,
    /// Entry of the idle workload.
    pub idle_entry: u64,
}

/// Assembling failed (a bug in this module, not a runtime condition).
#[derive(Debug, thiserror::Error)]
#[error("Cannot assemble the guest program")]
pub struct AssembleError(#[from] IcedError);

impl GuestProgram {
    /// Generates the guest program for code loaded at `layout::CODE_ADDR`.
    pub fn build() -> Result<Self, AssembleError> {
        let mut a = CodeAssembler::new(64)?;
        let mut counter = a.create_label();
        let mut dirtier = a.create_label();
        let mut idle = a.create_label();
        let mut idle_loop = a.create_label();
        let mut print = a.create_label();
        let mut msg_counter = a.create_label();
        let mut msg_dirtier = a.create_label();
        let mut msg_idle = a.create_label();

        // ---- counter ----
        a.set_label(&mut counter)?;
        prologue(&mut a)?;
        a.lea(rsi, ptr(msg_counter))?;
        a.call(print)?;
        emit_counter(&mut a)?;

        // ---- dirtier ----
        a.set_label(&mut dirtier)?;
        prologue(&mut a)?;
        a.lea(rsi, ptr(msg_dirtier))?;
        a.call(print)?;
        emit_dirtier(&mut a, idle_loop)?;

        // ---- idle ----
        a.set_label(&mut idle)?;
        prologue(&mut a)?;
        a.lea(rsi, ptr(msg_idle))?;
        a.call(print)?;
        a.mov(qword_ptr(r14 + status::READY), 1)?;
        a.set_label(&mut idle_loop)?;
        a.mov(dx, ports::IDLE as u32)?;
        a.out(dx, eax)?;
        a.jmp(idle_loop)?;

        // ---- print: rsi = NUL-terminated string -> console ----
        let mut p_loop = a.create_label();
        let mut p_done = a.create_label();
        a.set_label(&mut print)?;
        a.mov(dx, ports::CONSOLE as u32)?;
        a.set_label(&mut p_loop)?;
        a.mov(al, byte_ptr(rsi))?;
        a.test(al, al)?;
        a.jz(p_done)?;
        a.out(dx, al)?;
        a.inc(rsi)?;
        a.jmp(p_loop)?;
        a.set_label(&mut p_done)?;
        a.ret()?;

        a.set_label(&mut msg_counter)?;
        a.db(b"rmc guest: counter service ready\n\0")?;
        a.set_label(&mut msg_dirtier)?;
        a.db(b"rmc guest: dirtier running\n\0")?;
        a.set_label(&mut msg_idle)?;
        a.db(b"rmc guest: idle\n\0")?;

        let result = a.assemble_options(
            layout::CODE_ADDR,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let code = result.inner.code_buffer.clone();
        assert!(
            code.len() as u64 <= layout::CODE_MAX,
            "guest code too large"
        );
        Ok(GuestProgram {
            counter_entry: result.label_ip(&counter)?,
            dirtier_entry: result.label_ip(&dirtier)?,
            idle_entry: result.label_ip(&idle)?,
            code,
        })
    }
}

/// r15 = config record (from rsi), r14 = status record of vCPU rdi.
fn prologue(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(r15, rsi)?;
    a.mov(r14, rdi)?;
    a.shl(r14, 6)?;
    a.add(r14, layout::STATUS_ADDR as i32)?;
    Ok(())
}

/// The counter service. Registers: r12d = RX consumer index, r13d = TX producer index,
/// ebx = RX producer index.
fn emit_counter(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let n = layout::NIC_RING_SIZE;
    let mask = n - 1;
    let buf_shift = layout::NIC_BUF_SIZE.trailing_zeros();
    // Program the NIC.
    for (port, value) in [
        (ports::NIC_TX_RING, layout::TX_RING_ADDR as u32),
        (ports::NIC_RX_RING, layout::RX_RING_ADDR as u32),
        (ports::NIC_RING_SIZE, n),
    ] {
        a.mov(dx, port as u32)?;
        a.mov(eax, value)?;
        a.out(dx, eax)?;
    }
    // Post every RX buffer.
    let mut post = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut post)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 4)?;
    a.add(rax, layout::RX_RING_ADDR as i32)?;
    a.mov(edx, ecx)?;
    a.shl(edx, buf_shift)?;
    a.add(rdx, layout::RX_BUF_ADDR as i32)?;
    a.mov(qword_ptr(rax), rdx)?;
    a.mov(dword_ptr(rax + ring::DESC_LEN), layout::NIC_BUF_SIZE)?;
    a.mov(dword_ptr(rax + 12), 0)?;
    a.inc(ecx)?;
    a.cmp(ecx, n)?;
    a.jb(post)?;
    a.mov(ebx, n)?;
    a.mov(dx, ports::NIC_RX_DOORBELL as u32)?;
    a.mov(eax, ebx)?;
    a.out(dx, eax)?;
    a.xor(r12d, r12d)?;
    a.xor(r13d, r13d)?;
    a.mov(qword_ptr(r14 + status::READY), 1)?;

    let mut main = a.create_label();
    let mut have = a.create_label();
    let mut tx_space = a.create_label();
    let mut tx_ok = a.create_label();
    let mut probe = a.create_label();
    let mut next_probe = a.create_label();
    let mut empty = a.create_label();
    let mut found = a.create_label();
    let mut repeat = a.create_label();
    let mut stale = a.create_label();
    let mut bad = a.create_label();
    let mut reply = a.create_label();

    a.set_label(&mut main)?;
    a.mov(r8, layout::RX_RING_ADDR)?;
    a.mov(eax, dword_ptr(r8 + ring::USED_IDX))?;
    a.cmp(eax, r12d)?;
    a.jne(have)?;
    a.mov(dx, ports::NIC_RX_WAIT as u32)?;
    a.out(dx, eax)?;
    a.jmp(main)?;

    a.set_label(&mut have)?;
    // r9 = RX descriptor, rsi = its buffer, ecx = received length.
    a.mov(eax, r12d)?;
    a.and(eax, mask)?;
    a.shl(eax, 4)?;
    a.lea(r9, qword_ptr(r8 + rax))?;
    a.mov(rsi, qword_ptr(r9))?;
    a.mov(ecx, dword_ptr(r9 + ring::DESC_LEN))?;

    // Wait for a free TX slot: while tx_prod - tx_used >= n.
    a.set_label(&mut tx_space)?;
    a.mov(r10, layout::TX_RING_ADDR)?;
    a.mov(eax, dword_ptr(r10 + ring::USED_IDX))?;
    a.mov(edx, r13d)?;
    a.sub(edx, eax)?;
    a.cmp(edx, n)?;
    a.jb(tx_ok)?;
    a.mov(dx, ports::NIC_TX_WAIT as u32)?;
    a.out(dx, eax)?;
    a.jmp(tx_space)?;

    a.set_label(&mut tx_ok)?;
    // rdi = TX buffer; copy the 20-byte address header so the reply goes back to the sender.
    a.mov(edi, r13d)?;
    a.and(edi, mask)?;
    a.shl(edi, buf_shift)?;
    a.add(rdi, layout::TX_BUF_ADDR as i32)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rax, qword_ptr(rsi + 8))?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    a.mov(eax, dword_ptr(rsi + 16))?;
    a.mov(dword_ptr(rdi + 16), eax)?;

    // Parse: r10 = client id, r11 = seq.
    a.cmp(ecx, (crate::nic::HEADER_LEN + REQUEST_LEN) as u32)?;
    a.jb(bad)?;
    a.cmp(dword_ptr(rsi + 20), REQUEST_MAGIC)?;
    a.jne(bad)?;
    a.mov(r10, qword_ptr(rsi + 24))?;
    a.mov(r11, qword_ptr(rsi + 32))?;
    a.test(r10, r10)?;
    a.jz(bad)?;
    a.test(r11, r11)?;
    a.jz(bad)?;

    // Look the client up: eax = slot, rdx = entry, ecx = probes left.
    a.mov(rax, r10)?;
    a.mov(rdx, 0x9e37_79b9_7f4a_7c15u64)?;
    a.imul_2(rax, rdx)?;
    a.shr(rax, 64 - layout::CLIENT_TABLE_ENTRIES.trailing_zeros())?;
    a.mov(ecx, layout::CLIENT_TABLE_ENTRIES as u32)?;
    a.set_label(&mut probe)?;
    a.mov(edx, eax)?;
    a.shl(rdx, 5)?;
    a.add(rdx, layout::CLIENT_TABLE_ADDR as i32)?;
    a.mov(r8, qword_ptr(rdx))?;
    a.cmp(r8, r10)?;
    a.je(found)?;
    a.test(r8, r8)?;
    a.jz(empty)?;
    a.set_label(&mut next_probe)?;
    a.inc(eax)?;
    a.and(eax, (layout::CLIENT_TABLE_ENTRIES - 1) as u32)?;
    a.dec(ecx)?;
    a.jnz(probe)?;
    a.mov(eax, STATUS_FULL)?;
    a.xor(r8d, r8d)?;
    a.jmp(reply)?;

    a.set_label(&mut empty)?;
    a.mov(qword_ptr(rdx), r10)?;
    a.mov(qword_ptr(rdx + 8), 0)?;
    a.mov(qword_ptr(rdx + 16), 0)?;
    a.mov(qword_ptr(rdx + 24), 0)?;

    a.set_label(&mut found)?;
    a.mov(rcx, layout::COUNTER_STATE_ADDR)?;
    a.cmp(r11, qword_ptr(rdx + 8))?;
    a.je(repeat)?;
    a.jb(stale)?;
    // New request: apply it once.
    a.mov(r8, qword_ptr(rcx))?;
    a.inc(r8)?;
    a.mov(qword_ptr(rcx), r8)?;
    a.mov(qword_ptr(rdx + 8), r11)?;
    a.mov(qword_ptr(rdx + 16), r8)?;
    a.mov(qword_ptr(rdx + 24), STATUS_OK as i32)?;
    a.inc(qword_ptr(rcx + 8))?;
    a.mov(eax, STATUS_OK)?;
    a.jmp(reply)?;

    a.set_label(&mut repeat)?;
    a.inc(qword_ptr(rcx + 16))?;
    a.mov(r8, qword_ptr(rdx + 16))?;
    a.mov(eax, dword_ptr(rdx + 24))?;
    a.jmp(reply)?;

    a.set_label(&mut stale)?;
    a.mov(eax, STATUS_STALE)?;
    a.xor(r8d, r8d)?;
    a.jmp(reply)?;

    a.set_label(&mut bad)?;
    a.mov(rcx, layout::COUNTER_STATE_ADDR)?;
    a.inc(qword_ptr(rcx + 24))?;
    a.mov(eax, STATUS_BAD)?;
    a.xor(r10d, r10d)?;
    a.xor(r11d, r11d)?;
    a.xor(r8d, r8d)?;

    // Reply: eax = status, r10 = client, r11 = seq, r8 = counter, rdi = TX buffer.
    a.set_label(&mut reply)?;
    a.mov(dword_ptr(rdi + 20), REPLY_MAGIC)?;
    a.mov(dword_ptr(rdi + 24), eax)?;
    a.mov(qword_ptr(rdi + 28), r10)?;
    a.mov(qword_ptr(rdi + 36), r11)?;
    a.mov(qword_ptr(rdi + 44), r8)?;
    a.mov(eax, r13d)?;
    a.and(eax, mask)?;
    a.shl(eax, 4)?;
    a.mov(r10, layout::TX_RING_ADDR)?;
    a.add(r10, rax)?;
    a.mov(qword_ptr(r10), rdi)?;
    a.mov(
        dword_ptr(r10 + ring::DESC_LEN),
        (crate::nic::HEADER_LEN + REPLY_LEN) as u32,
    )?;
    a.mov(dword_ptr(r10 + 12), 0)?;
    a.inc(r13d)?;
    a.mov(dx, ports::NIC_TX_DOORBELL as u32)?;
    a.mov(eax, r13d)?;
    a.out(dx, eax)?;
    // Give the RX buffer back.
    a.mov(eax, r12d)?;
    a.and(eax, mask)?;
    a.shl(eax, 4)?;
    a.mov(r8, layout::RX_RING_ADDR)?;
    a.add(r8, rax)?;
    a.mov(dword_ptr(r8 + ring::DESC_LEN), layout::NIC_BUF_SIZE)?;
    a.mov(dword_ptr(r8 + 12), 0)?;
    a.inc(r12d)?;
    a.inc(ebx)?;
    a.mov(dx, ports::NIC_RX_DOORBELL as u32)?;
    a.mov(eax, ebx)?;
    a.out(dx, eax)?;
    a.jmp(main)?;
    Ok(())
}

/// The dirtier. Registers: r8 = working-set base, r9 = pages, r10 = rate, r11 = limit,
/// r13 = TSC Hz, rbp = TSC at start, rbx = writes done, r12 = page index, rdi = offset in page,
/// xmm2 = the value written, (writes, 3 x writes).
fn emit_dirtier(a: &mut CodeAssembler, idle_loop: CodeLabel) -> Result<(), IcedError> {
    a.mov(r8, qword_ptr(r15 + config::WS_BASE))?;
    a.mov(r9, qword_ptr(r15 + config::WS_PAGES))?;
    a.mov(r10, qword_ptr(r15 + config::RATE))?;
    a.mov(r11, qword_ptr(r15 + config::LIMIT))?;
    a.mov(rax, qword_ptr(r15 + config::TSC_KHZ))?;
    a.imul_3(r13, rax, 1000)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rbp, rax)?;
    a.xor(ebx, ebx)?;
    a.xor(r12d, r12d)?;
    a.xor(edi, edi)?;
    // xmm2 holds the value written (two u64 lanes). Only SSE *moves* are used: some hosts
    // (PVM) run this guest through KVM's instruction emulator, which has no SSE arithmetic.
    a.sub(rsp, 16)?;
    a.mov(qword_ptr(rsp), 0)?;
    a.mov(qword_ptr(rsp + 8), 0)?;
    a.movdqu(xmm2, xmmword_ptr(rsp))?;
    a.mov(qword_ptr(r14 + status::READY), 1)?;

    let mut dloop = a.create_label();
    let mut unlimited = a.create_label();
    let mut ratecheck = a.create_label();
    let mut write = a.create_label();
    let mut short_sleep = a.create_label();
    let mut same_round = a.create_label();

    a.set_label(&mut dloop)?;
    a.test(r11, r11)?;
    a.jz(unlimited)?;
    a.cmp(rbx, r11)?;
    a.jae(idle_loop)?;
    a.set_label(&mut unlimited)?;
    a.test(r10, r10)?;
    a.jz(write)?;
    a.test(bl, 15)?;
    a.jnz(write)?;
    // deadline = start + writes * tsc_hz / rate
    a.set_label(&mut ratecheck)?;
    a.mov(rax, rbx)?;
    a.mul(r13)?;
    a.div(r10)?;
    a.add(rax, rbp)?;
    a.mov(rcx, rax)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.cmp(rax, rcx)?;
    a.jae(write)?;
    // Sleep (deadline - now) ticks = ticks * 1000 / tsc_khz microseconds, at most 1 s.
    a.sub(rcx, rax)?;
    a.mov(rax, rcx)?;
    a.mov(ecx, 1000)?;
    a.mul(rcx)?;
    a.div(qword_ptr(r15 + config::TSC_KHZ))?;
    a.cmp(rax, 1_000_000)?;
    a.jbe(short_sleep)?;
    a.mov(eax, 1_000_000)?;
    a.set_label(&mut short_sleep)?;
    a.mov(dx, ports::SLEEP_US as u32)?;
    a.out(dx, eax)?;
    a.jmp(ratecheck)?;

    a.set_label(&mut write)?;
    a.mov(rax, r12)?;
    a.shl(rax, PAGE_SHIFT)?;
    a.add(rax, r8)?;
    a.add(rax, rdi)?;
    // xmm2 += (1, 3), through the stack.
    a.movdqu(xmmword_ptr(rsp), xmm2)?;
    a.add(qword_ptr(rsp), 1)?;
    a.add(qword_ptr(rsp + 8), 3)?;
    a.movdqu(xmm2, xmmword_ptr(rsp))?;
    a.movdqu(xmmword_ptr(rax), xmm2)?;
    a.inc(rbx)?;
    a.mov(qword_ptr(r14 + status::PROGRESS), rbx)?;
    a.inc(r12)?;
    a.cmp(r12, r9)?;
    a.jb(same_round)?;
    a.xor(r12d, r12d)?;
    a.add(edi, 16)?;
    a.and(edi, 0xff0)?;
    a.set_label(&mut same_round)?;
    a.jmp(dloop)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_with_distinct_entries_inside_code() {
        let p = GuestProgram::build().unwrap();
        let end = layout::CODE_ADDR + p.code.len() as u64;
        for entry in [p.counter_entry, p.dirtier_entry, p.idle_entry] {
            assert!((layout::CODE_ADDR..end).contains(&entry));
        }
        assert_ne!(p.counter_entry, p.dirtier_entry);
        assert_ne!(p.dirtier_entry, p.idle_entry);
    }
}
